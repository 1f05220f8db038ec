"""The naive micro-batch loop: the test oracle, and a fallback anyone can read.

One forward and one backward per micro-batch, clip the micro-batch gradient,
accumulate, divide by the number of micro-batches. It is slow (M backward
passes per step) and obviously right, which is the point.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .clipping import NORM_EPS


def _index(batch, rows: torch.Tensor, batch_dim: int):
    if torch.is_tensor(batch):
        return batch.index_select(batch_dim, rows.to(batch.device))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_index(b, rows, batch_dim) for b in batch)
    raise TypeError(f"Unsupported batch type {type(batch).__name__}; pass tensors or tuples of tensors.")


def _call(model, inputs):
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def naive_microbatch_grads(
    model: nn.Module,
    loss_fn: Callable,
    inputs,
    targets: torch.Tensor,
    *,
    micro_batch_size: int | None = None,
    group_index: torch.Tensor | None = None,
    num_groups: int | None = None,
    max_grad_norm: float = 1.0,
    clipping: str = "fixed",
    per_param_bounds: dict[str, float] | None = None,
    normalize_gamma: float = 0.01,
    batch_dim: int = 0,
) -> dict[str, torch.Tensor]:
    """``(1/M) sum_j clip(g_j)`` by brute force, one backward per micro-batch.

    Args:
        model: a model with ``requires_grad`` parameters and no engine attached.
        loss_fn: ``loss_fn(output, targets)`` returning the MEAN loss over the
            examples given, so its gradient on micro-batch ``j`` is ``g_j``.
        inputs: a tensor, or a tuple of tensors passed as positional arguments.
        targets: indexed along dimension 0.
        micro_batch_size: contiguous groups of this size; or give ``group_index``
            (``(B,)`` group of each example) and ``num_groups`` (M, empty groups count).
        clipping: "fixed", "adaptive", "per_layer" (with ``per_param_bounds`` by
            parameter name) or "normalize".
        batch_dim: the batch dimension of ``inputs``.

    Returns:
        ``{parameter name: averaged clipped gradient}`` for the trainable parameters some micro-batch's
        backward reached; one that none reached is left out, as plain PyTorch leaves its ``.grad`` None.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    first = inputs[0] if isinstance(inputs, tuple) else inputs
    batch = first.shape[batch_dim]
    if group_index is None:
        if micro_batch_size is None or batch % micro_batch_size:
            raise ValueError("micro_batch_size must divide the batch size (or pass group_index).")
        group_index = torch.arange(batch) // micro_batch_size
        num_groups = batch // micro_batch_size
    elif num_groups is None:
        raise ValueError("group_index needs num_groups (the number of groups M, empty groups included).")
    group_grads: list[dict[str, torch.Tensor] | None] = []
    norms: list[float] = []
    reached: set[str] = set()
    for j in range(num_groups):
        rows = (group_index.cpu() == j).nonzero().flatten()
        if rows.numel() == 0:
            group_grads.append(None)
            norms.append(0.0)
            continue
        model.zero_grad(set_to_none=True)
        loss = loss_fn(_call(model, _index(inputs, rows, batch_dim)), targets.index_select(0, rows.to(targets.device)))
        gs = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        reached.update(n for n, gi in zip(params, gs) if gi is not None)
        g_j = {n: (torch.zeros_like(p) if gi is None else gi) for (n, p), gi in zip(params.items(), gs)}
        group_grads.append(g_j)
        norms.append(math.sqrt(sum(float(t.double().pow(2).sum()) for t in g_j.values())))
    nonempty = [n for n, g in zip(norms, group_grads) if g is not None]
    rho = min(nonempty) if nonempty else 0.0
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for g, norm in zip(group_grads, norms):
        if g is None:
            continue
        for n in total:
            if clipping == "fixed":
                f = min(1.0, max_grad_norm / (norm + NORM_EPS))
            elif clipping == "normalize":
                f = max_grad_norm / (norm + normalize_gamma)
            elif clipping == "adaptive":
                f = rho / norm if norm > 0 else 0.0
            elif clipping == "per_layer":
                if per_param_bounds is None:
                    raise ValueError('clipping="per_layer" needs per_param_bounds (a bound for each parameter name).')
                layer_norm = float(g[n].double().pow(2).sum().sqrt())
                f = min(1.0, per_param_bounds[n] / (layer_norm + NORM_EPS))
            else:
                raise ValueError(clipping)
            total[n] += f * g[n]
    return {n: t / num_groups for n, t in total.items() if n in reached}


def per_example_clipped_mean_func(
    model: nn.Module, per_example_loss: Callable, inputs: torch.Tensor, targets: torch.Tensor, max_grad_norm: float
) -> dict[str, torch.Tensor]:
    """DP-SGD's noise-free clipped mean, from per-example gradients computed with ``torch.func``.

    ``per_example_loss(output, target)`` gets ONE example with a leading batch dim of 1.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_one(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return per_example_loss(out, y.unsqueeze(0))

    per_ex = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, inputs, targets)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_ex.values()))  # (B,)
    factors = (max_grad_norm / (norms + NORM_EPS)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factors, g) / inputs.shape[0] for n, g in per_ex.items()}
