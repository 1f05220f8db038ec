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
was slower than both on every conv measured.

Ghost norms (no group gradient built) come from a Gram matrix over input
POSITIONS, not over im2col patches: with ``x_p`` the C-vector of input channels
at position p and ``g_l`` the O-vector of output gradients at output position l,

    ||grad W||^2 = sum_{l, l'} <g_l, g_l'> * sum_k <x_{pos(l, k)}, x_{pos(l', k)}>

where ``pos(l, k)`` is the input position kernel offset k reads for output l
(zero padding reads nothing). One batched product ``X^T X`` (S x S per group, S
input positions, contracted over C) and a gather of its ``L x L x K`` entries
replace the im2col copy. That is cheap where maps are small and channels many
(a conv on 81 x 7 x 7 ScatterNet features: S = 49, L = 16, K = 9), and hopeless on
large maps (28 x 28: S^2 = 614,656 per group), where the norms come from
materialised group gradients instead (:func:`conv_group_sq_norms` picks by size).
The clipped sum is then ONE weight-gradient convolution of the row-weighted
output gradient. Which route is faster on a given layer the autotuner measures.

Letters: B examples, C in channels, O out channels, S spatial dims, K kernel, M groups, R rows per group.
"""

from __future__ import annotations

import functools
import math
from types import EllipsisType

import torch
import torch.nn.functional as F
import torch.nn.grad  # not imported by torch.nn itself
from torch import nn

from ..grouping import Groups
from .registry import GroupGrads, LayerRule, Unsquared, register_rule



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
    return _grouped_grads(layer, x, padding, out_grad, groups, with_bias=False)[0]


def _grouped_grads(layer, x, padding, out_grad, groups: Groups, with_bias: bool):
    """((M, O, C/groups, *K), (M, O) bias group gradients or None): one grouped weight-gradient conv."""
    m, r = groups.num_groups, groups.max_size()
    px = groups.pad(x).transpose(0, 1).reshape(r, m * x.shape[1], *x.shape[2:])  # (R, M*C, *S)
    pg = groups.pad(out_grad).transpose(0, 1).reshape(r, m * out_grad.shape[1], *out_grad.shape[2:])  # (R, M*O, *S')
    out_ch, in_per_group = layer.weight.shape[0], layer.weight.shape[1]
    gw, gb = _conv_backward(px, (m * out_ch, in_per_group, *layer.kernel_size), pg, layer, padding,
                            m * layer.groups, with_bias)  # (M*O, C/groups, *K), (M*O,)
    return gw.reshape(m, *layer.weight.shape), None if gb is None else gb.reshape(m, out_ch)


def _conv_backward(x, weight_shape: tuple, out_grad, layer, padding, conv_groups: int, with_bias: bool):
    """(weight gradient, bias gradient or None) of a conv from one ``convolution_backward``, as
    ``torch.nn.grad.convNd_weight`` computes the first; the bias's (the sum over rows and positions) comes
    from the same call. The weight argument only gives the shape: a zero-stride view, no allocation."""
    nd = x.dim() - 2
    shape_only = torch.as_strided(out_grad, weight_shape, (0,) * len(weight_shape))
    _, gw, gb = torch.ops.aten.convolution_backward(
        out_grad, x, shape_only, [weight_shape[0]] if with_bias else None, list(layer.stride), list(padding),
        list(layer.dilation), False, [0] * nd, conv_groups, (False, True, with_bias))
    return gw, gb if with_bias else None


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


def _position_index(layer, in_size, out_size, padding) -> tuple[torch.Tensor, int]:
    """``(L, K)`` flat input position read by output position l at kernel offset k, and S (the number of input
    positions), which also marks a read of zero padding."""
    nd = len(in_size)
    flat = torch.zeros((), dtype=torch.long)
    valid = torch.ones((), dtype=torch.bool)
    for d in range(nd):
        coord = (torch.arange(out_size[d])[:, None] * layer.stride[d]
                 + torch.arange(layer.kernel_size[d])[None, :] * layer.dilation[d] - padding[d])  # (L_d, K_d)
        shape = [1] * (2 * nd)
        shape[d], shape[nd + d] = out_size[d], layer.kernel_size[d]
        coord = coord.reshape(shape)  # broadcast over (L_1..L_n, K_1..K_n)
        flat = flat * in_size[d] + coord
        valid = valid & (coord >= 0) & (coord < in_size[d])
    s = math.prod(in_size)
    return torch.where(valid, flat, s).reshape(math.prod(out_size), -1), s


def _padded_spatial(layer, spatial: tuple) -> tuple:
    """The input's spatial size after :func:`_explicit_padding` (sizes only, no tensor built)."""
    if layer.padding_mode != "zeros":  # F.pad with (left, right) pairs, the last dimension first
        pads = layer._reversed_padding_repeated_twice
        return tuple(size + pads[2 * i] + pads[2 * i + 1] for i, size in enumerate(reversed(spatial)))[::-1]
    if layer.padding == "same":
        return tuple(size + d * (k - 1) for size, k, d in zip(spatial, layer.kernel_size, layer.dilation))
    return tuple(spatial)


def gram_elements(layer, inputs, out_grad, groups: Groups) -> int:
    """An upper bound of the elements the position-Gram norms build for these shapes: the ``(RS+1)^2`` Gram
    per (group, conv group), its ``(RL)^2 K`` gather and ``(RL)^2`` output-gradient Gram, and the rearranged
    copies of the input and output gradient (none for one example per group and ``layer.groups == 1``;
    padded ones for ragged groups)."""
    r, m, cg = groups.max_size(), groups.num_groups, layer.groups
    s = math.prod(_padded_spatial(layer, tuple(inputs[0].shape[2:])))
    l_ = math.prod(out_grad.shape[2:])
    grams = m * cg * ((r * s + 1) ** 2 + (r * l_) ** 2 * (math.prod(layer.kernel_size) + 1))
    rows = m * r * (inputs[0].shape[1] * s + out_grad.shape[1] * l_)
    copies = (0 if r == 1 and cg == 1 else rows) + (0 if groups.equal_size is not None else rows)
    return grams + copies


def _gram_sq_norms(layer, x, padding, out_grad, groups: Groups) -> torch.Tensor:
    """Squared weight-gradient norms ``(M,)`` from input-position Gram matrices (module docstring)."""
    m, r, cg = groups.num_groups, groups.max_size(), layer.groups
    idx, s = _position_index(layer, tuple(x.shape[2:]), tuple(out_grad.shape[2:]), padding)
    idx = idx.to(x.device)
    l_, k = idx.shape
    # Rows of one group side by side: row i's positions are offset by i*S; padding reads the zero slot R*S.
    rows = torch.arange(r, device=x.device).reshape(r, 1, 1) * s
    idx = torch.where(idx == s, r * s, idx + rows).reshape(r * l_, k)  # (RL, K)
    xs = groups.pad(x.reshape(x.shape[0], cg, x.shape[1] // cg, s))  # (M, R, G, C/G, S)
    xs = xs.permute(0, 2, 1, 4, 3).reshape(m * cg, r * s, x.shape[1] // cg)  # (MG, RS, C/G)
    gram_x = F.pad(torch.bmm(xs, xs.transpose(1, 2)), (0, 1, 0, 1))  # (MG, RS+1, RS+1), last row/col zero
    pairs = (idx[:, None, :] * (r * s + 1) + idx[None, :, :]).flatten()  # (RL * RL * K,)
    gathered = gram_x.flatten(1).index_select(1, pairs).reshape(m * cg, r * l_, r * l_, k).sum(-1)  # (MG, RL, RL)
    gs = groups.pad(out_grad.reshape(out_grad.shape[0], cg, out_grad.shape[1] // cg, l_))  # (M, R, G, O/G, L)
    gs = gs.permute(0, 2, 1, 4, 3).reshape(m * cg, r * l_, out_grad.shape[1] // cg)  # (MG, RL, O/G)
    gram_g = torch.bmm(gs, gs.transpose(1, 2))  # (MG, RL, RL)
    return (gathered * gram_g).sum((1, 2)).reshape(m, cg).sum(1)  # (M,)


def conv_group_sq_norms(layer, inputs, out_grad, groups: Groups, method: str = "auto") -> dict:
    """Group-gradient norms ``{"weight": (M,) squared or GroupGrads, "bias": Unsquared or GroupGrads}``.

    ``method``: ``"gram"`` (input-position Gram matrices, no group gradient built), ``"materialize"``
    (norms of the group gradients, freed at once), or ``"auto"``: the Gram form when it builds fewer
    elements than the group gradients would (small maps, many channels), else the group gradients.
    """
    if method == "auto":
        method = "gram" if _uses_gram(layer, inputs, out_grad, groups) else "materialize"
    x, padding = _explicit_padding(layer, inputs[0])
    out: dict = {}
    if method == "gram":
        out["weight"] = _gram_sq_norms(layer, x, padding, out_grad, groups)
    elif method == "materialize":
        w, b = _grouped_grads(layer, x, padding, out_grad, groups, layer.bias is not None)  # one conv for both
        out["weight"] = GroupGrads(w)  # kept: the engine takes their norms and reuses them for the sum
        if b is not None:
            out["bias"] = GroupGrads(b)  # (M, O)
        return out
    else:
        raise ValueError(f"method {method!r}: auto, gram or materialize")
    if layer.bias is not None:
        out["bias"] = Unsquared(torch.linalg.vector_norm(groups.sum(out_grad.flatten(2).sum(-1)), dim=1))  # (M,)
    return out


def conv_weighted_sum(layer, inputs, out_grad, row_weight: dict) -> dict:
    """``sum_i w_i grad_i``: one weight-gradient convolution of the row-weighted output gradient (and the bias)."""
    x, padding = _explicit_padding(layer, inputs[0])
    spread = (out_grad.shape[0],) + (1,) * (out_grad.dim() - 1)
    out = {}
    if "weight" in row_weight:
        rows = row_weight["weight"].to(out_grad.dtype)
        weighted = out_grad * rows.reshape(spread)
        # The same row weights for the bias (whole-gradient clipping): its sum comes from the same conv.
        same = layer.bias is not None and "bias" in row_weight and row_weight["bias"].to(out_grad.dtype) is rows
        out["weight"], bias = _conv_backward(x, tuple(layer.weight.shape), weighted, layer, padding, layer.groups,
                                             same)
        if same:
            out["bias"] = bias
            return out
    if layer.bias is not None and "bias" in row_weight:
        out["bias"] = torch.mv(out_grad.flatten(2).sum(-1).t(), row_weight["bias"].to(out_grad.dtype))  # (O,)
    return out


def _group_grad_elements(layer, inputs, out_grad, groups: Groups) -> int:
    return groups.num_groups * sum(p.numel() for p in (layer.weight, layer.bias) if p is not None)


def _uses_gram(layer, inputs, out_grad, groups: Groups) -> bool:
    # The position Gram where it builds no more than the group gradients would.
    return gram_elements(layer, inputs, out_grad, groups) <= _group_grad_elements(layer, inputs, out_grad, groups)


def _ghost_elements(layer, inputs, out_grad, groups: Groups) -> int:
    """What ``conv_group_sq_norms(method="auto")`` builds: the position Gram or the group gradients."""
    if _uses_gram(layer, inputs, out_grad, groups):
        return gram_elements(layer, inputs, out_grad, groups)
    return _group_grad_elements(layer, inputs, out_grad, groups)


for _conv_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_conv_type, LayerRule(conv_group_grads, conv_group_sq_norms, conv_weighted_sum,
                                         _group_grad_elements, _ghost_elements,
                                         variants=layout_variants(conv_group_grads), variant_key=variant_key))
