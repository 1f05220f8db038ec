"""Which route each layer's record takes, within a memory budget, timed once: the autotuner and its cache.

The budget comes first: :mod:`dp_microclip.planner` plans every route's peak from
shapes, and only the routes that fit what the pass has left are timed.

Every route is exact; the choice is about speed and memory only. The
:class:`Autotuner` holds the engine's ONE timing cache: which route is fastest
per (layer, shape class), and which variant of a rule (the conv layouts) is
fastest per shape class. Rules know their maths; the timing lives here.

Timing runs each candidate once to warm up, then all in interleaved repeats,
each keeping its best time, so that a burst of load from elsewhere hits every
candidate alike.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import torch

from .errors import ConfigurationError, user_stacklevel
from .layers.traits import NOT_REPLAYABLE
from .planner import MEMORY_ORDER, BudgetResolver, Planned, lean_rows, plan_call, record_shape, reserves
from .records import Record, grad_tensors
from .settings import ClipSettings, MemoryBudget


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(candidates: Mapping[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Best wall-clock seconds of each candidate over ``repeats`` interleaved runs (after one warm-up each)."""
    for run in candidates.values():
        run()
    best = {name: math.inf for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@dataclass
class PassBudget:
    """What one backward pass may still build, in bytes (see :class:`dp_microclip.MemoryBudget`).

    ``left`` shrinks by what each chosen route holds until the pass ends (materialised group gradients);
    ``hard`` is the limit whose excess is reported (None: never). ``lean`` takes each layer's leanest route.
    ``max_group_size``: R of the pass's groups, read once (for ragged groups it is a device read).
    """

    left: int
    hard: int | None
    memory: MemoryBudget
    max_group_size: int

    @property
    def lean(self) -> bool:
        """Whether the pass takes the leanest route everywhere (``MemoryBudget(lean=True)``)."""
        return self.memory.lean


def available_routes(record: Record, settings: ClipSettings, uses: Counter) -> tuple[str, ...]:
    """The exact routes this record can take: ("func",), ("materialize",), ("ghost",) or all three rule routes.

    * ghost: Gram norms, then one weighted product over all rows for the sum.
    * materialize: per-group gradients kept until the clip factors are known, the
      sum an einsum over them.
    * norms_then_sum: per-group gradients for the norms only, freed at once, the
      sum a weighted product (no M x params memory held).
    """
    if record.unit.parametrized:
        return ("materialize",)  # the group gradients of the computed weight are chained to its originals
    # Not replayable: in-place state (BatchNorm's statistics), or a call the rule reads in its own form (LayerRule.
    # present: EmbeddingBag's ids and offsets as padded bags), which the module itself would not take.
    replayable = not isinstance(record.unit.module, NOT_REPLAYABLE) and getattr(record.rule, "present", None) is None
    captured = record.unit.kind in ("attention", "rnn", "functional")  # records of parts (a generic one has no rule)
    if record.rule is None or (settings.grad_mode == "func" and not captured and replayable):
        return ("func",)
    assert isinstance(record.out_grad, torch.Tensor)  # rule records have one output tensor
    shared = any(uses[id(p)] > 1 for p in record.params.values())
    if shared or not record.rule.has_ghost or settings.grad_mode == "materialize":
        return ("materialize",)
    if settings.grad_mode == "bookkeeping" or record.rule.group_grad_elements is None:
        return ("ghost",)
    return MEMORY_ORDER


def leanest_peaks(records: list, groups, settings: ClipSettings, uses: Counter, budget: PassBudget) -> list[int]:
    """The planned peak of each record's leanest route (0 for records already reduced or on the func path)."""
    peaks = []
    m, r, contiguous = groups.num_groups, budget.max_group_size, groups.equal_size is not None
    lean = budget.lean
    for record in records:
        routes = ("func",) if record.group_grads is not None else available_routes(record, settings, uses)
        if routes == ("func",):
            peaks.append(0)
            continue
        shape = record_shape(record, groups, routes)
        plan = plan_call(shape, 0, m, r, contiguous, lean_rows(shape) if lean else None)
        peaks.append(plan.footprints[plan.leanest].peak)
    return peaks


def choose_strategy(
    record: Record, groups, settings: ClipSettings, uses: Counter, budget: PassBudget, tuner: "Autotuner",
    reserve: int = 0,
) -> str:
    """The route for one record: "ghost", "materialize", "norms_then_sum" or "func".

    ``grad_mode="auto"``: every route is exact, so the choice is only about speed
    and memory. First memory: each route's peak is planned from the shapes
    (:mod:`dp_microclip.planner`), and a route that would exceed what the pass's
    budget has left is never built, not even to be timed. Then speed: flop counts
    mislead here (a batched product of many small matrices runs several times
    slower per flop than one large product, and that ratio differs between CPUs
    and GPUs), so the routes that fit are timed once per layer and shape class
    (:class:`Autotuner`) and the fastest is kept. In lean mode the leanest route
    is taken without timing. When no route fits, the leanest is taken and the
    excess reported (:func:`report_over_budget`). ``reserve``: what the records after this one need at
    least (``planner.reserves``): a route that holds memory may not eat into it.
    """
    routes = available_routes(record, settings, uses)
    if routes == ("func",):
        return "func"  # the generic path: torch.func per group, no alternative to plan
    shape = record_shape(record, groups, routes)
    plan = plan_call(shape, budget.left, groups.num_groups, budget.max_group_size, groups.equal_size is not None,
                     lean_rows(shape) if budget.lean else None, reserve)
    if plan.over_budget:
        choice = plan.leanest
        report_over_budget(plan, choice, budget, tuner)
    elif budget.lean or len(plan.fits) == 1:
        choice = plan.leanest if budget.lean else plan.fits[0]
    else:
        choice = tuner.choose(record, groups, list(plan.fits))
    budget.left -= plan.footprints[choice].held
    return choice


def pass_routes(records: list, groups, settings: ClipSettings, uses: Counter, device: torch.device,
                tuner: "Autotuner") -> list:
    """The route of every record of one pass (None for a record already reduced to its group gradients).

    Planning reads only shapes, dtypes, the groups, the settings and the free memory (read once per device), so
    a pass whose records have the same shapes as an earlier pass's gets the same routes: they are planned once
    per pass signature (:func:`pass_signature`) and then looked up, which keeps the planner's and the
    autotuner's Python off every later step. A pass with a new signature (a Poisson batch of another size,
    another sequence length) is planned as the first was; timings stay per layer and shape class.
    """
    key = pass_signature(records, groups, settings, device)
    routes = tuner.pass_routes.get(key)
    if routes is not None:
        return routes
    captured = sum(_nbytes(r.inputs) + _nbytes(grad_tensors(r)) for r in records)
    limit, hard = BudgetResolver(settings.memory, tuner.free_memory).budget(device, captured)
    budget = PassBudget(limit, hard, settings.memory, groups.max_size())
    budget.left -= sum(_nbytes(list(r.group_grads.values())) for r in records if r.group_grads is not None)
    later = reserves(leanest_peaks(records, groups, settings, uses, budget))
    routes = [None if record.group_grads is not None
              else choose_strategy(record, groups, settings, uses, budget, tuner, later[position])
              for position, record in enumerate(records)]
    if len(tuner.pass_routes) >= tuner.MAX_PASS_PLANS:  # many signatures (ragged sizes): keep the newest
        tuner.pass_routes.pop(next(iter(tuner.pass_routes)))
    tuner.pass_routes[key] = routes
    return routes


def pass_signature(records: list, groups, settings: ClipSettings, device: torch.device) -> tuple:
    """Everything a pass's route plan depends on: per record its layer, parameters and tensor shapes and
    dtypes (group gradients included), the groups' sizes, the device, the grad mode and the memory budget."""
    def tensors_of(values) -> tuple:
        return tuple((x.shape, x.dtype) if torch.is_tensor(x) else None for x in values)

    per_record = tuple(
        (record.name, id(record.unit), tuple(map(id, record.params.values())), tensors_of(record.inputs),
         tensors_of(grad_tensors(record)),
         None if record.group_grads is None else tensors_of(record.group_grads.values()))
        for record in records)
    return (per_record, groups.num_groups, groups.equal_size, groups.batch_size, groups.max_size(), device,
            settings.grad_mode, settings.memory)


def _nbytes(tensors) -> int:
    return sum(x.numel() * x.element_size() for x in tensors if torch.is_tensor(x))


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def report_over_budget(plan: Planned, choice: str, budget: PassBudget, tuner: "Autotuner") -> None:
    """No exact route of a layer fits: warn once per layer and route, or raise with ``strict=True``."""
    peak = plan.footprints[choice].peak
    if not budget.memory.explicit and (budget.hard is None or peak <= budget.hard):
        return  # the default budget (the captured size) is a preference, not a limit the user set
    message = (
        f"dp_microclip: no exact clipping route of layer {plan.name!r} fits the memory budget "
        f"({_size(max(budget.left, 0))} left for it); the leanest, {choice!r}, plans {_size(peak)}. Use smaller "
        "physical batches (engine.data_loader(dataset, max_physical_batch_size=...)), or a larger memory_budget."
    )
    if budget.memory.strict:
        raise ConfigurationError(message)
    key = ("over budget", plan.name, choice)
    if key not in tuner.warned:
        tuner.warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=user_stacklevel())


