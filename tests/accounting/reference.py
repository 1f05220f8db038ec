"""The independent reference: Google's dp_accounting, called directly.

Nothing here imports ``accounting``: the rule for micro-batches (the accountant
sees z for b = 1 and z / 2 for b > 1 under add/remove adjacency, docs/accounting.md
section 2) is written out again, so that a bug in ``accounting.sensitivity``
cannot hide behind the same bug in the reference.
"""

from __future__ import annotations

import dp_accounting as dpa


def accountant_z(engine_z: float, micro_batch_size: int) -> float:
    """Sensitivity of the clipped sum is C for b = 1 and 2C for b > 1 (keyed groups, add/remove)."""
    return engine_z if micro_batch_size == 1 else engine_z / 2


def event(segments):
    """(accountant z, q, steps) segments as one dp_accounting event; z None or 0 is non-private."""
    events = []
    for z, q, steps in segments:
        if not z:
            events.append(dpa.SelfComposedDpEvent(dpa.NonPrivateDpEvent(), steps))
        else:
            events.append(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps))
    return events[0] if len(events) == 1 else dpa.ComposedDpEvent(events)


def pld_epsilon(segments, delta, *, vdi=1e-4, relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE) -> float:
    acc = dpa.pld.PLDAccountant(neighboring_relation=relation, value_discretization_interval=vdi)
    ev = event(segments)
    if not acc.supports(ev):
        return float("inf")
    acc.compose(ev)
    return float(acc.get_epsilon(delta))


def rdp_epsilon(segments, delta, *, orders=None) -> float:
    acc = dpa.rdp.RdpAccountant(orders=None if orders is None else list(orders))
    ev = event(segments)
    if not acc.supports(ev):
        return float("inf")
    acc.compose(ev)
    return float(acc.get_epsilon(delta))
