"""nn.PReLU, nn.Bilinear and the affine parameters of nn.InstanceNorm1d / 2d / 3d.

PReLU (He et al., "Delving Deep into Rectifiers", 2015, section 2.1):

    y = max(0, x) + w_c * min(0, x)          w: (P,), P = 1 or the channels C at dim 1
    dL/dw_c = sum over positions of channel c of  G * min(0, x)

(torch's ``prelu`` backward gives ``x * G`` where ``x <= 0`` and 0 elsewhere:
the same thing.) ``w`` has at most C elements: group gradients are materialised.
Input layout: batch at dim 0, channels at dim 1 (torch's convention when P > 1):
x and out_grad ``(B, C, *S)``; with P = 1 any layout with the batch at dim 0.

Bilinear (``F.bilinear``: ``y_k = x1^T W_k x2 + b_k``), rows ``n`` of a group
(every example's leading positions flattened), ``g_n = dL/dy_n``:

    dL/dW = sum_n g_n (x) a_n (x) c_n          (p, d1, d2)   a = x1 rows, c = x2 rows
    ||dL/dW||^2 = sum_{n,n'} (g_n.g_n') (a_n.a_n') (c_n.c_n')          (three Gram matrices)

The Gram form is the ghost-norm identity of Li et al. 2021 (``||sum_n g_n a_n^T||^2
= <A A^T, G G^T>``) with the outer product taken over a third factor: the
inner product of two rank-one tensors is the product of their factors' inner
products. It costs ~N^2 (p + d1 + d2) per group instead of N p d1 d2, so the
rule has full ghost support and the autotuner picks the faster route.
Input layout: batch at dim 0, features last: x1 ``(B, *, d1)``, x2 ``(B, *, d2)``, out_grad ``(B, *, p)``.
InstanceNorm (``affine=True``): ``y = x_hat * w + b`` with ``x_hat`` normalised per example and channel
over the spatial positions, so each example's gradient is ``sum_S G * x_hat`` and ``sum_S G`` per
channel, as for GroupNorm with one channel per group. ``x_hat`` is recomputed from the captured input
with the statistics the forward used: the input's own in training or without running statistics, the
running ones in eval with ``track_running_stats=True`` (never updated here).
Input layout: x and out_grad ``(B, C, *S)``.
Letters: B examples, M groups, N rows per group (examples x positions), p out features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..grouping import Groups
from .registry import LayerRule, register_rule


# --------------------------------------------------------------------------------------------- PReLU
def prelu_group_grads(layer: nn.PReLU, inputs, out_grad, groups: Groups) -> dict:
    """``{"weight": (M, P)}``: per group, ``sum G * min(0, x)`` over every dim but the channel (module docstring)."""
    x = inputs[0]
    contrib = out_grad * x.clamp(max=0)  # (B, C, *S) or (B, *)
    n_params = layer.weight.numel()
    if n_params == 1:
        per_example = contrib.reshape(contrib.shape[0], -1).sum(1, keepdim=True)  # (B, 1)
    else:
        per_example = contrib.reshape(contrib.shape[0], contrib.shape[1], -1).sum(-1)  # (B, C)
    return {"weight": groups.sum(per_example).reshape(groups.num_groups, *layer.weight.shape)}  # (M, P)


# ------------------------------------------------------------------------------------------ Bilinear
def _bilinear_rows(inputs, out_grad):
    x1, x2 = inputs[0], inputs[1]
    batch = out_grad.shape[0]
    a = x1.reshape(batch, -1, x1.shape[-1])  # (B, T, d1)
    c = x2.reshape(batch, -1, x2.shape[-1])  # (B, T, d2)
    g = out_grad.reshape(batch, -1, out_grad.shape[-1])  # (B, T, p)
    return a, c, g


def bilinear_group_grads(layer: nn.Bilinear, inputs, out_grad, groups: Groups) -> dict:
    """``{"weight": (M, p, d1, d2), "bias": (M, p)}``: ``sum_n g_n (x) a_n (x) c_n`` per group."""
    a, c, g = _bilinear_rows(inputs, out_grad)
    pa, pc, pg = (groups.pad(t).flatten(1, 2) for t in (a, c, g))  # (M, N, d1), (M, N, d2), (M, N, p)
    m, p, d1, d2 = groups.num_groups, g.shape[-1], a.shape[-1], c.shape[-1]
    ga = (pg.unsqueeze(-1) * pa.unsqueeze(-2)).flatten(2)  # (M, N, p*d1)
    out = {"weight": torch.bmm(ga.transpose(1, 2), pc).reshape(m, p, d1, d2)}  # (M, p, d1, d2)
    if layer.bias is not None:
        out["bias"] = groups.sum(g.sum(1))  # (M, p)
    return out


def bilinear_group_sq_norms(layer: nn.Bilinear, inputs, out_grad, groups: Groups) -> dict:
    """``{"weight": (M,), "bias": (M,)}`` from three Gram matrices per group (module docstring)."""
    a, c, g = _bilinear_rows(inputs, out_grad)
    pa, pc, pg = (groups.pad(t).flatten(1, 2) for t in (a, c, g))  # (M, N, .)
    gram = lambda t: torch.bmm(t, t.transpose(1, 2))  # noqa: E731  (M, N, N)
    out = {"weight": (gram(pg) * gram(pa) * gram(pc)).sum((1, 2))}  # (M,)
    if layer.bias is not None:
        out["bias"] = torch.linalg.vector_norm(groups.sum(g.sum(1)), dim=-1).square()  # (M,)
    return out


def bilinear_weighted_sum(layer: nn.Bilinear, inputs, out_grad, row_weight: dict) -> dict:
    """``sum_i w_i grad_i``: one product over all rows, each output-gradient row scaled by its example's weight."""
    a, c, g = _bilinear_rows(inputs, out_grad)
    out = {}
    if "weight" in row_weight:
        gw = g * row_weight["weight"].to(g.dtype)[:, None, None]  # (B, T, p)
        ga = (gw.unsqueeze(-1) * a.unsqueeze(-2)).flatten(2).flatten(0, 1)  # (B*T, p*d1)
        out["weight"] = (ga.t() @ c.flatten(0, 1)).reshape(layer.weight.shape)  # (p, d1, d2)
    if layer.bias is not None and "bias" in row_weight:
        out["bias"] = torch.mv(g.sum(1).t(), row_weight["bias"].to(g.dtype))  # (p,)
    return out


