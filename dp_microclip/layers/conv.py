"""nn.Conv1d / Conv2d / Conv3d.

Per-group weight gradients come from ONE grouped weight-gradient convolution
per layer: the M groups are stacked along the channel axis, so that a conv with
``groups = M * layer.groups`` computes every group's gradient at once, summed
over the R rows of each group (the "batch" of that call). Measured (DESIGN.md):
im2col (``F.unfold``) and Gram norms are far slower on convs, so convs always
materialise their (small) group gradients and reuse them for the clipped sum.

Letters: B examples, C in channels, O out channels, S spatial dims, K kernel, M groups, R rows per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..grouping import Groups
from .registry import LayerRule, register_rule

_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _explicit_padding(layer, x: torch.Tensor):
    """Return (input, padding) with any non-zero or string padding applied to the input."""
    nd = x.dim() - 2
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0,) * nd
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return x, (0,) * nd
        # "same": total padding dilation*(k-1) per dim, the extra on the right as in torch.
        pads = []
        for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * nd
    return x, tuple(layer.padding)


def conv_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    x, padding = _explicit_padding(layer, inputs[0])
    nd = x.dim() - 2
    m, r = groups.num_groups, groups.max_size()
    px = groups.pad(x).transpose(0, 1).reshape(r, m * x.shape[1], *x.shape[2:])  # (R, M*C, *S)
    pg = groups.pad(out_grad).transpose(0, 1).reshape(r, m * out_grad.shape[1], *out_grad.shape[2:])  # (R, M*O, *S')
    out_ch, in_per_group = layer.weight.shape[0], layer.weight.shape[1]
    gw = _WEIGHT_GRAD[nd](
        px, (m * out_ch, in_per_group, *layer.kernel_size), pg,
        stride=layer.stride, padding=padding, dilation=layer.dilation, groups=m * layer.groups,
    )  # (M*O, C/groups, *K)
    out = {"weight": gw.reshape(m, *layer.weight.shape)}
    if layer.bias is not None:
        out["bias"] = groups.sum(out_grad.flatten(2).sum(-1))  # (M, O)
    return out


for _conv_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_conv_type, LayerRule(conv_group_grads))
