"""Peak memory of each clipping route, planned from tensor shapes alone, and the budget a pass may use.

The engine's routes (``routes.py``) are all exact; they differ in what they build
for one layer call with ``B`` examples of ``T`` rows each, ``d`` input and ``p``
output features, ``P`` parameter elements, ``M`` groups of at most ``R``
examples (``N = R T`` rows per group):

* ``materialize``: per-group gradients ``M P``, held until the clip factors are known;
* ``norms_then_sum``: the same ``M P``, freed right after the norms, then one
  weighted product whose scaled copy of the output gradient is ``B T p``;
* ``ghost``: Gram matrices ``(M, N, N)`` of inputs and output gradients and their
  product (``3 M N^2``; nothing when ``N = 1``), then the same weighted product.

Ragged (keyed) groups add zero-padded copies ``M R T (d + p)``. The planner
works on shapes only, so it runs on meta tensors or on plain numbers
(:class:`LayerShape`) without running a model: a 7B-shaped layer can be planned
on a laptop. Estimates are upper bounds of what the rules allocate, in bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigurationError
from .settings import DEFAULT_FREE_FRACTION, MemoryBudget

#: Routes from the least memory held to the most (the order in which ties are broken).
MEMORY_ORDER = ("ghost", "norms_then_sum", "materialize")


@dataclass(frozen=True)
class LayerShape:
    """One layer call as the planner sees it: shapes only.

    Attributes:
        name: the layer's name (for messages).
        batch: ``B``, examples in the call.
        rows: ``T``, rows per example (positions of a sequence, 1 for a ``(B, d)`` input).
        in_features: ``d``, the input's last dimension.
        out_features: ``p``, the output gradient's last dimension.
        group_grad_elements: ``M P``, what materialised group gradients take (elements).
        routes: the exact routes this call can take (see ``routes.choose_strategy``).
        ghost_kind: ``"gram"`` (rows of a matrix product: Linear and its relatives) or ``"rows"`` (an
            embedding: per-(group, index) row sums, ``2 B T d``).
        itemsize: bytes per element of the captured tensors.
        ghost_elements: what the rule's ghost norms build, where the rule says (``LayerRule.ghost_elements``:
            a convolution's position Gram); None: the Gram estimate above.
    """

    name: str
    batch: int
    rows: int
    in_features: int
    out_features: int
    group_grad_elements: int
    routes: tuple[str, ...]
    ghost_kind: str = "gram"
    itemsize: int = 4
    ghost_elements: int | None = None


@dataclass(frozen=True)
class Footprint:
    """A route's planned memory for one layer call, in bytes: ``held`` until the pass ends, ``transient`` while
    the route runs."""

    held: int
    transient: int

    @property
    def peak(self) -> int:
        """What the route adds at its own peak."""
        return self.held + self.transient


def footprint(shape: LayerShape, route: str, num_groups: int, max_group_size: int, contiguous: bool,
              weighted_sum_rows: int | None = None) -> Footprint:
    """The planned :class:`Footprint` of ``route`` for ``shape`` with ``M`` groups of at most ``R`` examples.

    ``weighted_sum_rows``: the examples per call of the weighted product (None: all ``B`` at once); lean mode
    splits it so that its scaled copy stays small.
    """
    b, t, d, p, size = shape.batch, shape.rows, shape.in_features, shape.out_features, shape.itemsize
    m, r = num_groups, max_group_size
    pad = 0 if contiguous else m * r * t * (d + p)
    chunk = b if weighted_sum_rows is None else max(1, min(b, weighted_sum_rows))
    weighted = chunk * t * max(p, 1)  # the scaled copy of the output gradient (or of the looked-up rows)
    if route == "materialize":
        return Footprint(shape.group_grad_elements * size, (pad + 0) * size)
    if route == "norms_then_sum":
        return Footprint(0, (pad + max(shape.group_grad_elements, weighted)) * size)
    if route == "ghost":
        if shape.ghost_kind == "rows":
            return Footprint(0, (2 * b * t * d + weighted) * size)
        n = r * t
        gram = 0 if n == 1 else 3 * m * n * n + pad
        if shape.ghost_elements is not None:
            gram = shape.ghost_elements
        return Footprint(0, (max(gram, weighted) + 2 * b) * size)
    if route == "func":
        return Footprint(shape.group_grad_elements * size, shape.group_grad_elements * size)
    raise ValueError(f"unknown route {route!r}")


def leanest(fps: dict[str, Footprint]) -> str:
    """The route with the smallest planned peak (ties: the one that holds least, ``MEMORY_ORDER``)."""
    order = {route: i for i, route in enumerate(MEMORY_ORDER)}
    return min(fps, key=lambda route: (fps[route].peak, order.get(route, len(order))))


@dataclass(frozen=True)
class Planned:
    """The plan of one layer call: the routes that fit, the leanest one, and every route's footprint."""

    name: str
    fits: tuple[str, ...]  # routes whose peak fits what is left of the budget, least memory first
    leanest: str
    footprints: dict

    @property
    def over_budget(self) -> bool:
        """No route fits: the leanest is taken anyway (a warning or, with ``strict``, an error)."""
        return not self.fits


