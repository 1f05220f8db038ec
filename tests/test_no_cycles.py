"""The engine creates no reference cycles per step: users' garbage collector has nothing of ours to free.

Objects that only the cycle collector can free are paid inside users' steps (the collector runs when
allocations pile up). Each check runs steps with the collector off and counts what it then finds.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dp_microclip
from .helpers import OwnLossDP


def _models():
    yield "mlp", lambda: nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(8, 20)
    yield "cnn", lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(4 * 6 * 6, 3)), torch.randn(8, 1, 8, 8)
    yield "transformer", lambda: nn.Sequential(
        nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1),
        nn.Flatten(), nn.Linear(8 * 5, 3)), torch.randn(8, 5, 8)


def _cyclic_garbage(step, steps: int) -> int:
    for _ in range(3):
        step()  # first steps: probe, check against autograd, autotuning
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(steps):
            step()
        return gc.collect()
    finally:
        if was_enabled:
            gc.enable()


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("name, make, x", list(_models()), ids=[m[0] for m in _models()])
def test_no_cyclic_garbage_per_step(name, make, x, b):
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=1.0)
    y = torch.randint(0, 3, (x.shape[0],))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    assert _cyclic_garbage(step, 20) == 0


def test_no_cyclic_garbage_in_the_dp_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0,
                                 privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=0.1, delta=1e-5,
                                                         accountant="rdp"))
    data = TensorDataset(torch.randn(200, 6), torch.randint(0, 3, (200,)))
    loader = engine.data_loader(data)
    batches = (batch for _ in range(4) for batch in loader)  # lazily: the loader announces each batch as drawn

    def step():
        x, y = next(batches)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    assert _cyclic_garbage(step, 20) == 0
