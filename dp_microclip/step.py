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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .aggregate import PassResult, merge_means
from .errors import ConfigurationError
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
        contexts: ids of the forward passes those backward passes came from.
        unsampled: some pass's batch was not drawn by ``engine.data_loader``.
        last_batch_size: the batch size of the latest forward pass (0: an empty Poisson batch).
    """

    sums: dict = field(default_factory=dict)
    groups_seen: float = 0.0
    min_norm: float = math.inf
    passes: int = 0
    contexts: set = field(default_factory=set)
    unsampled: bool = False
    last_batch_size: int | None = None

    def add(self, result: PassResult) -> None:
        """Merge one backward pass's clipped means (weighted by their group counts)."""
        self.sums, self.groups_seen = merge_means(self.sums, self.groups_seen, result.sums, result.num_groups)
        self.min_norm = min(self.min_norm, result.min_norm)
        self.passes += 1


#: ``(managed, accumulator, dp, global_groups) -> None``: combines every process's accumulator in place
#: before noise (``distributed.StepReducer``). ``global_groups``: every process's means are already divided
#: by one global M (keyed groups of one global group space).
Reducer = Callable[[list, StepAccumulator, bool, bool], None]


def adaptive_bound(min_norm: float) -> float:
    """rho of adaptive clipping: the smallest micro-batch norm of the step (0 when no group had a norm)."""
    return 0.0 if math.isinf(min_norm) else min_norm


def write_gradients(managed: list[nn.Parameter], acc: StepAccumulator, *, rho: float, noise_std: float,
                    noise: NoiseLike | None) -> None:
    """``p.grad = rho * mean + N(0, (noise_std / M)^2)`` for every managed parameter, in its own dtype.

    A parameter that no pass reached keeps ``p.grad = None`` (as in plain PyTorch) unless noise is
    added: in DP mode every parameter gets its noise, used or not. The noise is ONE draw per
    (dtype, device) into a flat buffer, added with one foreach op, instead of a draw per tensor: on a
    GPU every launch counts (``benchmarks/launches.py``).
    """
    std = noise_std / acc.groups_seen if noise_std > 0.0 else 0.0
    totals: list[tuple[nn.Parameter, torch.Tensor]] = []
    for p in managed:
        entry = acc.sums.get(id(p))
        if entry is None and std == 0.0:
            p.grad = None
            continue
        totals.append((p, torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) if entry is None else entry[1]))
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
        p.grad = total if total.dtype == p.dtype else total.to(p.dtype)


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
