"""The conv rule's two layouts ("grouped" and "forward") give the same group gradients, and its ghost route
(position-Gram norms, one weighted weight-gradient conv) gives the same norms and sums.

The equality matrix checks whichever layout the rule picks against the naive
loop; this checks both, forced, on the shapes where they differ most in how
they index: strides, dilations, padding, 1d/2d/3d, ragged keyed groups.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dp_microclip import grouping
from dp_microclip.layers.conv import (_explicit_padding, _padded_spatial, _uses_gram, conv_group_grads,
                                      conv_group_sq_norms, conv_weighted_sum)
from dp_microclip.layers.registry import squared_norm

from .helpers import compare_with_naive

CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (7, 3, 11)),
    "conv2d-stride-dilation": (lambda: nn.Conv2d(2, 5, 3, stride=2, dilation=2, padding=2), (7, 2, 13, 12)),
    "conv2d-same-reflect": (lambda: nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="reflect"), (7, 3, 9, 8)),
    "conv2d-stride3-no-bias": (lambda: nn.Conv2d(1, 6, 4, stride=3, bias=False), (7, 1, 14, 14)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), (7, 2, 5, 6, 4)),
    "conv2d-many-channels-7x7": (lambda: nn.Conv2d(9, 4, 3, stride=2, padding=1), (7, 9, 7, 7)),
    "conv2d-conv-groups": (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (7, 4, 5, 5)),
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
    if layer.groups != 1:
        pytest.skip('the "forward" layout is for layer.groups == 1')
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


def _groups(kind, batch):
    if kind == "keyed":
        return grouping.keyed_groups(batch, 3, torch.Generator().manual_seed(1))
    return grouping.contiguous_groups(batch, int(kind[-1]), torch.device("cpu"))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("grouping_kind", ["contiguous1", "contiguous7", "keyed"])
@pytest.mark.parametrize("method", ["gram", "materialize", "auto"])
def test_ghost_norms_equal_materialised_norms(case, grouping_kind, method):
    torch.manual_seed(0)
    make, shape = CASES[case]
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    out_grad = torch.randn_like(layer(x))
    groups = _groups(grouping_kind, shape[0])
    want = conv_group_grads(layer, (x,), out_grad, groups)
    got = conv_group_sq_norms(layer, (x,), out_grad, groups, method=method)
    assert set(got) == set(want)
    for name, g in want.items():
        torch.testing.assert_close(squared_norm(got[name]), g.flatten(1).square().sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_weighted_sum_equals_weighted_example_gradients(case):
    torch.manual_seed(0)
    make, shape = CASES[case]
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    out_grad = torch.randn_like(layer(x))
    w, v = torch.rand(shape[0], dtype=torch.float64), torch.rand(shape[0], dtype=torch.float64)
    per_example = conv_group_grads(layer, (x,), out_grad, _groups("contiguous1", shape[0]))
    got = conv_weighted_sum(layer, (x,), out_grad, {"weight": w, "bias": v})  # per_layer: one weight per tensor
    for name, weight in (("weight", w), ("bias", v)):
        if name in per_example:
            torch.testing.assert_close(got[name], torch.einsum("m,m...->...", weight, per_example[name]),
                                       rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_padded_size_without_padding(case):
    make, shape = CASES[case]
    layer = make()
    assert _padded_spatial(layer, shape[2:]) == tuple(_explicit_padding(layer, torch.zeros(shape))[0].shape[2:])


class ScatterCNN(nn.Module):
    """Tramer & Boneh's ScatterNet + CNN in small: many channels on a 7x7 map (the position Gram's case)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.GroupNorm(4, 64, affine=False), nn.Conv2d(64, 16, 3, stride=2, padding=1),
                                 nn.Tanh(), nn.Conv2d(16, 32, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(512, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("grad_mode", ["auto", "bookkeeping"])
@pytest.mark.parametrize("b", [1, 3])
def test_scatter_cnn_ghost_route_equals_naive_loop(b, grad_mode):
    torch.manual_seed(0)
    x = torch.randn(12, 64, 7, 7)
    # b = 1 takes the position Gram in both convs, b = 3 the group gradients (their Gram would be larger)
    model, groups = ScatterCNN(), grouping.contiguous_groups(12, b, torch.device("cpu"))
    for conv, shape_in, shape_out in ((model.net[1], (12, 64, 7, 7), (12, 16, 4, 4)),
                                      (model.net[3], (12, 16, 4, 4), (12, 32, 4, 4))):
        assert _uses_gram(conv, (torch.empty(shape_in),), torch.empty(shape_out), groups) == (b == 1)
    errors, engine = compare_with_naive(ScatterCNN, x.double(), torch.arange(12) % 3, b=b, clipping="fixed",
                                        grad_mode=grad_mode)
    assert max(errors.values()) < 1e-9, errors
    if grad_mode == "bookkeeping":
        assert set(engine.last_strategies.values()) == {"ghost"}
