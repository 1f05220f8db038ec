"""Parametrized weights (torch.nn.utils.parametrize: weight norm, Wav2Vec2's positional conv) are exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import dp_microclip
from dp_microclip.reference import naive_microbatch_grads


class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(4, 4, 3, padding=1), name="weight", dim=2)
        self.head = weight_norm(nn.Linear(4 * 6, 3))

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("clipping", ["fixed", "normalize", "per_layer"])
@pytest.mark.parametrize("b", [1, 2, 4])
def test_weight_norm_equals_naive_loop(b, clipping):
    torch.manual_seed(0)
    model = WeightNormed().double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    names = [n for n, _ in model.named_parameters()]
    bound = {n: 0.02 for n in names} if clipping == "per_layer" else 0.05
    want = naive_microbatch_grads(reference, F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=0.05,
                                  clipping=clipping, per_param_bounds=bound if clipping == "per_layer" else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=bound, clipping=clipping, fallback="error")
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert float((p.grad - want[name]).norm() / want[name].norm()) < 1e-9, name


def test_parametrization_of_a_module_without_rule_is_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.weight

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    torch.nn.utils.parametrize.register_parametrization(model[1], "weight", nn.Softplus())
    with pytest.raises(dp_microclip.UnsupportedModuleError, match="remove_parametrizations"):
        dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=1,
                            max_grad_norm=1.0, fallback="error")