def plan_call(shape: LayerShape, left: int, num_groups: int, max_group_size: int, contiguous: bool,
              weighted_sum_rows: int | None = None, reserve: int = 0) -> Planned:
    """Which of ``shape.routes`` fit ``left`` bytes (what the pass's budget has left), from shapes only.

    ``reserve``: bytes the calls after this one need at least (the largest of their leanest peaks); a route
    that would hold so much that they could no longer fit does not fit either.
    """
    fps = {route: footprint(shape, route, num_groups, max_group_size, contiguous, weighted_sum_rows)
           for route in shape.routes}
    order = {route: i for i, route in enumerate(MEMORY_ORDER)}
    fits = tuple(sorted((r for r, fp in fps.items() if fp.peak <= left and fp.held + reserve <= left),
                        key=lambda r: order.get(r, len(order))))
    return Planned(shape.name, fits, leanest(fps), fps)


def reserves(leanest_peaks: Sequence[int]) -> list[int]:
    """For each call, the largest leanest peak of the calls after it (what it must leave room for)."""
    out, running = [0] * len(leanest_peaks), 0
    for i in range(len(leanest_peaks) - 1, -1, -1):
        out[i] = running
        running = max(running, leanest_peaks[i])
    return out


def plan_pass(shapes: Sequence[LayerShape], budget: int, num_groups: int, max_group_size: int,
              contiguous: bool = True, lean: bool = False, prefer=None) -> dict[str, tuple[str, Planned]]:
    """Plan a whole backward pass: ``{name: (route, plan)}`` and, through the held totals, its peak.

    The choice the engine makes before any timing: ``lean`` takes each call's leanest route; otherwise
    ``prefer(name, fits)`` picks among the routes that fit (the engine's autotuner; default: the one that
    holds most, i.e. the fastest in the usual case). Routes that hold memory (materialised group gradients)
    use up the budget for the calls after them, but never so much that a later call's leanest route no
    longer fits (:func:`reserves`).
    """
    out: dict[str, tuple[str, Planned]] = {}
    held = 0
    rows = [lean_rows(shape) if lean else None for shape in shapes]
    alone = [plan_call(shape, 0, num_groups, max_group_size, contiguous, r) for shape, r in zip(shapes, rows)]
    later = reserves([plan.footprints[plan.leanest].peak for plan in alone])
    for shape, r, reserve in zip(shapes, rows, later):
        plan = plan_call(shape, budget - held, num_groups, max_group_size, contiguous, r, reserve)
        if lean or plan.over_budget:
            route = plan.leanest
        else:
            route = prefer(shape.name, plan.fits) if prefer is not None else plan.fits[-1]
        held += plan.footprints[route].held
        out[shape.name] = (route, plan)
    return out


