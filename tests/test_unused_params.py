"""Parameters a step does not use: no record, and the ``.grad`` plain PyTorch would leave (noise-free) or noise (DP).

A module without a rule whose forward leaves a parameter untouched (HF Dinov2's ``mask_token`` without
``bool_masked_pos``) takes the usage route for the parameters it uses. Noise-free, the step then leaves an
unused parameter's ``.grad`` exactly as plain PyTorch would: ``None`` after ``zero_grad()`` (AdamW skips it: no
weight decay, no moment update), zeros after ``zero_grad(set_to_none=False)`` (AdamW updates it). Checked
against plain AdamW training at ``b = B`` and against AdamW fed by the naive micro-batch loop at ``b = 2``,
parameters and optimizer state alike; then gradient accumulation, DP mode (an unused parameter gets noise of
std ``z C / M``), and the generic fallback (it replays only the parameters the forward touched).
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

from .helpers import OwnLossDP

B, N, D_IN, D, CLASSES = 4, 3, 5, 6, 3


class Embeddings(nn.Module):
    """Dinov2-like (no rule: the usage route): a class token and positions always used, a mask token only when a
    mask is passed."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D_IN, D)
        self.cls_token = nn.Parameter(0.3 * torch.randn(1, 1, D))
        self.mask_token = nn.Parameter(0.3 * torch.randn(1, 1, D))
        self.pos = nn.Parameter(0.3 * torch.randn(1, N + 1, D))

    def forward(self, x, mask=None):
        h = self.proj(x)  # (B, N, D)
        if mask is not None:
            m = mask.unsqueeze(-1)
            h = h * (1 - m) + self.mask_token * m
        return torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos


class Net(nn.Module):
    """The embeddings, a head, and a spare head never called (a whole module no step uses)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embeddings = Embeddings()
        self.head = nn.Linear(D, CLASSES)
        self.spare = nn.Linear(D, CLASSES)

    def forward(self, x, mask=None):
        h = torch.tanh(self.embeddings(x, mask))
        return self.head(h[:, 0] + h[:, 1:].mean(1))


def batch(step: int, masked: bool):
    g = torch.Generator().manual_seed(10 + step)
    x = torch.randn(B, N, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (B,), generator=g)
    mask = (torch.rand(B, N, generator=g) < 0.5).double()
    return ((x, mask) if masked else (x,)), y


SCHEDULE = (True, False, False)  # the mask token is used at the first step only


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def train_plain(model, set_to_none: bool):
    opt = adamw(model)
    for step, masked in enumerate(SCHEDULE):
        inputs, y = batch(step, masked)
        opt.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(*inputs), y).backward()
        opt.step()
    return opt


def train_naive(model, set_to_none: bool, b: int, C: float):
    """AdamW fed by the naive micro-batch loop; a parameter it leaves out keeps the .grad zero_grad left."""
    opt = adamw(model)
    for step, masked in enumerate(SCHEDULE):
        inputs, y = batch(step, masked)
        grads = naive_microbatch_grads(copy.deepcopy(model), F.cross_entropy, inputs, y, micro_batch_size=b,
                                       max_grad_norm=C)
        opt.zero_grad(set_to_none=set_to_none)
        for n, p in model.named_parameters():
            if n in grads:
                p.grad = grads[n].clone()
        opt.step()
    return opt


def train_engine(model, set_to_none: bool, b: int, C: float):
    opt = adamw(model)
    engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=C)
    try:
        for step, masked in enumerate(SCHEDULE):
            inputs, y = batch(step, masked)
            opt.zero_grad(set_to_none=set_to_none)
            F.cross_entropy(model(*inputs), y).backward()
            opt.step()
            assert "func" not in engine.last_strategies.values(), engine.last_strategies
            assert any(name.startswith("embeddings[") for name in engine.last_strategies)  # the usage route
    finally:
        engine.detach()
    return opt


def assert_same_training(model, opt, ref_model, ref_opt):
    names = {id(p): n for n, p in ref_model.named_parameters()}
    for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-10), (n, float((p - q).abs().max()))
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-10), n
    mine = {n: opt.state.get(p, {}) for n, p in model.named_parameters()}
    theirs = {names[id(q)]: ref_opt.state.get(q, {}) for q in ref_model.parameters()}
    for n in theirs:
        assert set(mine[n]) == set(theirs[n]), (n, set(mine[n]), set(theirs[n]))
        for key, value in theirs[n].items():
            assert torch.allclose(torch.as_tensor(mine[n][key]).double(), torch.as_tensor(value).double(),
                                  rtol=0, atol=1e-10), (n, key)


@pytest.mark.parametrize("set_to_none", [True, False], ids=["zero_grad", "zero_grad_set_to_none_False"])
@pytest.mark.parametrize("b, C, reference", [(B, 1e6, "plain"), (2, 0.05, "naive")])
def test_noise_free_adamw_equals_plain_pytorch_for_unused_parameters(set_to_none, b, C, reference):
    model = Net().double()
    ref_model = copy.deepcopy(model)
    opt = train_engine(model, set_to_none, b, C)
    ref_opt = train_plain(ref_model, set_to_none) if reference == "plain" else \
        train_naive(ref_model, set_to_none, b, C)
    assert_same_training(model, opt, ref_model, ref_opt)
    token = model.embeddings.mask_token
    # What plain PyTorch does, spelled out: after zero_grad() AdamW skips the unused token (one step of state);
    # after zero_grad(set_to_none=False) it sees zeros and applies weight decay and moment decay at every step.
    assert int(opt.state[token]["step"]) == (1 if set_to_none else len(SCHEDULE))
    assert (token.grad is None) == set_to_none
    assert model.spare.weight.grad is None and model.spare.weight not in opt.state  # never reached


def test_accumulated_passes_average_a_parameter_used_in_one_of_them():
    # Two backward passes before one step: the mask token is used in the first only, so its gradient is that
    # pass's clipped sum over the groups of both passes (zero from the second); the spare head stays untouched.
    model = Net().double()
    passes = [batch(0, True), batch(1, False)]
    want = [naive_microbatch_grads(copy.deepcopy(model), F.cross_entropy, inputs, y, micro_batch_size=2,
                                   max_grad_norm=0.05) for inputs, y in passes]
    assert "embeddings.mask_token" in want[0] and "embeddings.mask_token" not in want[1]
    assert "spare.weight" not in want[0] and "spare.weight" not in want[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.05)
    for inputs, y in passes:
        F.cross_entropy(model(*inputs), y).backward()
    opt.step()
    engine.detach()
    for n, p in model.named_parameters():
        if n.startswith("spare."):
            assert p.grad is None, n
            continue
        expected = (want[0][n] + want[1].get(n, torch.zeros_like(p))) / 2  # both passes have M = 2 groups
        assert torch.allclose(p.grad, expected, rtol=0, atol=1e-12), n


class Wide(nn.Module):
    """A module without a rule holding a large parameter its forward never touches."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(0.3 * torch.randn(CLASSES, D))
        self.unused = nn.Parameter(torch.zeros(4000))

    def forward(self, x):
        return F.linear(x, self.weight)


