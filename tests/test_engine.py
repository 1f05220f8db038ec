"""Invariants, noise, detach, accumulation, tied weights and keyed groups."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from dp_microclip.reference import naive_microbatch_grads, per_example_clipped_mean_func

from .helpers import engine_grads, rel_err
from .models import TinyTransformer, loss_fn
from .helpers import OwnLossDP

B = 8


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def data(batch=B):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (batch,), generator=g)


def plain_grads(model, x, y):
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_adaptive_at_full_batch_is_plain_sgd():
    model, (x, y) = mlp(), data()
    want = plain_grads(copy.deepcopy(model), x, y)
    got, _ = engine_grads(model, x, y, micro_batch_size=B, max_grad_norm=1.0, clipping="adaptive")
    assert max(rel_err(got[n], want[n]) for n in want) < 1e-12


@pytest.mark.parametrize("b", [1, 2, 8])
def test_huge_bound_without_noise_is_plain_sgd(b):
    model, (x, y) = mlp(), data()
    want = plain_grads(copy.deepcopy(model), x, y)
    got, _ = engine_grads(model, x, y, micro_batch_size=b, max_grad_norm=1e9)
    assert max(rel_err(got[n], want[n]) for n in want) < 1e-12


def test_fixed_b1_equals_per_example_clipping_with_torch_func():
    model, (x, y) = mlp(), data()
    want = per_example_clipped_mean_func(copy.deepcopy(model), loss_fn, x, y, max_grad_norm=0.1)
    got, _ = engine_grads(model, x, y, micro_batch_size=1, max_grad_norm=0.1)
    assert max(rel_err(got[n], want[n]) for n in want) < 1e-10


def test_loss_reduction_sum():
    model, (x, y) = mlp(), data()
    want = naive_microbatch_grads(copy.deepcopy(model), loss_fn, x, y, micro_batch_size=2, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.05, loss_reduction="sum")
    F.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    assert max(rel_err(p.grad, want[n]) for n, p in model.named_parameters()) < 1e-10
    engine.detach()


def test_gradient_accumulation_over_two_passes():
    model, (x, y) = mlp(), data(16)
    want = naive_microbatch_grads(copy.deepcopy(model), loss_fn, x, y, micro_batch_size=4, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=4, max_grad_norm=0.05)
    for half in (slice(0, 8), slice(8, 16)):
        loss_fn(model(x[half]), y[half]).backward()  # a plain per-pass mean: the engine averages over groups
    opt.step()
    assert max(rel_err(p.grad, want[n]) for n, p in model.named_parameters()) < 1e-10
    engine.detach()


def test_adaptive_bound_spans_accumulated_passes():
    model, (x, y) = mlp(), data(16)
    want = naive_microbatch_grads(
        copy.deepcopy(model), loss_fn, x, y, micro_batch_size=4, max_grad_norm=1.0, clipping="adaptive"
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=4, max_grad_norm=1.0, clipping="adaptive")
    for half in (slice(0, 8), slice(8, 16)):
        loss_fn(model(x[half]), y[half]).backward()
    opt.step()
    assert max(rel_err(p.grad, want[n]) for n, p in model.named_parameters()) < 1e-10
    engine.detach()


class TiedLM(nn.Module):
    """Input embedding tied to the output projection, and a layer called twice."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.embed(tokens)))
        h = torch.tanh(self.mix(h))  # same module twice
        return self.out(h.mean(1))


@pytest.mark.parametrize("b", [1, 2, 4])
def test_tied_weights_and_repeated_module_keep_cross_terms(b):
    torch.manual_seed(0)
    model = TiedLM().double()
    tokens = torch.randint(0, 11, (B, 5), generator=torch.Generator().manual_seed(0))
    y = torch.arange(B) % 11
    want = naive_microbatch_grads(copy.deepcopy(model), loss_fn, tokens, y, micro_batch_size=b, max_grad_norm=0.05)
    got, _ = engine_grads(model, tokens, y, micro_batch_size=b, max_grad_norm=0.05)
    assert set(got) == set(want)
    assert max(rel_err(got[n], want[n]) for n in want) < 1e-10


def test_keyed_groups_equal_naive_loop_with_the_same_groups():
    model, (x, y) = mlp(), data(12)
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=3, max_grad_norm=0.05, grouping="keyed", num_groups=4, seed=1)
    loss_fn(model(x), y).backward()
    opt.step()
    groups = engine.last_groups
    want = naive_microbatch_grads(
        reference, loss_fn, x, y, group_index=groups.index, num_groups=4, max_grad_norm=0.05
    )
    assert max(rel_err(p.grad, want[n]) for n, p in model.named_parameters()) < 1e-10
    engine.detach()


# ---------------------------------------------------------------- noise
# DP mode with a declared Poisson loader of expected batch size 8 (these tests feed batches by hand).
DECLARED = dict(sample_rate=0.01, expected_batch_size=8, sampling="poisson")


