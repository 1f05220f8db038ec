"""See what micro-batch clipping does to each step, and which examples it mutes.

Two opt-in observers, attached with ``engine.add_observer(...)``:

* :class:`ClipMonitor` - per step: the distribution of micro-batch gradient
  norms (min, which is the adaptive bound; median; max), the fraction of
  micro-batches clipped, the update norm before and after clipping and the
  cosine between the clipped and the unclipped average. It reads what the
  engine already computed (group norms and clip factors) plus one weighted
  product per layer for the unclipped sum: no extra backward pass.
* :class:`DraggerProbe` - every ``every`` steps, on a held batch: each
  example's gradient norm, its cosine to the batch mean, and the weight its
  micro-batch would receive under the engine's clipping. Pass ``flags`` (e.g.
  the examples whose labels you flipped) and :meth:`DraggerProbe.summary`
  shows whether the flagged examples are the ones being muted.

Why: noise-free micro-batch clipping helps only when a few micro-batches have
much larger gradients than the rest ("draggers", Wang 2024). These numbers say
whether that is happening on your data: a clipped fraction near 0 means the
engine does nothing; a cosine near 0 means it throws most of the gradient away.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from torch import nn
    >>> import dp_microclip
    >>> from dp_microclip.tools.diagnostics import ClipMonitor
    >>> model = nn.Linear(4, 3)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.1)
    >>> monitor = ClipMonitor()
    >>> handle = engine.add_observer(monitor)
    >>> F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
    >>> opt.step()
    >>> sorted(monitor.records[0])[:3]
    ['bound', 'clipped_fraction', 'clipped_update_norm']
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .. import clipping as clip
from ..aggregate import unclipped_sums
from ..errors import ConfigurationError

__all__ = ["ClipMonitor", "DraggerProbe", "write_csv"]

#: A group counts as clipped when its effective factor is below ``1 - CLIP_TOLERANCE``.
CLIP_TOLERANCE = 1e-6


def write_csv(records: Sequence[dict], path) -> None:
    """Write a list of dicts as CSV (columns: the union of keys, in first-seen order).

    Why a helper: records of different steps may miss a key (e.g. no cosine when
    unclipped tracking is off), and ``csv.DictWriter`` needs every column up front.
    """
    columns: list[str] = []
    for row in records:
        for key in row:
            if key not in columns:
                columns.append(key)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(records)


def _contexts_in_order(records) -> list:
    """The forward contexts of a pass, in the order ``clip_and_sum`` visits them (first appearance)."""
    seen: dict[int, Any] = {}
    for record in records:
        seen.setdefault(record.ctx.id, record.ctx)
    return list(seen.values())


class ClipMonitor:
    """Per-step statistics of micro-batch clipping, as a list of dicts and optional TensorBoard scalars.

    Attach with ``engine.add_observer(ClipMonitor(...))``. One record per
    optimizer step (all backward passes of the step together), with keys:

    * ``step``: ``engine.steps_taken`` after the step (1 for the first).
    * ``num_groups``: non-empty micro-batches of the step.
    * ``norm_min``, ``norm_median``, ``norm_mean``, ``norm_max``: micro-batch gradient norms
      ``||g_j||`` (``norm_min`` is the adaptive bound ``rho``).
    * ``bound``: the bound in force: ``C`` (fixed, normalize, per_layer) or ``rho`` (adaptive).
    * ``clipped_fraction``: micro-batches whose effective factor is below 1 (NaN for per_layer,
      whose factors are per parameter).
    * ``weight_min``, ``weight_mean``: effective clip factors (adaptive: ``rho / ||g_j||``).
    * ``unclipped_update_norm``, ``clipped_update_norm``, ``cosine``: the norms of the average
      unclipped and clipped micro-batch gradients and the cosine between them (1 when nothing
      is clipped). Noise (DP mode) is not included: these describe clipping alone. Only when
      ``track_unclipped=True`` (the default); the unclipped sum costs one weighted product per
      layer, the size of one ordinary weight gradient.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (optional; tensorboard is not a
            dependency of dp-microclip). Each key is written as ``{tag}/{key}``.
        every: keep (and write) one step in ``every``; the others cost nothing beyond the
            bookkeeping of the pass.
        track_unclipped: compute the unclipped average (update norm before clipping, cosine).
        tag: the TensorBoard prefix.
    """

    def __init__(self, writer=None, every: int = 1, track_unclipped: bool = True, tag: str = "microclip"):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigurationError(f"ClipMonitor(every=...) takes an integer >= 1. Found {every!r}.")
        self.writer = writer
        self.every = every
        self.track_unclipped = bool(track_unclipped)
        self.tag = tag
        self.records: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._norms: list[torch.Tensor] = []
        self._factors: list[torch.Tensor | None] = []
        self._clipped: dict[int, torch.Tensor] = {}  # id(param) -> running weighted clipped mean
        self._unclipped: dict[int, torch.Tensor] = {}
        self._weight = 0.0  # groups seen this step (the weights of the running means)

    def _wanted(self, engine) -> bool:
        return (engine.steps_taken + 1) % self.every == 0

    def on_pass(self, engine, records, result) -> None:
        """Collect one backward pass: group norms, factors, clipped and (optionally) unclipped means."""
        if not self._wanted(engine):
            return
        contexts = _contexts_in_order(records)
        for ctx, norms, factors in zip(contexts, result.group_norms, result.group_factors):
            sizes = ctx.groups.sizes.to(norms.device)
            nonempty = sizes > 0
            self._norms.append(norms.detach()[nonempty].double().cpu())
            self._factors.append(None if factors is None else factors.detach()[nonempty].double().cpu())
        if not self.track_unclipped or result.num_groups == 0:
            return
        new = float(result.num_groups)
        total = self._weight + new
        keep, add = self._weight / total, new / total
        # result.sums tensors become the engine's step accumulators and are changed in place later: copy now.
        for pid, (p, value) in result.sums.items():
            v = value.detach().double()
            self._clipped[pid] = v.clone() if pid not in self._clipped else self._clipped[pid] * keep + v * add
        plain = unclipped_sums(records, engine.silenced)
        sizes = sum(ctx.batch_size for ctx in contexts)
        to_mean = 1.0 if engine.settings.clip.loss_reduction == "mean" else 1.0 / max(sizes, 1)
        for pid, value in plain.items():
            v = value.detach().double() * to_mean
            self._unclipped[pid] = v.clone() if pid not in self._unclipped else self._unclipped[pid] * keep + v * add
        self._weight = total

    def on_step(self, engine) -> None:
        """Turn the step's passes into one record (and TensorBoard scalars)."""
        if not self._norms:
            self._reset()
            return
        norms = torch.cat(self._norms)
        mode = engine.clipping
        row: dict = {"step": engine.steps_taken, "num_groups": int(norms.numel())}
        if norms.numel():
            row.update(norm_min=float(norms.min()), norm_median=float(norms.quantile(0.5)),
                       norm_mean=float(norms.mean()), norm_max=float(norms.max()))
        rho = float(norms.min()) if norms.numel() else 0.0
        row["bound"] = rho if mode == "adaptive" else float(engine.max_grad_norm)
        if any(f is None for f in self._factors) or not norms.numel():
            row["clipped_fraction"] = math.nan
        else:
            factors = torch.cat([f for f in self._factors if f is not None])  # none is None here
            if mode == "adaptive":
                factors = factors * rho
            row["clipped_fraction"] = float((factors < 1 - CLIP_TOLERANCE).double().mean())
            row["weight_min"] = float(factors.min())
            row["weight_mean"] = float(factors.mean())
        if self.track_unclipped and self._clipped:
            scale = rho if mode == "adaptive" else 1.0
            dot = sq_c = sq_u = 0.0
            for pid in set(self._clipped) | set(self._unclipped):
                c = self._clipped.get(pid)
                u = self._unclipped.get(pid)
                if c is not None:
                    sq_c += float(c.square().sum()) * scale ** 2
                if u is not None:
                    sq_u += float(u.square().sum())
                if c is not None and u is not None:
                    dot += float((c * u).sum()) * scale
            row["unclipped_update_norm"] = math.sqrt(sq_u)
            row["clipped_update_norm"] = math.sqrt(sq_c)
            denom = math.sqrt(sq_u * sq_c)
            row["cosine"] = dot / denom if denom > 0 else math.nan
        self.records.append(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{self.tag}/{key}", value, row["step"])
        self._reset()

    def to_csv(self, path) -> None:
        """Write :attr:`records` to ``path`` as CSV (one row per kept step)."""
        write_csv(self.records, path)


class DraggerProbe:
    """Every ``every`` steps, per-example diagnostics on a held batch: who would be muted, and how much.

    For each example ``i`` of the held batch ``(x, y)``: its gradient norm
    ``||g_i||``, the cosine between ``g_i`` and the batch mean gradient, and the
    weight its micro-batch receives, ``||clip(g_j)|| / ||g_j||`` for the
    micro-batch ``j`` holding ``i`` (contiguous groups of ``b`` rows, as the engine
    forms them; adaptive: ``rho / ||g_j||`` with ``rho`` the smallest micro-batch
    norm of the held batch). Weights are comparable across examples of one probe:
    a flagged example whose micro-batch weight is far below the others' is being
    muted. Gradients come from ``torch.func`` (``vmap`` over ``grad``) in eval mode,
    outside the engine (its hooks are paused), so the probe never changes training.

    Use it as an observer (``engine.add_observer(probe)``: the engine's ``b``,
    clipping mode, ``C`` and ``gamma``), or call :meth:`measure` yourself, e.g. on a
    run without clipping to see what clipping *would* do.

    Args:
        x: the held inputs (first dimension: examples). Keep it small (32-256).
        y: the held targets.
        loss_fn: ``loss_fn(output, target)``, the mean loss (e.g. ``F.cross_entropy``).
        every: measure when ``engine.steps_taken % every == 0`` (and at step 1).
        flags: optional bool per example (e.g. ``True`` for a flipped label), copied into
            every row and used by :meth:`summary`.
        ids: optional identifier per example (default: its row).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable, every: int = 50,
                 flags: Sequence[bool] | torch.Tensor | None = None, ids: Sequence | None = None):
        if len(x) != len(y):
            raise ConfigurationError(f"DraggerProbe: x has {len(x)} examples but y has {len(y)}. Pass matching rows.")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ConfigurationError(f"DraggerProbe(every=...) takes an integer >= 1. Found {every!r}.")
        n = len(x)
        if flags is not None and len(flags) != n:
            raise ConfigurationError(f"DraggerProbe: {len(flags)} flags for {n} examples. Give one flag per row.")
        if ids is not None and len(ids) != n:
            raise ConfigurationError(f"DraggerProbe: {len(ids)} ids for {n} examples. Give one id per row.")
        self.x, self.y, self.loss_fn, self.every = x, y, loss_fn, every
        self.flags = None if flags is None else [bool(f) for f in (flags.tolist() if torch.is_tensor(flags) else flags)]
        self.ids = list(range(n)) if ids is None else list(ids)
        self.records: list[dict] = []

    # ------------------------------------------------------------------ observer protocol
    def on_step(self, engine) -> None:
        """Measure with the engine's settings on step 1 and every ``every`` steps."""
        step = engine.steps_taken
        if step == 1 or step % self.every == 0:
            settings = engine.settings.clip
            with engine.silenced():  # the engine's hooks stay silent during the probe's forward passes
                self.measure(engine.model, step, micro_batch_size=engine.micro_batch_size,
                             clipping=engine.clipping, max_grad_norm=engine.max_grad_norm, gamma=settings.gamma)

    # ------------------------------------------------------------------ measurement
    def per_example_grads(self, model: nn.Module) -> torch.Tensor:
        """``(n, P)``: every example's flattened gradient of ``loss_fn`` at the current parameters.

        Why torch.func: one vectorised pass for the whole held batch instead of n backward passes.
        """
        from torch.func import functional_call, grad, vmap

        names = [n for n, p in model.named_parameters()]
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}

        def loss_one(p, xi, yi):
            out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return self.loss_fn(out, yi.unsqueeze(0))

        was_training = model.training
        model.eval()
        try:
            grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, self.x, self.y)
        finally:
            model.train(was_training)
        return torch.cat([grads[n].reshape(len(self.x), -1) for n in names], dim=1)

    def measure(self, model: nn.Module, step: int, micro_batch_size: int, clipping: str = "fixed",
                max_grad_norm: float = 1.0, gamma: float = 0.01) -> list[dict]:
        """Probe ``model`` now; append and return one row per example.

        Args:
            model: the model (with or without an engine; call inside ``engine.silenced()``
                when an engine is attached, as :meth:`on_step` does).
            step: the step number written into the rows.
            micro_batch_size: ``b``; the held batch is cut into contiguous groups of ``b`` rows
                (a last, smaller group when ``b`` does not divide it).
            clipping: ``"fixed"``, ``"adaptive"``, ``"normalize"`` or ``"per_layer"`` (treated
                as fixed on the whole vector here).
            max_grad_norm: ``C``.
            gamma: the ``gamma`` of ``normalize``.
        """
        g = self.per_example_grads(model).double()
        n = g.shape[0]
        b = int(micro_batch_size)
        if b < 1:
            raise ConfigurationError(f"micro_batch_size must be >= 1. Found {micro_batch_size!r}.")
        group = torch.arange(n) // b
        m = int(group.max()) + 1
        group_grads = torch.zeros(m, g.shape[1], dtype=g.dtype).index_add_(0, group, g)
        counts = torch.bincount(group, minlength=m).to(g.dtype)
        group_grads /= counts[:, None]
        group_norms = group_grads.norm(dim=1)
        whole = "fixed" if clipping == "per_layer" else clipping  # per_layer: fixed on the whole vector here
        weights = clip.group_factors(whole, group_norms, float(max_grad_norm), float(gamma))
        if clipping == "adaptive":
            weights = weights * group_norms.min()  # rho: the smallest micro-batch norm of the held batch
        mean = g.mean(0)
        norms = g.norm(dim=1)
        cos = (g @ mean) / (norms * mean.norm()).clamp(min=1e-30)
        rows = []
        for i in range(n):
            j = int(group[i])
            row = {"step": int(step), "id": self.ids[i], "grad_norm": float(norms[i]), "cosine_to_mean": float(cos[i]),
                   "group": j, "group_norm": float(group_norms[j]), "weight": float(weights[j])}
            if self.flags is not None:
                row["flagged"] = self.flags[i]
            rows.append(row)
        self.records.extend(rows)
        return rows

    def summary(self) -> list[dict]:
        """Per probed step: mean grad norm, cosine and micro-batch weight of flagged vs other examples.

        Why: the paper's claim is that clipping mutes draggers; if it does here, the
        flagged examples' mean weight and cosine sit below the others'.
        Without ``flags`` only the ``all_*`` columns are filled.
        """
        by_step: dict[int, list[dict]] = {}
        for row in self.records:
            by_step.setdefault(row["step"], []).append(row)
        out = []
        for step, rows in sorted(by_step.items()):
            entry: dict = {"step": step}
            parts = {"all": rows}
            if self.flags is not None:
                parts["flagged"] = [r for r in rows if r["flagged"]]
                parts["other"] = [r for r in rows if not r["flagged"]]
            for name, part in parts.items():
                for key in ("grad_norm", "cosine_to_mean", "weight"):
                    entry[f"{name}_{key}"] = (sum(r[key] for r in part) / len(part)) if part else math.nan
            out.append(entry)
        return out

    def to_csv(self, path) -> None:
        """Write every per-example row to ``path`` as CSV."""
        write_csv(self.records, path)
