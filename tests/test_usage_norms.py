"""The usage route on ``F.layer_norm`` / ``F.group_norm`` called with a module's own affine parameters.

Modules that normalise with the functional call (HF ConvNeXtV2's channels-first LayerNorm, custom norms) have no
rule of their own; their weight and bias are a broadcast scale and shift of the normalised input, which the usage
route captures exactly. Compared with the naive micro-batch loop in float64, and no module may take the generic path.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from dp_microclip.reference import naive_microbatch_grads


class FunctionalLayerNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-6)


class FunctionalGroupNorm(nn.Module):
    def __init__(self, c: int, with_bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c))
        self.bias = nn.Parameter(torch.randn(c)) if with_bias else None

    def forward(self, x):
        return F.group_norm(x, 2, self.weight, self.bias)


class Net(nn.Module):
    def __init__(self, with_bias: bool):
        super().__init__()
        self.conv, self.gn = nn.Conv1d(3, 4, 3), FunctionalGroupNorm(4, with_bias)
        self.lin, self.ln, self.head = nn.Linear(4, 6), FunctionalLayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.gn(self.conv(x)).transpose(1, 2)
        return self.head(self.ln(self.lin(h)).mean(1))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("T", [4, 6])
@pytest.mark.parametrize("b", [1, 2, 4])
def test_functional_norms_take_the_usage_route_and_equal_the_naive_loop(b, T, with_bias):
    torch.manual_seed(0)
    model = Net(with_bias).double()
    x, y = torch.randn(4, 3, T, dtype=torch.float64), torch.arange(4) % 3
    want = naive_microbatch_grads(copy.deepcopy(model), F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=0.05)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert float((p.grad - want[name]).norm()) <= 1e-9 * float(want[name].norm()), name
    assert "func" not in set(engine.last_strategies.values()), engine.last_strategies
