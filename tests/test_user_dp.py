"""User-level DP: users sampled at rate q, at most k examples each, one clipped micro-batch per user.

The update is checked against a naive loop that builds each sampled user's micro-batch by hand
(float64), the sampling against its binomial law, the ledger against dp_accounting at sensitivity C,
and every refusal against its message.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import accounting
import dp_microclip
from accounting.backends.rdp import DEFAULT_ORDERS
from dp_microclip import DP, ConfigurationError, PrivacyError
from dp_microclip.users import UserIndex, sample_users

from tests.accounting import reference
from .helpers import OwnLossDP

N, K, Q, C = 240, 3, 0.2, 0.5


def user_ids(n=N, seed=0):
    """A heavy tail: a few users with many examples, many with one or two."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, 61, dtype=torch.float64)
    return torch.multinomial(weights, n, replacement=True, generator=g)


def dataset(n=N, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g), torch.arange(n))


def model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def user_attach(m, *, k=K, q=Q, **kw):
    kw.setdefault("noise_multiplier", 1.0)
    kw.setdefault("delta", 1e-5)
    dp_fields = {f: kw.pop(f) for f in list(kw) if f in DP.__dataclass_fields__}
    mbs = kw.pop("micro_batch_size", k)
    privacy = OwnLossDP(sample_rate=q, privacy_unit="user", max_examples_per_user=k, **dp_fields)
    return dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.0), micro_batch_size=mbs, max_grad_norm=C,
                               seed=kw.pop("seed", 0), privacy=privacy, **kw)


def naive_user_update(plain, x, y, users, public_m):
    """Each user's rows by hand: mean loss gradient, clipped to C, summed, divided by the public M.

    ``plain`` is an unattached copy of the model (same parameters).
    """
    total = [torch.zeros_like(p) for p in plain.parameters()]
    norms = []
    for u in users.unique():
        rows = users == u
        grads = torch.autograd.grad(F.cross_entropy(plain(x[rows]), y[rows]), list(plain.parameters()))
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, C / (float(norm) + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    return [t / public_m for t in total], norms


# ------------------------------------------------------------ the update
def test_user_level_update_equals_the_naive_per_user_loop_float64():
    m, plain = model(torch.float64), model(torch.float64)
    engine = user_attach(m, grad_mode="materialize")
    engine.noise = False
    ids = user_ids()
    loader = engine.data_loader(dataset(dtype=torch.float64), user_ids=ids)
    public_m = round(Q * len(ids.unique()))
    assert engine.grouping == "user"
    checked, clipped = 0, 0
    for step, (x, y, idx) in enumerate(loader):
        users = ids[idx]
        assert int(torch.bincount(users).max()) <= K  # the contribution bound
        engine.optimizer.zero_grad()
        F.cross_entropy(m(x), y).backward()
        assert engine.last_groups.num_groups == len(users.unique())
        assert torch.equal(engine.last_groups.index.unique(), torch.arange(len(users.unique())))
        want, norms = naive_user_update(plain, x, y, users, public_m)
        engine.optimizer.step()
        for p, w in zip(m.parameters(), want):
            torch.testing.assert_close(p.grad, w, rtol=1e-9, atol=1e-12)
        checked += 1
        clipped += sum(n > C for n in norms)
        if step == 3:
            break
    assert checked == 4 and clipped > 0  # the bound was active for some users


def test_user_level_physical_chunks_equal_the_one_shot_step_float64():
    # The same sampled users, once in one pass and once in chunks of at most 7 rows (whole users per chunk).
    steps = {}
    for physical in (None, 7):
        m = model(torch.float64)
        engine = user_attach(m, grad_mode="materialize")
        engine.noise = False
        loader = engine.data_loader(dataset(dtype=torch.float64), user_ids=user_ids(), max_physical_batch_size=physical)
        grads, chunks = [], 0
        for x, y, idx in loader:
            assert physical is None or len(idx) <= physical or len(user_ids()[idx].unique()) == 1
            engine.optimizer.zero_grad()
            F.cross_entropy(m(x), y).backward()
            engine.optimizer.step()
            chunks += 1
            if engine.steps_taken > len(grads):
                grads.append([p.grad.clone() for p in m.parameters()])
            if len(grads) == 3:
                break
        steps[physical] = (grads, chunks, engine.epsilon())
    (one, one_passes, eps_one), (chunked, chunk_passes, eps_chunked) = steps[None], steps[7]
    assert chunk_passes > one_passes  # the chunks really split the sampled batches
    for a, b in zip(one, chunked):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-13)
    assert eps_chunked == eps_one  # one ledger step per sampled batch


