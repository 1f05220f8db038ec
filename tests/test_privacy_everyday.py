"""Regression tests for issue 24: everyday training code against DP mode (each failed on the code before).

1 no raw gradient is ever visible, and updates outside the attached optimizer are caught; 2 no silent state
writes in a training forward; 5 the history follows the trained parameters, not the module object; 6 seeds;
and the delta >= 1/N warning.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dp_microclip
from dp_microclip import DP, ConfigurationError, PrivacyError, UnsupportedModuleError
from .helpers import OwnLossDP

N = 200


def dataset(n=N):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def dp_attach(m, opt=None, **kw):
    fields = dict(noise_multiplier=1.0, sample_rate=0.1, delta=1e-5, accountant="rdp")
    fields.update({k: kw.pop(k) for k in list(kw) if k in DP.__dataclass_fields__})
    kw.setdefault("micro_batch_size", 1)
    kw.setdefault("max_grad_norm", 1.0)
    opt = opt if opt is not None else torch.optim.SGD(m.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # re-attach warnings; the tests check epsilon itself
        return dp_microclip.attach(m, opt, privacy=OwnLossDP(**fields), **kw)


def batch(n=8):
    x, y = dataset()[:n]
    return x, y


def train(engine, m, steps):
    it = iter(engine.data_loader(dataset()))
    for _ in range(steps):
        x, y = next(it)
        engine.optimizer.zero_grad()
        F.cross_entropy(m(x), y).backward()
        engine.optimizer.step()


# ------------------------------------------------------------------ 1. no raw gradient is ever visible
@pytest.mark.parametrize("verify_steps", [1, 2])
def test_no_raw_gradient_reaches_p_grad_on_the_verified_steps(verify_steps):
    m = model()
    engine = dp_attach(m, verify_steps=verify_steps, expected_batch_size=8, sampling="poisson")
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    assert all(p.grad is None for p in m.parameters())  # SAM's first_step, p -= lr * p.grad: nothing to read
    engine.optimizer.step()
    written = [p.grad.clone() for p in m.parameters()]
    F.cross_entropy(m(x), y).backward()  # the second verified step (verify_steps=2), or none
    assert all(torch.equal(p.grad, w) for p, w in zip(m.parameters(), written))  # still the noised gradient


def test_noise_free_mode_keeps_autograds_gradient_on_the_first_step():
    m = model()
    dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0)
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    assert all(p.grad is not None for p in m.parameters())


def test_sam_style_second_step_is_refused():
    m = model()
    engine = dp_attach(m)
    train(engine, m, 1)
    with torch.no_grad():  # SAM's first_step: climb to w + rho * g / |g| by hand
        for p in m.parameters():
            p.add_(0.05 * p.grad / p.grad.norm())
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(PrivacyError, match="changed since the last engine step"):
        engine.optimizer.step()
    with pytest.raises(PrivacyError, match="other than the attached optimizer"):
        engine.epsilon()


def test_a_manual_update_is_refused_by_epsilon():
    m = model()
    engine = dp_attach(m)
    train(engine, m, 2)
    with torch.no_grad():
        m[0].weight -= 0.1 * m[0].weight.grad
    with pytest.raises(PrivacyError, match=r"\['0.weight'\].*attached optimizer"):
        engine.epsilon()


def test_an_optimizer_recreated_after_attach_is_refused_at_its_first_step():
    m = model()
    engine = dp_attach(m, expected_batch_size=8, sampling="poisson")
    new_opt = torch.optim.Adam(m.parameters(), lr=1e-3)  # an LR finder, a build_optimizer helper
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(PrivacyError, match="not the optimizer given to attach"):
        new_opt.step()
    engine.detach()
    new_opt.step()  # after detach the model is the user's again


def test_a_second_optimizer_stepped_before_the_engines_is_caught():
    m = model()
    engine = dp_attach(m)
    head = torch.optim.SGD(m[2].parameters(), lr=0.1)
    train(engine, m, 1)
    x, y = next(iter(engine.data_loader(dataset())))
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(PrivacyError, match=r"'2.weight'"):
        head.step()
    engine.optimizer.step()
    assert engine.epsilon() > 0


def test_backward_passes_without_an_engine_step_refuse_epsilon():
    m = model()
    engine = dp_attach(m)
    train(engine, m, 1)
    for x, y in (batch(), batch(6)):
        F.cross_entropy(m(x), y).backward()  # two sampled batches, no step between them
    with pytest.raises(PrivacyError, match="2 backward passes"):
        engine.epsilon()


# ------------------------------------------------------------------ 2. no silent state writes in a forward
class RunningNorm(nn.Module):
    """A hand-written running normaliser: updates its buffers from the batch."""

    def __init__(self, n, replace=False):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n))
        self.replace = replace

    def forward(self, x):
        # The output uses the statistics from BEFORE this batch, so each row depends on its own example only
        # (the per-example contract holds); what leaks is the buffer written from the batch.
        out = x - self.mean.clone()
        if self.replace:
            self.mean = 0.9 * self.mean + 0.1 * x.detach().mean(0)
        else:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return out


@pytest.mark.parametrize("replace", [False, True])
def test_a_running_normaliser_is_refused_naming_it(replace):
    m = nn.Sequential(nn.Linear(6, 8), RunningNorm(8, replace), nn.Linear(8, 3))
    dp_attach(m)
    x, y = batch()
    with pytest.raises(PrivacyError, match=r"1 \(buffer 'mean'\)"):
        F.cross_entropy(m(x), y).backward()


def test_a_running_normaliser_is_accepted_noise_free():
    m = nn.Sequential(nn.Linear(6, 8), RunningNorm(8), nn.Linear(8, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    dp_microclip.attach(m, opt, micro_batch_size=1, max_grad_norm=1.0)
    x, y = batch()
    F.cross_entropy(m(x), y).backward()
    opt.step()


def test_embedding_max_norm_is_refused_at_attach():
    m = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 2))
    with pytest.raises((ConfigurationError, UnsupportedModuleError, PrivacyError), match="max_norm"):
        dp_attach(m)


# ------------------------------------------------------------------ 5. history follows the parameters
class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def _fresh_with_state(m):
    fresh = model(seed=1)
    fresh.load_state_dict(m.state_dict())
    return fresh


@pytest.mark.parametrize("rebuild", [
    lambda m: m, Wrapper, lambda m: nn.Sequential(*m), copy.deepcopy, _fresh_with_state,
], ids=["same", "wrapper", "sequential", "deepcopy", "state_dict"])
def test_trained_parameters_refuse_epsilon_until_the_ledger_is_carried(rebuild):
    m = model()
    first = dp_attach(m)
    train(first, m, 6)
    saved = first.state_dict()
    first.detach()
    again = rebuild(m)
    engine = dp_attach(again, torch.optim.SGD(again.parameters(), lr=0.1))
    with pytest.raises(PrivacyError, match="already took 6 DP step"):
        engine.epsilon()
    engine.load_state_dict(saved)
    assert engine.epsilon() == pytest.approx(first.epsilon())


def test_a_stale_engine_state_that_rewinds_the_count_is_refused():
    m = model()
    first = dp_attach(m)
    at_attach = first.state_dict()
    train(first, m, 3)
    at_three = first.state_dict()
    train(first, m, 3)
    first.detach()
    engine = dp_attach(m)
    for stale in (at_attach, at_three):
        with pytest.raises(PrivacyError, match="rewind"):
            engine.load_state_dict(stale)
    engine.load_state_dict(first.state_dict())
    assert engine.epsilon() == pytest.approx(first.epsilon())


def test_a_fresh_model_of_the_same_seed_is_not_mistaken_for_a_trained_one():
    m = model()
    train(dp_attach(m), m, 3)
    other = model()  # same seed, untrained values
    engine = dp_attach(other)
    assert engine.epsilon() == 0.0


# ------------------------------------------------------------------ 6. seeds
def test_a_seed_in_dp_mode_warns_and_the_statement_says_so():
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="reproducible from the seed"):
        engine = dp_microclip.attach(m, opt, micro_batch_size=1, max_grad_norm=1.0, seed=42,
                                     privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=0.1, delta=1e-5))
    train(engine, m, 1)
    assert "seeded" in engine.privacy_statement()


def test_secure_rng_refuses_a_seed():
    m = model()
    with pytest.raises(ConfigurationError, match="Drop seed="):
        dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0,
                            seed=42, privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=0.1, delta=1e-5, secure_rng=True))


# ------------------------------------------------------------------ delta >= 1/N
def test_delta_at_least_one_over_n_warns_at_data_loader():
    m = model()
    engine = dp_attach(m, delta=0.01)
    with pytest.warns(UserWarning, match="at least 1/N"):
        engine.data_loader(dataset())


def test_a_hand_written_update_in_dp_mode_is_refused_at_the_next_sampled_batch():
    """DP mode writes the noised gradient into .grad in optimizer.step(); a loop that updates the parameters
    by hand sees no gradient and trains nothing. The second sampled batch's forward refuses it (before, the
    loop ran on silently and only epsilon() refused)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    engine = dp_microclip.attach(m, opt, micro_batch_size=1, max_grad_norm=1.0,
                                 privacy=dp_microclip.DP(noise_multiplier=1.0, sample_rate=0.125, delta=1e-5))
    batches = iter(engine.data_loader(TensorDataset(torch.randn(256, 8), torch.randint(0, 3, (256,)))))
    x, y = next(batches)
    engine.loss(F.cross_entropy, m(x), y, reduction="none").backward()
    assert all(p.grad is None for p in m.parameters())  # nothing to update by hand
    x, y = next(batches)
    with pytest.raises(PrivacyError, match=r"never reached optimizer.step\(\)"):
        m(x)
