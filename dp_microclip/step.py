"""The step's arithmetic: sum the clipped means of every pass, then rho, noise, cast, ``p.grad``.

One place for what reaches ``p.grad``, used by the single-process engine and by
multi-process training alike (``distributed.py`` only plugs a reducer in between):

    p.grad = rho * (mean over the step's groups of f_j g_j) + N(0, (z C / M)^2)

with ``f_j`` the clip factors (already applied per pass by ``aggregate.py``),
``M`` the number of groups of every pass of the step (the public constant in DP
mode), ``rho`` the smallest micro-batch norm for adaptive clipping (Wang,
Algorithm 1) and 1 otherwise.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol
from dataclasses import dataclass, field

import torch
from torch import nn

from .aggregate import PassResult, merge_means
from .errors import ConfigurationError, PrivacyError
from .noise import NoiseLike
from .tensors import accumulation_dtype


@dataclass
class StepAccumulator:
    """What the backward passes since the last step contributed (reset by every step).

    Attributes:
        sums: ``id(p) -> (p, clipped mean over groups_seen groups)``.
        groups_seen: the divisor of ``sums`` (the public ``M`` per pass in DP mode).
        min_norm: the smallest non-empty micro-batch norm (adaptive clipping's bound).
        passes: backward passes since the last step.
        contexts: ids of the forward passes those backward passes came from, each with its number of passes.
        unsampled: some pass's batch was not drawn by ``engine.data_loader``.
        last_batch_size: the batch size of the latest forward pass (0: an empty Poisson batch).
        batch_sums, batch_groups: the clipped mean of the current logical batch's chunks so far, and its divisor.
        batch_chunks: chunks of the current logical batch the model consumed.
        logical_batches: logical batches ``engine.data_loader`` drew that began since the last step.
        open_batch: chunks of the current logical batch are still to come (the step waits for them).
    """

    sums: dict = field(default_factory=dict)
    groups_seen: float = 0.0
    min_norm: float = math.inf
    passes: int = 0
    contexts: Counter = field(default_factory=Counter)
    unsampled: bool = False
    last_batch_size: int | None = None
    batch_sums: dict = field(default_factory=dict)
    batch_groups: float = 0.0
    batch_chunks: int = 0
    logical_batches: int = 0
    open_batch: bool = False

    def new_forward(self, batch_size: int, chunk, dp: bool = False) -> None:
        """A forward pass of ``batch_size`` examples consumed ``chunk`` (a ``sampling.Chunk``) of a logical batch
        drawn by ``engine.data_loader``, or None (not from the loader).

        DP mode: a new sampled batch while the last one's backward pass waits for its step is refused now, not
        at the next epsilon: that batch's gradient never reached the attached optimizer (a hand-written update
        sees no ``.grad``, which the engine writes, noised, in ``optimizer.step()``), so nothing trained."""
        self.last_batch_size = batch_size
        if chunk is None:
            return
        if dp and chunk.first and self.passes:
            raise PrivacyError(
                "DP mode: a new sampled batch reached the model while the last one's backward pass never reached "
                "optimizer.step(), so it trained nothing: the engine writes the clipped, noised gradient into .grad "
                "in the attached optimizer's step, and a hand-written update (p -= lr * p.grad) sees none. Call "
                "optimizer.step() after each batch's backward (zero_grad() before the next), with any torch.optim "
                "optimizer; one sampled batch is one step (two sampled batches cannot share one)."
            )
        if chunk.first:
            self.close_batch()
            self.logical_batches += 1
            self.batch_chunks = 0
        self.batch_chunks += 1
        self.open_batch = not chunk.last

    def note_contexts(self, records: list) -> bool:
        """Count the forward passes one backward pass's records came from; True if the loader drew them all."""
        drawn = all(r.ctx.drawn_by_engine for r in records)
        self.unsampled |= not drawn
        self.contexts.update({r.ctx.id for r in records})
        return drawn

    def add(self, result: PassResult, *, chunk: bool = False, fixed_divisor: bool = False) -> None:
        """Merge one backward pass's clipped means.

        Passes of different batches are averaged, weighted by their group counts (noise-free
        accumulation). A ``chunk`` of the current logical batch joins that batch's mean: with a
        ``fixed_divisor`` (every chunk divided by the same ``M``: the public one in DP mode, or keyed
        groups) the chunks' means ADD, since together they are one batch's sum over ``M``; otherwise
        (one group per example or slice, ``M`` the chunk's own count) they average like passes.
        """
        if chunk and fixed_divisor and self.batch_groups:
            for pid, (p, value) in result.sums.items():
                if pid in self.batch_sums:
                    self.batch_sums[pid][1].add_(value)
                else:
                    self.batch_sums[pid] = (p, value.clone())
        elif chunk:
            self.batch_sums, self.batch_groups = merge_means(self.batch_sums, self.batch_groups, result.sums,
                                                             result.num_groups)
        else:
            self.sums, self.groups_seen = merge_means(self.sums, self.groups_seen, result.sums, result.num_groups)
        self.min_norm = min(self.min_norm, result.min_norm)
        self.passes += 1

    def finish_batch(self) -> bool:
        """At a step: False while chunks of the current logical batch are still to come (no update yet);
        else merge the finished logical batch into the step's mean and return True."""
        if self.open_batch:
            return False
        self.close_batch()
        return True

    def close_batch(self) -> None:
        """Merge the finished logical batch into the step's mean (a step, or the next logical batch, calls it)."""
        if self.batch_groups:
            self.sums, self.groups_seen = merge_means(self.sums, self.groups_seen, self.batch_sums,
                                                      self.batch_groups)
            self.batch_sums, self.batch_groups = {}, 0.0

    def chunk_facts(self) -> dict:
        """What the DP guard needs to know of a step's chunks (``privacy.check_dp_step``'s keywords)."""
        return {"chunks": self.batch_chunks, "logical_batches": self.logical_batches,
                "most_passes_per_forward": max(self.contexts.values(), default=0), "foreign": self.unsampled}