def test_a_user_larger_than_a_physical_chunk_is_refused():
    engine = user_attach(model())
    with pytest.raises(ConfigurationError, match=r"max_examples_per_user=3 is larger than max_physical_batch_size=2"):
        engine.data_loader(dataset(), user_ids=user_ids(), max_physical_batch_size=2)


def test_users_with_more_than_k_examples_give_a_uniform_k_of_them():
    ids = torch.tensor([0] * 10 + [1] * 2 + list(range(2, 40)))
    index = UserIndex(ids, len(ids))
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(len(ids))
    steps, q, k = 1500, 0.5, 3
    for step in range(steps):
        rows, slots = sample_users(index, q, k, gen)
        counts[rows] += 1
        if step < 100:
            assert torch.equal(rows, rows.sort().values)
            assert int(torch.bincount(ids[rows], minlength=1).max()) <= k
            # rows of one slot all belong to one user; slots number the sampled users 0..S-1
            assert torch.equal(slots.unique(), torch.arange(len(ids[rows].unique())))
            for s in slots.unique():
                assert len(ids[rows[slots == s]].unique()) == 1
    heavy = counts[:10] / steps  # each of user 0's examples: q * k / 10
    p = q * k / 10
    sd = math.sqrt(p * (1 - p) / steps)
    assert (heavy - p).abs().max() < 5 * sd
    assert abs(float(counts[10:12].mean()) / steps - q) < 5 * math.sqrt(q * (1 - q) / steps)  # n_u <= k: all


def test_user_inclusion_rate_is_q():
    ids = user_ids(n=600, seed=5)
    index = UserIndex(ids, len(ids))
    gen = torch.Generator().manual_seed(11)
    q, steps = 0.05, 400
    included = 0
    for _ in range(steps):
        rows, _ = sample_users(index, q, K, gen)
        included += len(ids[rows].unique())
    trials = steps * index.num_users
    sd = math.sqrt(trials * q * (1 - q))
    assert abs(included - trials * q) < 4 * sd, (included, trials * q, sd)


def test_user_inclusion_rate_through_the_engine_loader():
    m = model()
    engine = user_attach(m, q=0.1)
    ids = user_ids()
    loader = engine.data_loader(dataset(), user_ids=ids)
    num_users = len(ids.unique())
    seen = 0
    for x, y, idx in loader:  # one epoch: round(1/q) = 10 steps
        seen += len(ids[idx].unique())
        engine.optimizer.zero_grad()
        F.cross_entropy(m(x), y).backward() if len(x) else (m(x).sum() * 0).backward()
        engine.optimizer.step()
    trials = len(loader) * num_users
    assert len(loader) == 10
    assert abs(seen - 0.1 * trials) < 4 * math.sqrt(trials * 0.1 * 0.9)


def test_noise_is_zC_on_the_sum_divided_by_the_public_M():
    torch.manual_seed(0)
    m = nn.Linear(40, 50).double()
    ds = TensorDataset(torch.randn(N, 40, dtype=torch.float64), torch.randint(0, 50, (N,)), torch.arange(N))
    ids = user_ids()
    grads = []
    for noise in (False, True):
        mm = copy.deepcopy(m)
        engine = user_attach(mm, noise_multiplier=2.0, seed=7)
        engine.noise = noise
        x, y, _ = next(iter(engine.data_loader(ds, user_ids=ids)))  # the same seed: the same batch
        F.cross_entropy(mm(x), y).backward()
        engine.optimizer.step()
        grads.append(torch.cat([p.grad.flatten() for p in mm.parameters()]))
    public_m = round(Q * len(ids.unique()))
    z = (grads[1] - grads[0]) / (2.0 * C / public_m)
    assert abs(float(z.std()) - 1.0) < 0.1 and abs(float(z.mean())) < 0.1


