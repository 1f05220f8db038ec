"""LayerNorm, GroupNorm, RMSNorm, BatchNorm: affine parameters of normalisation layers.

For y = x_hat * w + b, the per-example gradients are sum(G * x_hat) and sum(G)
over the dimensions ``w`` is broadcast over. ``x_hat`` is recomputed from the
captured input with the layer's own functional form, so it is exactly what the
forward used. These parameters are small: group gradients are materialised.

BatchNorm normalises with statistics of the whole batch, so it mixes examples:
the engine refuses it in DP mode; noise-free, its rule is the exact decomposition
of the full-batch gradient (statistics held fixed), which is NOT what the naive
per-micro-batch loop computes (there each micro-batch has its own statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..grouping import Groups
from .registry import LayerRule, register_rule


def _affine_group_grads(x_hat, g, weight, bias, groups: Groups, reduce_dims) -> dict:
    def group_sum(t):  # (B, ...) -> (M, C)
        if groups.equal_size is not None and groups.equal_size > 1:
            # contiguous groups: over the group's rows and reduce_dims in one reduction
            rows = t.reshape(groups.num_groups, groups.equal_size, *t.shape[1:])  # (M, b, ...)
            return rows.sum((1,) + tuple(d + 1 for d in reduce_dims))
        return groups.sum(t.sum(reduce_dims) if reduce_dims else t)

    out = {}
    if weight is not None:
        out["weight"] = group_sum(g * x_hat)
    if bias is not None:
        out["bias"] = group_sum(g)
    return out


def _trailing_reduce_dims(x: torch.Tensor, n_trailing: int):
    # Dims between the batch dim and the normalised trailing dims.
    return tuple(range(1, x.dim() - n_trailing))


def layer_norm_group_grads(layer: nn.LayerNorm, inputs, out_grad, groups):
    """Group gradients of a LayerNorm's affine weight and bias (``x_hat`` recomputed exactly)."""
    x = inputs[0]
    x_hat = F.layer_norm(x, layer.normalized_shape, None, None, layer.eps)
    dims = _trailing_reduce_dims(x, len(layer.normalized_shape))
    return _affine_group_grads(x_hat, out_grad, layer.weight, layer.bias, groups, dims)


def rms_norm_group_grads(layer, inputs, out_grad, groups):
    """Group gradients of an RMSNorm's weight."""
    x = inputs[0]
    x_hat = F.rms_norm(x, layer.normalized_shape, None, layer.eps)
    dims = _trailing_reduce_dims(x, len(layer.normalized_shape))
    return _affine_group_grads(x_hat, out_grad, layer.weight, None, groups, dims)


def group_norm_group_grads(layer: nn.GroupNorm, inputs, out_grad, groups):
    """Group gradients of a GroupNorm's per-channel weight and bias."""
    x = inputs[0]
    x_hat = F.group_norm(x, layer.num_groups, None, None, layer.eps)  # (B, C, *S)
    dims = tuple(range(2, x.dim()))
    return _affine_group_grads(x_hat, out_grad, layer.weight, layer.bias, groups, dims)


def batch_norm_group_grads(layer, inputs, out_grad, groups):
    """Group gradients of a BatchNorm's weight and bias with the batch statistics held fixed (noise-free only)."""
    x = inputs[0]
    dims = (0,) + tuple(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    use_batch_stats = layer.training or layer.running_mean is None
    if use_batch_stats:
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
    else:
        mean, var = layer.running_mean, layer.running_var
    x_hat = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + layer.eps)
    return _affine_group_grads(x_hat, out_grad, layer.weight, layer.bias, groups, tuple(range(2, x.dim())))


register_rule(nn.LayerNorm, LayerRule(layer_norm_group_grads))
register_rule(nn.GroupNorm, LayerRule(group_norm_group_grads))
if hasattr(nn, "RMSNorm"):
    register_rule(nn.RMSNorm, LayerRule(rms_norm_group_grads))
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_bn, LayerRule(batch_norm_group_grads))
