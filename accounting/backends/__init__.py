"""Backends: turn a step history into epsilon with Opacus or Google's dp_accounting.

A history is a sequence of :class:`Segment` ``(noise_multiplier, sample_rate,
steps)``: ``steps`` consecutive Poisson-subsampled Gaussian steps, each record
sampled with probability ``sample_rate`` and noise of standard deviation
``noise_multiplier`` times the contribution bound of one record (the
*accountant's* z, already divided by the micro-batch factor in
``sensitivity.py``). ``noise_multiplier`` None or 0 is a non-private segment.

Every backend honours the same contract (tested for each in
``tests/accounting/test_backend_contract.py``):

* an empty history gives 0.0;
* any non-private segment gives ``math.inf``, computed before any library is
  called (Opacus' PRV accountant raises OverflowError on z = 0);
* an adjacency it cannot analyse raises ``PrivacyRefusal`` naming the backend
  that can.

The libraries are imported inside the backends' methods, never here: importing
any ``opacus`` submodule imports torch, and ``import accounting`` must not.

Available accountants (``ACCOUNTANTS``):

* ``"rdp"``: Opacus' RDP accountant on a wide grid of orders. Fast (ms), an
  upper bound 5-15% above the tight number.
* ``"rdp_google"``: dp_accounting's RDP accountant on the same orders.
* ``"prv"``: Opacus' PRV accountant (Gopi et al. 2021). Tight, 0.1-5 s; falls
  back to RDP with a warning where it would need too much memory.
* ``"pld"``: dp_accounting's PLD accountant (connect-the-dots). Tight, 0.1-5 s;
  the only backend that analyses ``adjacency="replace_one"``. Needs the
  ``accounting`` extra.
"""

from __future__ import annotations

import importlib

import math
import numbers
from typing import NamedTuple, Protocol, Sequence, Union

from accounting.errors import PrivacyRefusal
from accounting.mechanism import ADJACENCIES

#: name -> (module, class) of each backend; ``resolve`` imports the module on first use.
_REGISTRY = {
    "rdp": ("accounting.backends.rdp", "RdpBackend"),
    "rdp_google": ("accounting.backends.rdp", "RdpGoogleBackend"),
    "prv": ("accounting.backends.prv", "PrvBackend"),
    "pld": ("accounting.backends.pld", "PldBackend"),
}
ACCOUNTANTS = tuple(_REGISTRY)


class Segment(NamedTuple):
    """``steps`` identical Poisson-subsampled Gaussian steps, as Opacus' history tuples."""

    noise_multiplier: float | None
    sample_rate: float
    steps: int


class Backend(Protocol):
    """What the ledger needs from a backend."""

    name: str
    adjacencies: tuple[str, ...]  # the neighbouring relations its analysis covers

    def epsilon(self, history: Sequence[Segment], delta: float, *, adjacency: str = "add_remove") -> float:
        """Epsilon at ``delta`` of the composition of ``history``."""
        ...


AccountantSpec = Union[str, Backend]


def as_segments(history: Sequence[Segment | tuple]) -> tuple[Segment, ...]:
    """Validate a history of ``(noise_multiplier, sample_rate, steps)`` tuples (Opacus' format).

    Raises:
        ValueError: a malformed segment; the message shows it.
    """
    out = []
    for seg in history:
        try:
            z, q, n = seg
        except (TypeError, ValueError):
            raise ValueError(f"A history segment must be (noise_multiplier, sample_rate, steps). Found "
                             f"{seg!r}.") from None
        if z is not None and not (isinstance(z, numbers.Real) and 0 <= float(z) < math.inf):
            raise ValueError(f"Segment noise_multiplier must be None or a finite number >= 0. Found {seg!r}.")
        if not (isinstance(q, numbers.Real) and 0 < float(q) <= 1):
            raise ValueError(f"Segment sample_rate must be in (0, 1]. Found {seg!r}.")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"Segment steps must be an integer >= 0. Found {seg!r}.")
        out.append(Segment(None if z is None else float(z), float(q), int(n)))
    return tuple(out)


def trivial_epsilon(history: Sequence[Segment]) -> float | None:
    """0.0 for an empty history, inf if any segment adds no noise, else None.

    Every backend calls this first, so that no library sees z = 0 and an
    infinite epsilon is never replaced by the epsilon of the noisy steps alone.
    """
    if not any(seg.steps for seg in history):
        return 0.0
    if any(seg.steps and not seg.noise_multiplier for seg in history):
        return math.inf
    return None


def begin(backend, history, delta: float, adjacency: str) -> tuple[tuple[Segment, ...], float | None]:
    """What every backend does first: check delta and adjacency, validate the history, answer the trivial cases.

    Returns:
        The history as segments, and 0.0 / ``math.inf`` when no library is needed
        (see :func:`trivial_epsilon`), else None.
    """
    check_delta(delta)
    check_adjacency(adjacency, backend=backend.name, supported=backend.adjacencies)
    segments = as_segments(history)
    return segments, trivial_epsilon(segments)


