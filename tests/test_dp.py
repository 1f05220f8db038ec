"""DP mode of the engine: refusals, Poisson loader, keyed groups, epsilon, toggle, budget, resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

import dp_microclip
from dp_microclip import DP
from dp_microclip import ConfigurationError, PrivacyError, UnsupportedModuleError
from dp_microclip.sampling import sample_with_groups

from .models import Scale
from .helpers import OwnLossDP

N = 200


def dataset(n=N):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def dp_attach(m, **kw):
    kw.setdefault("micro_batch_size", 4)
    kw.setdefault("max_grad_norm", 1.0)
    kw.setdefault("sample_rate", 0.1)
    kw.setdefault("delta", 1e-5)
    if "target_epsilon" not in kw:
        kw.setdefault("noise_multiplier", 1.0)
    dp_fields = {k: kw.pop(k) for k in list(kw) if k in DP.__dataclass_fields__}
    return dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), seed=0, privacy=OwnLossDP(**dp_fields), **kw)


def train(engine, m, steps, loader=None):
    loader = loader if loader is not None else engine.data_loader(dataset())
    it = iter(loader)
    for _ in range(steps):
        x, y = next(it)
        engine.optimizer.zero_grad()
        F.cross_entropy(m(x), y).backward()
        engine.optimizer.step()


# ------------------------------------------------------------ refusals
def test_adaptive_clipping_is_refused_in_dp_mode():
    with pytest.raises(PrivacyError, match='has no differential-privacy guarantee.*clipping="fixed"'):
        dp_attach(model(), clipping="adaptive")


def test_contiguous_groups_after_sampling_are_refused():
    with pytest.raises(PrivacyError, match="keyed"):
        dp_attach(model(), grouping="contiguous")


def test_batchnorm_is_refused_in_dp_mode():
    m = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(UnsupportedModuleError, match=r"1 is nn.BatchNorm1d.*ModuleValidator.fix"):
        dp_attach(m)


def test_generic_path_needs_explicit_permission_in_dp_mode():
    # Known at the first forward (the usage route takes what it recognises; Scale's w.exp() it does not).
    m = nn.Sequential(nn.Linear(6, 3), Scale(3))
    dp_attach(m, expected_batch_size=8)  # the public number of groups, as engine.data_loader would give it
    with pytest.raises(UnsupportedModuleError, match='exp.*DP mode.*explicitly.*fallback="generic"'):
        m(torch.randn(8, 6))
    m = nn.Sequential(nn.Linear(6, 3), Scale(3))
    dp_attach(m, fallback="generic", expected_batch_size=8)
    with pytest.warns(UserWarning, match="generic torch.func"):
        m(torch.randn(8, 6))


def test_sample_rate_is_required():
    with pytest.raises(ConfigurationError, match="needs sample_rate"):
        dp_attach(model(), sample_rate=None)


def test_target_epsilon_needs_steps_and_delta():
    with pytest.raises(ConfigurationError, match="steps=... or epochs="):
        dp_attach(model(), target_epsilon=3.0)
    with pytest.raises(ConfigurationError, match="delta="):
        dp_attach(model(), target_epsilon=3.0, delta=None, steps=10)


def test_two_backward_passes_per_step_are_refused():
    m = model()
    engine = dp_attach(m, expected_batch_size=20, sampling="poisson")
    x, y = dataset()[:20]
    for _ in range(2):
        F.cross_entropy(m(x), y).backward()
    with pytest.raises(PrivacyError, match="2 backward passes"):
        engine.optimizer.step()


# ------------------------------------------------------------ sampling and groups
def test_poisson_loader_batches_vary_around_the_expected_size():
    engine = dp_attach(model())
    loader = engine.data_loader(dataset())
    sizes = [len(x) for x, _ in loader]
    assert len(sizes) == 10  # one epoch = 1/q steps
    sizes += [len(x) for _ in range(9) for x, _ in loader]
    mean = sum(sizes) / len(sizes)
    assert len(set(sizes)) > 3
    assert abs(mean - 20) < 4 * math.sqrt(20 * 0.9 / len(sizes))


@settings(max_examples=60, deadline=None)
@given(
    coins=st.lists(st.floats(0, 1, exclude_max=True), min_size=2, max_size=40),
    removed=st.integers(min_value=0),
    q=st.sampled_from([0.05, 0.3, 0.9]),
    m=st.integers(1, 6),
)
def test_removing_one_record_changes_exactly_one_group(coins, removed, q, m):
    coins_t = torch.tensor(coins, dtype=torch.float64)
    removed %= len(coins)
    ids = torch.arange(len(coins))
    keep = ids != removed
    idx_a, groups_a = sample_with_groups(coins_t, q, m)
    idx_b, groups_b = sample_with_groups(coins_t[keep], q, m)
    contents_a = [set(idx_a[groups_a == j].tolist()) for j in range(m)]
    contents_b = [set(ids[keep][idx_b][groups_b == j].tolist()) for j in range(m)]  # record identities
    changed = [j for j in range(m) if contents_a[j] != contents_b[j]]
    assert len(changed) == (1 if coins[removed] < q else 0)
    if changed:
        assert contents_a[changed[0]] - contents_b[changed[0]] == {removed}


def test_keyed_groups_in_dp_mode_come_from_the_sampler():
    m = model()
    engine = dp_attach(m)
    loader = engine.data_loader(dataset())
    x, y = next(iter(loader))
    F.cross_entropy(m(x), y).backward()
    assert engine.last_groups.num_groups == 5  # public M = round(0.1 * 200 / 4)
    assert engine.last_groups.batch_size == len(x)


def test_empty_batch_makes_a_noise_only_step():
    m = model()
    engine = dp_attach(m, micro_batch_size=1, sample_rate=1e-9, noise_multiplier=1.0)
    loader = engine.data_loader(dataset(), num_workers=0)
    x, y = next(iter(loader))
    assert len(x) == 0
    out = m(x)
    (out.sum() * 0).backward()  # nothing flows: no example
    engine.optimizer.step()
    assert all(torch.count_nonzero(p.grad) > 0 for p in m.parameters())
    assert engine._privacy.ledger.steps == 1


# ------------------------------------------------------------ epsilon
def _reference_epsilon(q, z, steps, b, delta):
    import dp_accounting

    z_eff = z / 2 if b > 1 else z
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z_eff)), steps
    )
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("b", [1, 4])
def test_epsilon_matches_dp_accounting_for_the_steps_taken(b):
    m = model()
    engine = dp_attach(m, micro_batch_size=b, accountant="rdp")
    train(engine, m, steps=5)
    want = _reference_epsilon(0.1, 1.0, 5, b, 1e-5)
    assert engine.epsilon() == pytest.approx(want, rel=0.01)


def test_noise_off_makes_epsilon_infinite():
    m = model()
    engine = dp_attach(m, accountant="rdp")
    loader = engine.data_loader(dataset())
    train(engine, m, 2, loader)
    assert math.isfinite(engine.epsilon())
    engine.noise = False
    train(engine, m, 1, loader)
    assert engine.epsilon() == math.inf
    engine.noise = True
    train(engine, m, 1, loader)
    assert engine.epsilon() == math.inf  # never the epsilon of the noisy steps alone
    assert "inf" in engine.privacy_statement().lower()


def test_own_loader_without_declaration_is_refused_at_the_first_step():
    m = model()
    engine = dp_attach(m, expected_batch_size=20, accountant="rdp")
    loader = torch.utils.data.DataLoader(dataset(), batch_size=20, shuffle=True)
    with pytest.raises(PrivacyError, match='did not come from engine.data_loader.*sampling="poisson"'):
        train(engine, m, 1, loader)  # the first step, not epsilon() afterwards
    assert engine.steps_taken == 0


def test_declared_poisson_loader_gets_an_epsilon_and_says_so():
    m = model()
    engine = dp_attach(m, expected_batch_size=20, sampling="poisson", accountant="rdp")
    loader = torch.utils.data.DataLoader(dataset(), batch_size=20, shuffle=True)
    train(engine, m, 2, loader)
    assert engine.epsilon() == pytest.approx(_reference_epsilon(0.1, 1.0, 2, 4, 1e-5), rel=0.01)
    assert "declar" in engine.privacy_statement().lower()


def test_noise_free_engine_reports_infinite_epsilon():
    m = model()
    engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0)
    assert engine.epsilon(1e-5) == math.inf
    assert "no differential-privacy guarantee" in engine.privacy_statement()


def test_target_epsilon_calibrates_and_enforces_the_budget():
    m = model()
    engine = dp_attach(m, target_epsilon=8.0, steps=4, accountant="rdp")
    loader = engine.data_loader(dataset())
    train(engine, m, 4, loader)
    assert engine.epsilon() <= 8.0
    assert engine.epsilon() == pytest.approx(8.0, rel=0.01)
    with pytest.raises(PrivacyError, match="budget exhausted"):
        train(engine, m, 1, loader)


def test_budget_enforcement_refuses_a_noise_free_step():
    m = model()
    engine = dp_attach(m, target_epsilon=8.0, steps=4, accountant="rdp")
    loader = engine.data_loader(dataset())
    engine.noise = False
    with pytest.raises(PrivacyError, match="makes epsilon infinite"):
        train(engine, m, 1, loader)


def test_resume_from_state_dict_reports_the_same_epsilon():
    m = model()
    engine = dp_attach(m, accountant="rdp")
    train(engine, m, 3)
    state = engine.state_dict()
    m2 = model()
    engine2 = dp_attach(m2, accountant="rdp")
    engine2.data_loader(dataset())
    engine2.load_state_dict(state)
    assert engine2.epsilon() == engine.epsilon()


# ------------------------------------------------------------ regressions found in review
def test_budget_is_checked_not_trusted_when_the_user_sets_both_noise_and_target():
    # z = 0.3 over 30 planned steps far exceeds epsilon 1: the plan must not be taken on trust.
    m = model()
    engine = dp_attach(m, noise_multiplier=0.3, target_epsilon=1.0, steps=30, accountant="rdp", micro_batch_size=1)
    loader = engine.data_loader(dataset())
    with pytest.raises(PrivacyError, match="budget exhausted"):
        for _ in range(10):
            train(engine, m, 3, loader)
    assert engine.epsilon() <= 1.0


def test_an_evaluation_forward_with_grad_enabled_does_not_void_the_epsilon():
    m = model()
    engine = dp_attach(m, accountant="rdp")
    loader = engine.data_loader(dataset())
    for x, y in loader:
        engine.optimizer.zero_grad()
        F.cross_entropy(m(x), y).backward()
        m(torch.randn(8, 6))  # evaluation outside torch.no_grad(), never backpropagated
        engine.optimizer.step()
        break
    assert math.isfinite(engine.epsilon())


def test_unknown_accountant_and_unsupported_adjacency_fail_at_attach():
    with pytest.raises(PrivacyError, match="Unknown accountant 'foo'"):
        dp_attach(model(), accountant="foo")
    with pytest.raises(PrivacyError, match='accountant="pld"'):
        dp_attach(model(), adjacency="replace_one", accountant="prv")
    dp_attach(model(), adjacency="replace_one", accountant="pld")  # the backend that analyses it


def test_noise_free_data_loader_with_default_grouping_handles_ragged_batches():
    m = model()
    engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=4, max_grad_norm=1.0)
    loader = engine.data_loader(dataset(), batch_size=18)  # Poisson batches, rarely a multiple of 4
    train(engine, m, 5, loader)
    assert engine.grouping == "keyed"
    assert math.isfinite(float(sum(p.grad.norm() for p in m.parameters())))