def bilinear_group_grad_elements(layer: nn.Bilinear, inputs, out_grad, groups: Groups) -> int:
    """Elements of the (M, p, d1, d2) group gradients (the bias adds only M x p)."""
    return groups.num_groups * layer.weight.numel()


# ------------------------------------------------------------------------------------------ InstanceNorm
def instance_norm_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    """``{"weight": (M, C), "bias": (M, C)}`` of an affine InstanceNorm (module docstring): ``x_hat`` recomputed."""
    x = inputs[0]  # (B, C, *S)
    if layer.training or not layer.track_running_stats:
        x_hat = F.instance_norm(x, eps=layer.eps)  # no running statistics passed: none is updated
    else:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - layer.running_mean.reshape(shape)) / torch.sqrt(layer.running_var.reshape(shape) + layer.eps)
    dims = tuple(range(2, x.dim()))
    out = {}
    if layer.weight is not None:
        out["weight"] = groups.sum((out_grad * x_hat).sum(dims))  # (M, C)
    if layer.bias is not None:
        out["bias"] = groups.sum(out_grad.sum(dims))  # (M, C)
    return out


register_rule(nn.PReLU, LayerRule(prelu_group_grads))
for _norm in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_rule(_norm, LayerRule(instance_norm_group_grads))
register_rule(
    nn.Bilinear,
    LayerRule(bilinear_group_grads, bilinear_group_sq_norms, bilinear_weighted_sum, bilinear_group_grad_elements),
)
