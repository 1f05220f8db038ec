"""nn.ConvTranspose1d / ConvTranspose2d / ConvTranspose3d, through the convolution rule's own kernels.

A transposed convolution is the adjoint of a convolution: with ``conv(z; W)``
the convolution whose weight is the layer's ``W`` (shape ``(C, O/groups, *K)``,
read as ``(out_channels, in_channels/groups, *K)`` of a conv from O to C
channels) and the same stride, padding, dilation and groups,

    <conv_transpose(x; W), G> = <x, conv(G; W)>        for every x (B, C, *S), G (B, O, *S')

(Dumoulin & Visin, "A guide to convolution arithmetic for deep learning",
2016, section 4: the transposed convolution is the backward pass of a
convolution; PyTorch computes ``conv_transpose`` as ``conv``'s input gradient).
The right-hand side is linear in ``W`` as a convolution of ``G`` whose output
gradient is ``x``, so

    dL/dW for rows R  =  conv_weight_grad(input = G_R, grad_output = x_R)     (C, O/groups, *K)

which is exactly what the convolution rule computes, with the layer's input and
output gradient swapped. ``output_padding`` (or ``output_size``) only adds
output positions at the far end that no input reaches through the stride:
``conv(G)`` then has ``floor(output_padding / stride)`` extra positions per
spatial dim (only when ``output_padding >= stride``, possible with
dilation > stride), and ``x`` is zero-padded to match (zero output gradient,
no contribution). The bias gradient is the sum of ``G`` over positions.

Group gradients are materialised, as for convolutions (``conv.py``: per-group
weight gradients are small, and Gram norms were slower than one convolution on
every conv measured), with the same timed choice between its "grouped" and
"forward" layouts.

Input layout: batch at dim 0, channels first: x ``(B, C, *S)``, out_grad ``(B, O, *S')``
(torch's own convention for convolutions).
Letters: B examples, C in channels, O out channels, S / S' spatial dims, K kernel, M groups.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..grouping import Groups
from .conv import IMPLEMENTATIONS, layout_variants, variant_key
from .registry import LayerRule, register_rule


def conv_transpose_group_grads(layer, inputs, out_grad, groups: Groups, implementation: str = "grouped") -> dict:
    """Per-group gradients ``{"weight": (M, C, O/groups, *K), "bias": (M, O)}`` of a transposed convolution.

    Maths (module docstring): group j's weight gradient is the convolution
    weight gradient with input ``G_j`` (B_j, O, *S') and output gradient
    ``x_j`` (B_j, C, *S), i.e. the conv rule with the two swapped.

    Args:
        layer: the ``nn.ConvTranspose{1,2,3}d``.
        inputs: ``(x,)`` with x ``(B, C, *S)``, batch first (extra positional
            arguments such as ``output_size`` are ignored: they only fix ``G``'s size).
        out_grad: ``(B, O, *S')``.
        groups: the batch's groups.
        implementation: the layout, "grouped" or "forward" (``layer.groups == 1``); the engine times both.
    """
    x = inputs[0]
    nd = x.dim() - 2
    padding = tuple(layer.padding)
    # The output padding used by the forward: S' = (S-1) s - 2p + d (k-1) + 1 + op, solved for op.
    output_padding = tuple(
        out_grad.shape[2 + i] - ((x.shape[2 + i] - 1) * layer.stride[i] - 2 * padding[i]
                                 + layer.dilation[i] * (layer.kernel_size[i] - 1) + 1)
        for i in range(nd)
    )
    extra = []
    for op, s in zip(reversed(output_padding), reversed(layer.stride)):
        extra += [0, op // s]
    x = F.pad(x, extra) if any(extra) else x  # (B, C, *S_conv): conv(G)'s output size
    out = {"weight": IMPLEMENTATIONS[implementation](layer, out_grad, padding, x, groups)}  # (M, C, O/groups, *K)
    if layer.bias is not None:
        out["bias"] = groups.sum(out_grad.flatten(2).sum(-1))  # (M, O)
    return out


for _conv_type in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_rule(_conv_type, LayerRule(conv_transpose_group_grads,
                                        variants=layout_variants(conv_transpose_group_grads), variant_key=variant_key))
