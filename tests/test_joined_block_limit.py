"""Which materialised group gradients the aggregation joins into one block (``fused.joinable``).

The join copies the whole tensor, all groups together, so the limit is on the whole tensor's size: small
affine parameters (LayerNorm's, biases) join; a Linear's ``(M, p, d)`` group gradients never do, however
few elements one group has (joining four of the transformer bench's cost 27 ms of copies a step on the CPU
and made the materialised route slower in the step than the autotuner had timed it).
"""

from __future__ import annotations

import torch
from torch import nn

import dp_microclip
from dp_microclip import fused
from dp_microclip.reference import naive_microbatch_grads


def test_joinable_limits_the_whole_tensor_not_one_group():
    m = 32
    small_a, small_b = torch.randn(m, 128), torch.randn(m, 128)  # 4,096 elements each: joined
    large = torch.randn(m, 512, 128)  # 65,536 per group, 2 M in all: alone
    groups = fused.joinable({1: small_a, 2: small_b, 3: large, 4: torch.randn(m, 256, 256)})
    (parts,) = groups.values()
    assert set(parts) == {1, 2}
    assert large.numel() > fused.BLOCK_MAX_ELEMENTS >= small_a.numel()


def test_materialised_routes_with_small_and_large_parameters_equal_the_naive_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 256), nn.LayerNorm(256), nn.ReLU(), nn.Linear(256, 4)).double()
    reference = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=0.3, grad_mode="materialize")
    x, y = torch.randn(8, 300, dtype=torch.float64), torch.arange(8) % 4
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    engine.detach()
    with torch.no_grad():
        for p, r in zip(model.parameters(), reference):
            p.copy_(r)
    want = naive_microbatch_grads(model, lambda out, t: torch.nn.functional.cross_entropy(out, t), x, y,
                                  micro_batch_size=1, max_grad_norm=0.3)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-9, atol=1e-12)