# ------------------------------------------------------------ accounting
@pytest.mark.parametrize("accountant", ["rdp_google", "pld"])
def test_user_level_epsilon_equals_dp_accounting_at_sensitivity_C(accountant):
    m = model()
    engine = user_attach(m, accountant=accountant, q=0.1)
    loader = engine.data_loader(dataset(), user_ids=user_ids())
    for step, (x, y, _) in enumerate(loader):
        engine.optimizer.zero_grad()
        F.cross_entropy(m(x), y).backward()
        engine.optimizer.step()
        if step == 5:
            break
    segments = [(1.0, 0.1, 6)]  # z as given (sensitivity C), not z / 2 as for keyed b = 3 examples
    want = (reference.rdp_epsilon(segments, 1e-5, orders=DEFAULT_ORDERS) if accountant == "rdp_google"
            else reference.pld_epsilon(segments, 1e-5))
    assert engine.epsilon() == pytest.approx(want, rel=0.01)


@pytest.mark.parametrize("q,z,steps,k", [(0.01, 1.1, 1000, 8), (0.05, 0.8, 200, 1), (0.002, 2.0, 5000, 64)])
def test_ledger_for_users_equals_dp_accounting(q, z, steps, k):
    ledger = accounting.Ledger()
    ledger.record(accounting.Mechanism(sample_rate=q, noise_multiplier=z, micro_batch_size=k, grouping="user",
                                       privacy_unit="user", max_examples_per_user=k), steps)
    assert ledger.privacy_unit == "user"
    assert ledger.epsilon(1e-6, "pld") == pytest.approx(reference.pld_epsilon([(z, q, steps)], 1e-6), rel=0.01)
    want = reference.rdp_epsilon([(z, q, steps)], 1e-6, orders=DEFAULT_ORDERS)
    assert ledger.epsilon(1e-6, "rdp_google") == pytest.approx(want, rel=0.01)


def test_rule_table_row_and_mixed_units_refused():
    user = accounting.Mechanism(sample_rate=0.01, noise_multiplier=1.0, micro_batch_size=8, grouping="user",
                                privacy_unit="user", max_examples_per_user=8)
    assert accounting.sensitivity(user) == accounting.Sensitivity(contribution=1, neighbour_distance=1)
    replace = accounting.Mechanism(sample_rate=0.01, noise_multiplier=1.0, micro_batch_size=8, grouping="user",
                                   privacy_unit="user", max_examples_per_user=8, adjacency="replace_one")
    assert accounting.sensitivity(replace) == accounting.Sensitivity(contribution=1, neighbour_distance=2)
    with pytest.raises(ValueError, match="needs grouping='user'"):
        accounting.Mechanism(sample_rate=0.01, noise_multiplier=1.0, privacy_unit="user", max_examples_per_user=2)
    with pytest.raises(ValueError, match="pass privacy_unit='user'"):
        accounting.Mechanism(sample_rate=0.01, noise_multiplier=1.0, max_examples_per_user=2)
    ledger = accounting.Ledger()
    ledger.record(user)
    with pytest.raises(accounting.PrivacyRefusal, match="one privacy unit throughout"):
        ledger.record(accounting.Mechanism(sample_rate=0.01, noise_multiplier=1.0))
    assert accounting.Ledger.from_state_dict(ledger.state_dict()).entries == ledger.entries