class Autotuner:
    """Times each candidate route once per (layer, shape class) and remembers the fastest.

    The shape class buckets the rows per group and the batch size to powers of two,
    so Poisson-sampled batches of varying size do not trigger a new measurement.
    """

    TIE = 0.10  # routes within 10% of the fastest count as equally fast

    VARIANT_REPEATS = 5
    MAX_PASS_PLANS = 256  # pass signatures whose routes are kept (pass_routes)

    def __init__(self):
        self.choices: dict = {}  # the one timing cache: (kind, key) -> the fastest candidate
        self.pass_routes: dict = {}  # pass_signature -> the route of each record (pass_routes)
        self.free_memory: dict = {}  # device name -> free bytes, read once (the memory budget's fractions)
        self.warned: set = set()  # (reason, layer, route) already warned about

    def fastest(self, key: Hashable, candidates: Mapping[str, Callable[[], object]], device: torch.device,
                repeats: int) -> str:
        """The name of the fastest candidate for ``key``: timed the first time, then remembered."""
        if key not in self.choices:
            timings = best_times(candidates, device, repeats)
            self.choices[key] = min(timings, key=timings.__getitem__)
        return self.choices[key]

    def group_grads(self, record: Record, groups) -> dict:
        """The rule's group gradients, from its fastest variant for these shapes (timed once per shape class)."""
        assert record.rule is not None and isinstance(record.out_grad, torch.Tensor)  # routes are for rule records
        rule, args = record.rule, (record.layer, record.inputs, record.out_grad, groups)
        key = rule.variant_key(*args) if rule.variants and rule.variant_key is not None else None
        if key is None:
            return rule.group_grads(*args)
        assert rule.variants is not None  # a key is only computed with variants
        runs = {name: (lambda fn=fn: fn(*args)) for name, fn in rule.variants.items()}
        name = self.fastest(("variant", type(record.layer), key), runs, record.out_grad.device, self.VARIANT_REPEATS)
        return rule.variants[name](*args)

    @staticmethod
    def _key(record: Record, groups) -> tuple:
        a = next(x for x in record.inputs if torch.is_tensor(x))
        assert isinstance(record.out_grad, torch.Tensor)  # rule records have one output tensor
        bucket = lambda n: max(1, int(n)).bit_length()  # noqa: E731
        return (record.name, bucket(groups.num_groups), bucket(groups.max_size()), bucket(a.shape[0]),
                tuple(a.shape[2:]), tuple(record.out_grad.shape[2:]), a.shape[1] if a.dim() > 2 else None)

    def choose(self, record: Record, groups, candidates: list[str]) -> str:
        """The route for this record: timed once per (layer, shape class), then remembered."""
        key = ("route", self._key(record, groups))
        if key not in self.choices:
            timings = self._time_routes(record, groups, candidates)
            fastest = min(timings.values())
            # Memory breaks near-ties: among routes within TIE of the fastest, take the one that holds the least
            # (ghost holds nothing extra, norms_then_sum one layer's group gradients briefly, materialize keeps them
            # until the clip factors are known). Timing noise alone is a few percent.
            near = [c for c in MEMORY_ORDER if c in timings and timings[c] <= fastest * (1 + self.TIE)]
            self.choices[key] = near[0]
        choice = self.choices[key]
        return choice if choice in candidates else candidates[0]  # candidates: least memory first

    REPEATS = 3

    def _time_routes(self, record: Record, groups, routes: list[str]) -> dict[str, float]:
        """Best time of each route (interleaved repeats, see :func:`best_times`)."""
        runs = {route: self._runner(record, groups, route) for route in routes}
        assert isinstance(record.out_grad, torch.Tensor)  # rule records have one output tensor
        return best_times(runs, record.out_grad.device, self.REPEATS)

    def _runner(self, record: Record, groups, route: str) -> Callable[[], None]:
        """The work one route does for this record, as a call to time."""
        assert isinstance(record.out_grad, torch.Tensor)  # rule records have one output tensor
        rule, args = record.rule, (record.layer, record.inputs, record.out_grad)
        weights = {name: torch.ones(groups.batch_size, device=record.out_grad.device) for name in record.params}

        def run():
            if route == "ghost":
                rule.group_sq_norms(*args, groups)
                rule.weighted_sum(*args, weights)
            elif route == "norms_then_sum":
                for g in self.group_grads(record, groups).values():
                    torch.linalg.vector_norm(g.flatten(1), dim=1)
                rule.weighted_sum(*args, weights)
            else:
                for g in self.group_grads(record, groups).values():
                    torch.linalg.vector_norm(g.flatten(1), dim=1)
                    torch.einsum("m,m...->...", torch.ones(g.shape[0], dtype=g.dtype, device=g.device), g)

        return run
