"""``torch.compile(model)`` after ``attach``: the compiled step equals the naive micro-batch loop, with taps, not breaks.

Under compilation the hooked layers' outputs go through ``traced.Tap`` and their records are completed by an
opaque op in the compiled backward (``dp_microclip/traced.py``). The gradients of every compiled step are
checked against ``dp_microclip.reference`` (float64), on a model with an embedding, a Transformer encoder
layer (MHA projections, LayerNorm, feed-forward Linears) and a Linear head, with a new batch each step (so a
stale forward pass would show); the steady-state steps must complete their records through the taps. In DP
mode (keyed groups, noise, the first batch's per-example checks) the compiled update equals the eager one
with the same seed.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from dp_microclip.reference import naive_microbatch_grads
from dp_microclip.traced import TracedCapture


class Tiny(nn.Module):
    """Embedding, one Transformer encoder layer (d=8, 2 heads), mean over positions, Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens)).mean(1))


TAPPED = sorted(["embed", "layer.self_attn", "layer.self_attn", "layer.linear1", "layer.linear2", "layer.norm1",
                 "layer.norm2", "head"])


@pytest.fixture
def tapped(monkeypatch):
    """The unit paths whose records were completed through a tap (traced.py), in arrival order."""
    seen: list[str] = []
    for name in ("complete", "complete_projection"):
        original = getattr(TracedCapture, name)

        def spy(self, *args, _original=original, **kwargs):
            seen.append(args[0].path)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TracedCapture, name, spy)
    return seen


@pytest.mark.slow
def test_a_compiled_step_equals_the_naive_loop(tapped):
    torch.manual_seed(0)
    model = Tiny().double()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.3, verify_steps=0, grad_mode="bookkeeping")
    compiled = torch.compile(model)
    for step in range(3):
        x = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(step))
        y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(10 + step))
        tapped.clear()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(compiled(x), y).backward()
        opt.step()
        want = naive_microbatch_grads(ref, F.cross_entropy, x, y, micro_batch_size=2, max_grad_norm=0.3)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12, msg=f"step {step}: {name}")
        if step:  # steady state: every hooked layer went through a tap (no eager hook, no graph break there)
            assert sorted(tapped) == TAPPED, tapped


@pytest.mark.slow
def test_a_compiled_dp_step_equals_the_eager_dp_step(tapped):
    """DP mode (keyed groups, noise, the per-example checks on the first batch) compiled: the same update as the
    eager engine with the same seed, which the equality and DP tests check against the naive loop and the
    noise's standard deviation."""
    torch.manual_seed(0)
    eager_model = Tiny().double()
    compiled_model = copy.deepcopy(eager_model)
    runs = []
    for model in (eager_model, compiled_model):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        privacy = dp_microclip.DP(noise_multiplier=1.0, sample_rate=0.01, expected_batch_size=8, sampling="poisson",
                                  delta=1e-5, accountant="rdp", require_verified_loss=False)  # warns instead
        dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=0.3, verify_steps=0, seed=0,
                            privacy=privacy)
        runs.append((model, opt, model if model is eager_model else torch.compile(model)))
    for step in range(3):
        x = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(step))
        y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(10 + step))
        tapped.clear()
        for _, opt, run in runs:
            opt.zero_grad(set_to_none=True)
            with pytest.warns(UserWarning) if step == 0 else contextlib.nullcontext():
                F.cross_entropy(run(x), y).backward()
                opt.step()
        for (name, p), q in zip(eager_model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=f"step {step}: {name}")
        if step:  # the compiled model's layers went through taps (the eager one's through hooks)
            assert sorted(tapped) == TAPPED, tapped