def test_statement_protects_one_user_and_states_k_and_public_users():
    m = model()
    engine = user_attach(m, accountant="rdp")
    ids = user_ids()
    x, y, _ = next(iter(engine.data_loader(dataset(), user_ids=ids)))
    F.cross_entropy(m(x), y).backward()
    engine.optimizer.step()
    text = engine.privacy_statement()
    assert "protects one user" in text and f"k={K}" in text
    assert f"number of users U = {len(ids.unique())}" in text and "treated as public" in text
    assert "sensitivity C," in text


def test_target_epsilon_calibrates_for_users():
    m = model()
    engine = user_attach(m, noise_multiplier=None, target_epsilon=2.0, steps=50, accountant="rdp")
    want = accounting.noise_multiplier_for_epsilon(2.0, 1e-5, sample_rate=Q, steps=50, accountant="rdp")
    assert engine.noise_multiplier == pytest.approx(want)  # the b = 1 value: sensitivity C


# ------------------------------------------------------------ refusals
def test_user_ids_missing_is_refused():
    engine = user_attach(model())
    with pytest.raises(ConfigurationError, match=r"needs each example's user id: engine.data_loader\(dataset, "
                                                 r"user_ids=ids\)"):
        engine.data_loader(dataset())


def test_user_ids_not_one_per_example_is_refused():
    engine = user_attach(model())
    with pytest.raises(ConfigurationError, match=r"user_ids has 239 entries but the dataset has 240 examples: "
                                                 "give one user id per example"):
        engine.data_loader(dataset(), user_ids=user_ids()[:-1])


@pytest.mark.parametrize("k", [0, -1, 1.5, True, None])
def test_k_below_one_or_not_an_integer_is_refused(k):
    with pytest.raises(ConfigurationError, match="needs max_examples_per_user, an integer >= 1"):
        user_attach(model(), k=k, micro_batch_size=1)


def test_user_ids_that_change_between_epochs_are_refused():
    engine = user_attach(model())
    ds, ids = dataset(), user_ids()
    engine.data_loader(ds, user_ids=ids)
    engine.data_loader(ds, user_ids=ids.clone())  # the same ids again: fine
    changed = ids.clone()
    changed[0] = changed[1] + 100
    with pytest.raises(PrivacyError, match="other user ids for this dataset than before.*Pass the same user ids"):
        engine.data_loader(ds, user_ids=changed)


def test_other_misconfigurations_are_refused_with_the_fix():
    with pytest.raises(ConfigurationError, match=r"Pass attach\(\.\.\., micro_batch_size=3\)"):
        user_attach(model(), micro_batch_size=1)
    def example_attach(**dp_fields):
        m = model()
        return dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1,
                                   max_grad_norm=1.0, privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=0.1, **dp_fields))

    with pytest.raises(ConfigurationError, match="drop max_examples_per_user"):
        example_attach(max_examples_per_user=3)
    with pytest.raises(PrivacyError, match="Use DP\\(sampling='engine'\\)"):
        user_attach(model(), sampling="poisson")
    with pytest.raises(ConfigurationError, match="Leave grouping out"):
        user_attach(model(), grouping="keyed")
    with pytest.raises(ConfigurationError, match="is not one of"):
        example_attach(privacy_unit="person")
    with pytest.raises(ConfigurationError, match="needs user-level DP"):
        example_attach().data_loader(dataset(), user_ids=user_ids())
    with pytest.raises(ConfigurationError, match="Drop batch_size"):
        user_attach(model()).data_loader(dataset(), batch_size=48, user_ids=user_ids())
    engine = user_attach(model())
    with pytest.raises(PrivacyError, match="collate_keeps_order=True"):
        engine.data_loader(dataset(), user_ids=user_ids(), collate_fn=lambda rows: rows)


def test_user_ids_as_a_list_of_strings_or_a_column():
    ids = [f"user{int(u)}" for u in user_ids()]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, key):
            return ids if key == "author" else dataset()[key]

    m = model()
    engine = user_attach(m)
    for given in (ids, "author"):
        x, y, idx = next(iter(engine.data_loader(Rows(), user_ids=given)))
        assert max(sum(ids[i] == u for i in idx.tolist()) for u in {ids[i] for i in idx.tolist()}) <= K