def hold_update(managed: list[nn.Parameter]) -> None:
    """A step on a chunk whose logical batch is not finished: no gradient, so the optimizer changes nothing.

    ``p.grad = None`` on every managed parameter: torch optimizers (SGD with momentum, Adam,
    AdamW, ...) skip such parameters entirely, so no parameter, moment or step count changes.
    """
    for p in managed:
        p.grad = None


#: ``(managed, accumulator, dp, global_groups) -> None``: combines every process's accumulator in place
#: before noise (``distributed.StepReducer``). ``global_groups``: every process's means are already divided
#: by one global M (keyed groups of one global group space).
Reducer = Callable[[list, StepAccumulator, bool, bool], None]


class GradPlacement(Protocol):
    """Where a parameter's gradients live when it is not a plain tensor (FSDP2's sharded DTensor, ``fsdp.py``).

    The engine computes every clipped sum and the noise at the parameter's full (logical) shape, as on one
    process; the placement turns that full-shape gradient into what ``p.grad`` takes, and names the tensor
    that stands for ``p`` in autograd's graph (the first steps' check hooks it).
    """

    def to_grad(self, p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """What ``p.grad`` takes for the full-shape gradient ``full`` (already in ``p``'s dtype)."""

    def leaf(self, p: nn.Parameter) -> HookTarget:
        """The tensor whose gradient is autograd's gradient of ``p`` (``p`` itself for a plain parameter)."""


class HookTarget(Protocol):
    """Something that takes tensor hooks as a parameter does (a parameter, or a stand-in that forwards them)."""

    def register_hook(self, hook: Callable) -> Any:
        """As ``torch.Tensor.register_hook``; returns a handle with ``remove()``."""

    def register_post_accumulate_grad_hook(self, hook: Callable) -> Any:
        """As ``torch.Tensor.register_post_accumulate_grad_hook``; returns a handle with ``remove()``."""


@dataclass(frozen=True)
class ProcessParts:
    """What several processes plug into an engine (``dp_microclip.distributed``); None: one process.

    Attributes:
        reducer: combines every process's step accumulator before noise (``step.Reducer``).
        wrap_noise: wraps the engine's noise source (one draw broadcast to every process).
        sampler_factory: builds the loader's batch sampler (each process keeps its share of one batch).
        seed_is_secret: the engine's seed was drawn from ``secrets`` and shared by the processes, not given.
        share: which rows of one global batch this process keeps, from their group keys (user-level DP).
        placement: where p.grad and autograd's own gradient of p live (FSDP2's sharded parameters, fsdp.py).
    """

    reducer: Reducer | None = None
    wrap_noise: Callable[[NoiseLike], NoiseLike] | None = None
    sampler_factory: Callable | None = None
    seed_is_secret: bool = False
    share: Callable[[torch.Tensor], torch.Tensor] | None = None
    placement: GradPlacement | None = None


def adaptive_bound(min_norm: float) -> float:
    """rho of adaptive clipping: the smallest micro-batch norm of the step (0 when no group had a norm)."""
    return 0.0 if math.isinf(min_norm) else min_norm


def write_gradients(managed: list[nn.Parameter], acc: StepAccumulator, *, rho: float, noise_std: float,
                    noise: NoiseLike | None, placement: GradPlacement | None = None) -> None:
    """``p.grad = rho * mean + N(0, (noise_std / M)^2)`` for every managed parameter, in its own dtype.

    A parameter that no pass of the step reached (no record: its module was not called, its output got
    no gradient, or its module's forward never touched it) differs by mode. Noise-free, its ``p.grad``
    is left exactly as it was, as plain PyTorch leaves the gradient of a parameter no backward reached:
    ``None`` after ``zero_grad()``, so that AdamW or SGD with momentum skip it (no weight decay, no
    moment update); the zeros of ``zero_grad(set_to_none=False)``, which they do update; the unchanged
    old gradient without ``zero_grad``; a logical batch in chunks: ``None``, which ``hold_update`` wrote
    at the held chunks' steps. With noise (DP mode) it gets zero plus noise like every other
    parameter: whether a batch used a parameter depends on its examples, so leaving it out would
    reveal that without noise. On several
    processes the reducer has made ``acc.sums`` the same on every rank first (a parameter used on one
    rank is present on all), so every rank takes the same branch. The noise is ONE draw per
    (dtype, device) into a flat buffer, added with one foreach op, instead of a draw per tensor: on a
    GPU every launch counts (``benchmarks/launches.py``). Sums and noise are full-shape; a ``placement``
    (FSDP2) makes each ``p.grad`` from its full-shape gradient: every process holds the same full
    gradient (one noise draw), and each keeps its own shard of it.
    """
    std = noise_std / acc.groups_seen if noise_std > 0.0 else 0.0
    totals: list[tuple[nn.Parameter, torch.Tensor]] = []
    for p in managed:
        entry = acc.sums.get(id(p))
        if entry is None and std == 0.0:
            continue  # noise-free: untouched, as plain PyTorch leaves a parameter no backward reached
        if entry is None:  # DP: noise only (full shape, FSDP too); a zeros launch only for such a parameter
            totals.append((p, torch.zeros(p.shape, dtype=accumulation_dtype(p.dtype), device=p.device)))
        else:
            totals.append((p, entry[1]))
    if rho != 1.0 and totals:
        torch._foreach_mul_([t for _, t in totals], rho)
    if std > 0.0 and totals:
        assert noise is not None
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for _, t in totals:
            buckets.setdefault((t.dtype, t.device), []).append(t)
        for (dtype, device), tensors in buckets.items():
            flat = noise.gaussian_like(torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device), std)
            parts = [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
            torch._foreach_add_(tensors, parts)
    for p, total in totals:
        grad = total if total.dtype == p.dtype else total.to(p.dtype)
        p.grad = grad if placement is None else placement.to_grad(p, grad)


def refuse_closure(args, kwargs) -> None:
    """Refuse ``optimizer.step(closure)``: its backward would run after the engine wrote the gradients."""
    if kwargs.get("closure") is not None or any(callable(a) for a in args):
        raise ConfigurationError(
            "optimizer.step(closure) is not supported: the optimizer would run the closure's backward pass "
            "after the engine has written the gradients. Call loss.backward() yourself, then "
            "optimizer.step() without a closure."
        )


def step_bound(clipping: str, acc: StepAccumulator, warn_once) -> float:
    """``rho`` of this step: 1, or the smallest group norm under adaptive clipping (warning once when 0)."""
    if clipping != "adaptive":
        return 1.0
    rho = adaptive_bound(acc.min_norm)
    if rho == 0.0:
        warn_once(
            "zero_rho",
            "Adaptive clipping: the smallest micro-batch gradient norm is 0, so the bound rho is 0 "
            "and this step is zero. A micro-batch whose gradient vanishes stops training; consider "
            'clipping="fixed".', RuntimeWarning)
    return rho