def test_noise_has_the_right_standard_deviation_and_is_reproducible():
    torch.manual_seed(0)
    model = nn.Linear(200, 100)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    z, C, b, batch = 1.3, 0.7, 2, 8
    engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=C, privacy=OwnLossDP(noise_multiplier=z, **DECLARED), seed=123)
    x = torch.randn(batch, 200)
    (model(x).sum() * 0.0).backward()  # zero gradients: p.grad is pure noise / M
    opt.step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * (batch // b)
    n = noise.numel()
    std = float(noise.std())
    # std of a sample std is sigma / sqrt(2n): 5 of those is far beyond chance.
    assert abs(std - z * C) < 5 * z * C / (2 * n) ** 0.5
    assert abs(float(noise.mean())) < 5 * z * C / n**0.5
    first = noise.clone()
    engine.detach()

    torch.manual_seed(0)
    model2 = nn.Linear(200, 100)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.0)
    engine2 = dp_microclip.attach(model2, opt2, micro_batch_size=b, max_grad_norm=C, privacy=OwnLossDP(noise_multiplier=z, **DECLARED), seed=123)
    (model2(x).sum() * 0.0).backward()
    opt2.step()
    again = torch.cat([p.grad.flatten() for p in model2.parameters()]) * (batch // b)
    assert torch.equal(first, again)
    engine2.detach()


def test_resuming_from_state_dict_gives_the_same_noise():
    def make():
        torch.manual_seed(0)
        model = nn.Linear(5, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return model, opt, dp_microclip.attach(
            model, opt, micro_batch_size=1, max_grad_norm=1.0, privacy=OwnLossDP(noise_multiplier=1.0, sampling="poisson", sample_rate=0.1, expected_batch_size=2),
        )

    def step(model, opt):
        opt.zero_grad()
        (model(torch.ones(2, 5)).sum() * 0).backward()
        opt.step()
        return model.weight.grad.clone()

    model, opt, engine = make()
    step(model, opt)
    saved = engine.state_dict(include_rng_state=True)
    expected = step(model, opt)
    model2, opt2, engine2 = make()
    engine2.load_state_dict(saved)
    assert torch.equal(step(model2, opt2), expected)


def test_noise_toggle():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0, privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=0.1, expected_batch_size=2, sampling="poisson"))
    assert engine.noise
    engine.noise = False
    (model(torch.ones(2, 3)).sum() * 0).backward()
    opt.step()
    assert torch.count_nonzero(model.weight.grad) == 0
    plain = nn.Linear(3, 2)
    engine2 = dp_microclip.attach(plain, torch.optim.SGD(plain.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0)
    with pytest.raises(dp_microclip.ConfigurationError, match="noise_multiplier=z"):
        engine2.noise = True


# ---------------------------------------------------------------- detach
def _fingerprint(model, opt):
    return (
        {n: sorted(vars(m)) for n, m in model.named_modules()},
        {n: (p.requires_grad, sorted(vars(p))) for n, p in model.named_parameters()},
        {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for n, m in model.named_modules()},
        len(opt._optimizer_step_pre_hooks),
    )


def test_detach_restores_plain_training_bitwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.01)
    before = _fingerprint(model, opt)
    engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.1)
    assert not model[0].bias.requires_grad
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(2):  # the first step checks the engine against autograd; then autograd skips weight grads
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        assert model[0].bias.grad is None
        opt.step()
        assert model[0].bias.grad is None  # frozen: never written
        assert not model[0].weight.requires_grad and not model[0].bias.requires_grad
    engine.detach()
    assert _fingerprint(model, opt) == before
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict may share tensors
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        loss_fn(m(x), y).backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_graph_built_before_detach_is_inert():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0)
    out = model(torch.ones(2, 3))
    engine.detach()
    out.sum().backward()  # the old graph's hooks see a disabled engine
    assert engine._sink._records == []


def test_transformer_summary_names_every_path():
    model = TinyTransformer()
    engine = dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2, max_grad_norm=1.0)
    text = engine.summary()
    assert "encoder.layers.0.self_attn: MultiheadAttention -> attention capture" in text
    assert "embed: Embedding -> rule" in text
    engine.detach()


def test_auto_never_times_or_builds_group_gradients_that_exceed_the_memory_budget(monkeypatch):
    # b = 1 on a 256x256 Linear with B = 64: the group gradients (64 x 65k elements) are far larger than
    # everything captured (64 x 512): only the ghost route may even be timed (alone, it needs no timing).
    from dp_microclip.routes import Autotuner

    timed = []
    original = Autotuner._runner

    def spy(self, record, groups, route):
        timed.append(route)
        return original(self, record, groups, route)

    monkeypatch.setattr(Autotuner, "_runner", spy)
    torch.manual_seed(0)
    m = nn.Linear(256, 256)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    engine = dp_microclip.attach(m, opt, micro_batch_size=1, max_grad_norm=1.0, grad_mode="auto")
    m(torch.randn(64, 256)).square().mean().backward()
    assert set(timed) <= {"ghost"}
    assert set(engine.last_strategies.values()) == {"ghost"}