def pass_peak(plans: dict[str, tuple[str, Planned]]) -> int:
    """The planned peak of a pass: everything held so far plus the largest transient, in bytes."""
    held = peak = 0
    for route, plan in plans.values():
        fp = plan.footprints[route]
        peak = max(peak, held + fp.peak)
        held += fp.held
    return peak


#: Lean mode: the scaled copy of a weighted product's output gradient is kept under this many bytes (in row chunks).
LEAN_WEIGHTED_BYTES = 1 << 20


def lean_rows(shape: LayerShape) -> int:
    """Examples per weighted-product call in lean mode: the scaled copy stays under ``LEAN_WEIGHTED_BYTES``."""
    per_example = max(1, shape.rows * max(shape.out_features, 1) * shape.itemsize)
    return max(1, LEAN_WEIGHTED_BYTES // per_example)


# ================================================================ records -> shapes, and the budget
def record_shape(record, groups, routes: tuple[str, ...]) -> LayerShape:
    """The :class:`LayerShape` of a captured record (real or meta tensors: only shapes are read)."""
    a = next((x for x in record.inputs if torch.is_tensor(x)), None)
    g = record.out_grad if torch.is_tensor(record.out_grad) else next(x for x in record.out_grad if x is not None)
    batch = int(g.shape[0])
    rows = math.prod(int(s) for s in g.shape[1:-1]) if g.dim() > 2 else 1
    d = int(a.shape[-1]) if a is not None and a.dim() > 1 else 1
    params = sum(p.numel() for p in record.params.values())
    elements = groups.num_groups * params
    rule = record.rule
    if rule is not None and rule.group_grad_elements is not None and torch.is_tensor(record.out_grad):
        elements = max(elements, int(rule.group_grad_elements(record.layer, record.inputs, record.out_grad, groups)))
    kind = "rows" if isinstance(record.layer, nn.Embedding) else "gram"
    ghost = None
    if rule is not None and rule.ghost_elements is not None and torch.is_tensor(record.out_grad):
        ghost = int(rule.ghost_elements(record.layer, record.inputs, record.out_grad, groups))
    return LayerShape(record.name, batch, rows, d, int(g.shape[-1]), elements, routes, kind, g.element_size(),
                      ghost)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (CUDA: ``mem_get_info``; CPU: ``MemAvailable``), None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


class BudgetResolver:
    """Turns a :class:`MemoryBudget` into bytes for one pass; the free memory is read once per device.

    ``free_cache`` (device name -> bytes) outlives one pass: the engine's autotuner keeps it, so that the free
    memory is read at the first backward pass on each device, not on every pass.
    """

    def __init__(self, memory: MemoryBudget, free_cache: dict | None = None):
        self.memory = memory
        self._free: dict[str, int | None] = {} if free_cache is None else free_cache

    def _free_of(self, device: torch.device) -> int | None:
        key = str(device)
        if key not in self._free:
            self._free[key] = free_device_bytes(device)
        return self._free[key]

    def budget(self, device: torch.device, captured_bytes: int) -> tuple[int, int | None]:
        """``(budget, hard)`` in bytes: routes must fit ``budget``; a leanest route over ``hard`` is reported.

        Explicit budgets are both; the default is the captured size, with half the free memory as the hard cap.
        """
        memory = self.memory
        if memory.max_bytes is not None:
            return int(memory.max_bytes), int(memory.max_bytes)
        free = self._free_of(device)
        if memory.fraction_of_free is not None:
            if free is None:
                raise ConfigurationError(
                    f"MemoryBudget(fraction_of_free=...) cannot read the free memory of device {device}. "
                    "Give an absolute budget: MemoryBudget(max_bytes=...)."
                )
            value = int(free * memory.fraction_of_free)
            return value, value
        hard = None if free is None else int(free * DEFAULT_FREE_FRACTION)
        return (captured_bytes if hard is None else min(captured_bytes, hard)), hard
