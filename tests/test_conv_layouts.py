"""The conv rule's two layouts ("grouped" and "forward") give the same group gradients.

The equality matrix checks whichever layout the rule picks against the naive
loop; this checks both, forced, on the shapes where they differ most in how
they index: strides, dilations, padding, 1d/2d/3d, ragged keyed groups.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dp_microclip import grouping
from dp_microclip.layers.conv import conv_group_grads

CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (7, 3, 11)),
    "conv2d-stride-dilation": (lambda: nn.Conv2d(2, 5, 3, stride=2, dilation=2, padding=2), (7, 2, 13, 12)),
    "conv2d-same-reflect": (lambda: nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="reflect"), (7, 3, 9, 8)),
    "conv2d-stride3-no-bias": (lambda: nn.Conv2d(1, 6, 4, stride=3, bias=False), (7, 1, 14, 14)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (7, 2, 5, 6, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("grouping_kind", ["contiguous1", "contiguous7", "keyed"])
def test_grouped_and_forward_layouts_agree(case, grouping_kind):
    torch.manual_seed(0)
    make, shape = CASES[case]
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    out_grad = torch.randn_like(layer(x))
    if grouping_kind == "keyed":
        groups = grouping.keyed_groups(shape[0], 3, torch.Generator().manual_seed(1))
    else:
        groups = grouping.contiguous_groups(shape[0], int(grouping_kind[-1]), torch.device("cpu"))
    a = conv_group_grads(layer, (x,), out_grad, groups, implementation="grouped")["weight"]
    b = conv_group_grads(layer, (x,), out_grad, groups, implementation="forward")["weight"]
    assert a.shape == b.shape == (groups.num_groups, *layer.weight.shape)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # And against autograd, one group at a time.
    for j in range(groups.num_groups):
        rows = (groups.index == j).nonzero().flatten()
        if rows.numel() == 0:
            assert a[j].abs().max() == 0
            continue
        layer.zero_grad()
        (layer(x[rows]) * out_grad[rows]).sum().backward()
        torch.testing.assert_close(b[j], layer.weight.grad, rtol=1e-10, atol=1e-12)
