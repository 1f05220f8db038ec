"""nn.Conv1d / Conv2d / Conv3d.

Per-group weight gradients come from ONE convolution per layer, in one of two
layouts that compute the same numbers:

* "grouped": the M groups are stacked along the channel axis, so that the
  weight-gradient convolution with ``groups = M * layer.groups`` computes every
  group's gradient at once, summed over the R rows of each group (the "batch"
  of that call).
* "forward": the classic weight-gradient-as-forward-convolution: the layer's
  input channels become the batch, each group's R rows its input channels, and
  the output gradients the kernels (``groups = M``); the result is cropped to
  the kernel size. Only for ``layer.groups == 1``.

Which is faster depends on the shapes and the backend (measured on 2 CPU
threads, B = 128, 5x5 kernels: a 1 -> 16 channel conv on 28x28 takes 1.2 ms
"forward" against 3.0 ms "grouped"; a 16 -> 32 conv on 12x12 at b = 8 takes
2.4 ms against 1.6 ms), so both are registered as variants of the rule and the engine's autotuner
(``routes.py``) times them once per shape and keeps the faster. im2col (``F.unfold``)
and Gram norms were slower than both on every conv measured, so convs always
materialise their (small) group gradients and reuse them for the clipped sum.

Letters: B examples, C in channels, O out channels, S spatial dims, K kernel, M groups, R rows per group.
"""

from __future__ import annotations

import functools
from types import EllipsisType

import torch
import torch.nn.functional as F
import torch.nn.grad  # not imported by torch.nn itself
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


def _grouped_weight_grads(layer, x, padding, out_grad, groups: Groups) -> torch.Tensor:
    """(M, O, C/groups, *K) via one weight-gradient conv with M * layer.groups groups."""
    nd = x.dim() - 2
    m, r = groups.num_groups, groups.max_size()
    px = groups.pad(x).transpose(0, 1).reshape(r, m * x.shape[1], *x.shape[2:])  # (R, M*C, *S)
    pg = groups.pad(out_grad).transpose(0, 1).reshape(r, m * out_grad.shape[1], *out_grad.shape[2:])  # (R, M*O, *S')
    out_ch, in_per_group = layer.weight.shape[0], layer.weight.shape[1]
    gw = _WEIGHT_GRAD[nd](
        px, (m * out_ch, in_per_group, *layer.kernel_size), pg,
        stride=layer.stride, padding=padding, dilation=layer.dilation, groups=m * layer.groups,
    )  # (M*O, C/groups, *K)
    return gw.reshape(m, *layer.weight.shape)


def _forward_weight_grads(layer, x, padding, out_grad, groups: Groups) -> torch.Tensor:
    """(M, O, C, *K) via one forward conv: channels as batch, rows as input channels, gradients as kernels."""
    nd = x.dim() - 2
    m, r = groups.num_groups, groups.max_size()
    c, o = x.shape[1], out_grad.shape[1]
    spatial = tuple(range(3, 3 + nd))
    px = groups.pad(x).permute(2, 0, 1, *spatial).reshape(c, m * r, *x.shape[2:])  # (C, M*R, *S)
    pg = groups.pad(out_grad).permute(0, 2, 1, *spatial).reshape(m * o, r, *out_grad.shape[2:])  # (M*O, R, *S')
    out = _FORWARD[nd](px, pg, padding=padding, stride=layer.dilation, dilation=layer.stride, groups=m)
    crop: tuple[EllipsisType | slice, ...] = (..., *(slice(0, k) for k in layer.kernel_size))
    out = out[crop]  # (C, M*O, *K)
    return out.reshape(c, m, o, *layer.kernel_size).permute(1, 2, 0, *(i + 3 for i in range(nd)))


_FORWARD = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


IMPLEMENTATIONS = {"grouped": _grouped_weight_grads, "forward": _forward_weight_grads}


def conv_group_grads(layer, inputs, out_grad, groups: Groups, implementation: str = "grouped") -> dict:
    """Group gradients ``{"weight": (M, O, C/groups, *K), "bias": (M, O)}`` of a convolution, from one conv call.

    ``implementation``: the layout ("grouped", or "forward" when ``layer.groups == 1``); the engine times
    both (the rule's variants) and uses the faster.
    """
    x, padding = _explicit_padding(layer, inputs[0])
    out = {"weight": IMPLEMENTATIONS[implementation](layer, x, padding, out_grad, groups)}
    if layer.bias is not None:
        out["bias"] = groups.sum(out_grad.flatten(2).sum(-1))  # (M, O)
    return out


def layout_variants(group_grads) -> dict:
    """The rule's variants: ``group_grads`` with each layout fixed."""
    return {name: functools.partial(group_grads, implementation=name) for name in IMPLEMENTATIONS}


def variant_key(layer, inputs, out_grad, groups: Groups):
    """The shape class the autotuner times the two layouts for; None: only "grouped" applies."""
    if layer.groups != 1:
        return None
    x = inputs[0]
    # Group counts and sizes bucketed to powers of two, so Poisson batches (whose groups vary every step)
    # do not trigger a new timing each step.
    return (x.device.type, x.dtype, tuple(x.shape[1:]), tuple(out_grad.shape[1:]), groups.num_groups.bit_length(),
            groups.max_size().bit_length(), tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation),
            str(layer.padding), layer.padding_mode)


for _conv_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_conv_type, LayerRule(conv_group_grads, variants=layout_variants(conv_group_grads),
                                         variant_key=variant_key))