def opacus_history(history: Sequence[Segment]) -> list[tuple[float, float, int]]:
    """Opacus' ``(noise_multiplier, sample_rate, steps)`` tuples of the segments with steps.

    Only for a history that :func:`trivial_epsilon` answered None for: every segment with steps is noisy.
    """
    out = []
    for s in history:
        if s.steps:
            assert s.noise_multiplier, "a noise-free segment is answered by trivial_epsilon"
            out.append((float(s.noise_multiplier), float(s.sample_rate), int(s.steps)))
    return out


def check_delta(delta: float) -> None:
    """Raise unless 0 < delta < 1 (epsilon at delta >= 1 is meaningless)."""
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(
            f"delta must be in (0, 1). Found {delta!r}. A common choice is delta < 1 / dataset_size, e.g. 1e-5."
        )


def resolve(accountant: AccountantSpec) -> Backend:
    """The backend for an accountant name, or the backend object itself.

    Args:
        accountant: one of ``ACCOUNTANTS``, or a configured backend object
            such as ``PldBackend(value_discretization_interval=1e-3)``.

    Returns:
        An object with ``name`` and ``epsilon(history, delta, *, adjacency)``.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.
    """
    if not isinstance(accountant, str):
        if callable(getattr(accountant, "epsilon", None)) and isinstance(getattr(accountant, "name", None), str):
            return accountant
        raise ValueError(
            f"accountant must be one of {', '.join(repr(a) for a in ACCOUNTANTS)} or a backend object. "
            f"Found {accountant!r}."
        )
    if accountant in _REGISTRY:
        # Imported on use, so that importing this package loads neither Opacus nor dp_accounting.
        module_name, class_name = _REGISTRY[accountant]
        return getattr(importlib.import_module(module_name), class_name)()
    raise ValueError(
        f"Unknown accountant {accountant!r}. Use one of {', '.join(repr(a) for a in ACCOUNTANTS)} "
        '(accountant="prv" is the default; "pld" needs pip install dp-microclip[accounting]).'
    )


def check_supported(accountant: AccountantSpec, adjacency: str) -> None:
    """Raise now if ``accountant`` is unknown or cannot analyse ``adjacency`` (to fail at set-up, not later).

    Raises:
        ValueError: an unknown accountant or adjacency.
        PrivacyRefusal: the backend does not analyse this adjacency; the message names one that does.
    """
    backend = resolve(accountant)
    check_adjacency(adjacency, backend=backend.name, supported=getattr(backend, "adjacencies", ("add_remove",)))


def name_of(accountant: AccountantSpec) -> str:
    """The accountant's name, for messages and the privacy statement."""
    return accountant if isinstance(accountant, str) else resolve(accountant).name


def import_dp_accounting():
    """Import Google's ``dp_accounting``, or say how to install it.

    Raises:
        ImportError: dp-accounting is not installed; the message names the extra.
    """
    try:
        import dp_accounting
    except ImportError as err:
        raise ImportError(
            "This accountant uses Google's dp_accounting, which is not installed. "
            'Run pip install "dp-microclip[accounting]" (or pip install dp-accounting), '
            'or use accountant="prv" or "rdp" (Opacus).'
        ) from err
    return dp_accounting


def dp_accounting_event(history: Sequence[Segment]):
    """The history as a ``dp_accounting`` event, for the Google backends.

    Reuses dp_accounting's event classes: one
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)``
    per segment, in a ``ComposedDpEvent`` when there is more than one.
    Callers have already handled non-private segments (``trivial_epsilon``).
    """
    dpa = import_dp_accounting()
    events = [
        dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(seg.sample_rate, dpa.GaussianDpEvent(seg.noise_multiplier)),
                                seg.steps)
        for seg in history
        if seg.steps
    ]
    return events[0] if len(events) == 1 else dpa.ComposedDpEvent(events)


def check_adjacency(adjacency: str, *, backend: str, supported: tuple[str, ...]) -> None:
    """Refuse an adjacency the backend's analysis does not cover.

    Raises:
        ValueError: an unknown adjacency.
        PrivacyRefusal: a known adjacency this backend cannot analyse; the
            message names the backend that can, and add_remove.
    """
    if adjacency not in ADJACENCIES:
        raise ValueError(f"adjacency must be one of {', '.join(repr(a) for a in ADJACENCIES)}. Found {adjacency!r}.")
    if adjacency not in supported:
        raise PrivacyRefusal(
            f'No epsilon: accountant="{backend}" analyses add/remove adjacency only, and '
            f'adjacency="{adjacency}" with Poisson sampling needs its own analysis. Use accountant="pld" '
            "(dp_accounting's NeighboringRelation.REPLACE_ONE), or adjacency=\"add_remove\"."
        )
