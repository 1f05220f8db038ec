"""No host synchronisation in a steady-state step, and non-finite micro-batches still skipped exactly on the device.

A host read (``.item()``, ``float(t)``, ``bool(t)``) stalls a GPU's launch queue; the engine handles a NaN/inf
micro-batch on the device instead (zero weight, its rows zeroed where the sums read them). The sync count comes
from ``benchmarks/launches.py``'s dispatch-mode counter (deterministic, no timing); the skipped gradient is
checked against the naive loop over the remaining examples.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from benchmarks.launches import count
from dp_microclip.reference import naive_microbatch_grads


@pytest.mark.parametrize("method", ["b=1", "b=8", "dp b=1"])
def test_a_steady_state_step_reads_nothing_back_to_the_host(method):
    launches, syncs, ops = count("mlp", method)
    assert syncs == 0, {op: n for op, n in ops.items() if op in ("item", "_local_scalar_dense", "is_nonzero")}
    assert launches > 0


class WithNorm(nn.Module):
    """Linear (ghost route), LayerNorm (materialised route), Linear head: both kinds of masked tensor."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.inp(x))))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("b", [1, 2])
def test_a_nonfinite_example_is_zeroed_on_the_device_exactly(value, b):
    torch.manual_seed(0)
    m = WithNorm().double()
    ref = copy.deepcopy(m)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    engine = dp_microclip.attach(m, opt, micro_batch_size=b, max_grad_norm=0.05, verify_steps=0,
                                 grad_mode="bookkeeping")
    bad = x.clone()
    bad[5, 2] = value
    F.cross_entropy(m(bad), y).backward()
    opt.step()
    assert int(engine.nonfinite_groups) == 1
    dropped = {5} if b == 1 else {4, 5}
    keep = torch.tensor([i for i in range(8) if i not in dropped])
    want = naive_microbatch_grads(ref, F.cross_entropy, x[keep], y[keep], micro_batch_size=b, max_grad_norm=0.05)
    groups, kept = 8 // b, len(keep) // b
    for name, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, want[name] * kept / groups, rtol=1e-9, atol=1e-12)