def test_dp_mode_noises_an_unused_parameter():
    # Whether a batch used a parameter depends on its examples: in DP mode an unused parameter's clipped sum is
    # zero, and it gets the noise of every other parameter, N(0, (z C / M)^2), so that nothing reveals it.
    model = Wide().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    z, C, b = 1.3, 0.7, 2
    engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=C, seed=5, privacy=OwnLossDP(
        noise_multiplier=z, sample_rate=0.01, expected_batch_size=8, sampling="poisson"))
    x, y = torch.randn(8, D, dtype=torch.float64), torch.arange(8) % CLASSES
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert [name.split("#")[0] for name in engine.last_strategies] == ["[linear:weight]"]  # the usage route
    engine.detach()
    noise = model.unused.grad * (8 // b)  # M = 4 public groups
    n = noise.numel()
    assert abs(float(noise.std()) - z * C) < 5 * z * C / (2 * n) ** 0.5
    assert abs(float(noise.mean())) < 5 * z * C / n ** 0.5


class ExpAndSpare(nn.Module):
    """An unrecognised use (``exp``) of one parameter, and one parameter the forward never touches."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(0.1 * torch.randn(D))
        self.spare = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return x * self.w.exp()


class PointerOnly(nn.Module):
    """A parameter whose memory the forward reads through ``data_ptr()`` (as a custom kernel would), unseen."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(1 + 0.1 * torch.randn(D))
        self.table = nn.Parameter(torch.randn(D))

    def forward(self, x):
        self.table.data_ptr()
        return x * self.w


def _block_model(block):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D), block, nn.Tanh(), nn.Linear(D, CLASSES)).double()


def test_the_generic_fallback_replays_only_the_parameters_the_forward_touched():
    model = _block_model(ExpAndSpare())
    x, y = torch.randn(B, D_IN, dtype=torch.float64), torch.arange(B) % CLASSES
    want = naive_microbatch_grads(copy.deepcopy(model), F.cross_entropy, x, y, micro_batch_size=2,
                                  max_grad_norm=0.05)
    assert "1.spare" not in want
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.05)
    with pytest.warns(UserWarning, match=r"usage route cannot take it.*exp"):
        F.cross_entropy(model(x), y).backward()
    opt.step()
    engine.detach()
    assert engine.last_strategies["1"] == "func"
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(want)  # spare: None, as autograd leaves it (the replay gave it no zero gradient)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=0, atol=1e-12), n


def test_a_parameter_read_through_its_pointer_counts_as_touched():
    # Not "unused": its use is unseen, so the module keeps the generic path (refused where that is not allowed).
    model = _block_model(PointerOnly())
    x, y = torch.randn(B, D_IN, dtype=torch.float64), torch.arange(B) % CLASSES
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.05, fallback="error")
    with warnings.catch_warnings(), pytest.raises(dp_microclip.UnsupportedModuleError,
                                                  match=r"\['table'\] reached no recognised function"):
        F.cross_entropy(model(x), y).backward()
    engine.detach()
