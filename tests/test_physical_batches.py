"""Physical batches: one sampled logical batch in chunks of at most ``max_physical_batch_size`` examples.

The update of a chunked logical batch equals the one-shot step on the same batch (float64, 1e-10), with one
noise draw, one ledger step and one optimizer update per logical batch; the DP guards still refuse anything
but the chunks of ONE sampled batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dp_microclip
from dp_microclip import ConfigurationError, PrivacyError
from dp_microclip.sampling import plan_chunks
from .helpers import OwnLossDP

N, Q = 200, 0.2  # expected logical batch q N = 40


def dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g))


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def attach(m, b, opt_cls=torch.optim.SGD, dp=True, **opt_kw):
    opt_kw = opt_kw or {"lr": 0.5, "momentum": 0.9}
    opt = opt_cls(m.parameters(), **opt_kw)
    privacy = OwnLossDP(noise_multiplier=1.0, sample_rate=Q, delta=1e-5) if dp else None
    return dp_microclip.attach(m, opt, micro_batch_size=b, max_grad_norm=0.1, seed=0, privacy=privacy)


def train(engine, m, logical_steps, chunk=None, loader=None):
    """The user's loop, unchanged: zero_grad, backward, step after every chunk the loader yields."""
    if loader is None:
        batch_size = None if engine.dp else round(Q * N)
        loader = engine.data_loader(dataset(), batch_size, max_physical_batch_size=chunk)
    sizes = []
    for x, y in loader:
        if engine.steps_taken == logical_steps:
            break
        engine.optimizer.zero_grad()
        F.cross_entropy(m(x), y).backward()
        engine.optimizer.step()
        sizes.append(len(x))
    return sizes


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("b,chunk", [(1, 7), (4, 9), (4, 3)])  # (4, 3): groups larger than a chunk
def test_chunked_update_equals_the_one_shot_step(b, chunk, noise):
    steps = 3
    runs = {}
    for k in (None, chunk):
        m = model()
        engine = attach(m, b)
        engine.noise = noise
        runs[k] = (m, engine, train(engine, m, steps, chunk=k))
    (m1, e1, sizes1), (m2, e2, sizes2) = runs[None], runs[chunk]
    assert len(sizes1) == steps and len(sizes2) > steps  # the chunked run took more forward passes
    assert b > 1 or max(sizes2) <= chunk
    assert sum(sizes1) == sum(sizes2)  # the same logical batches
    assert max_diff(m1, m2) < 1e-10  # noise on: one draw per logical batch, the same one (same seed)
    assert e1.steps_taken == e2.steps_taken == steps
    assert e2._privacy.ledger.steps == steps
    assert e1.epsilon() == e2.epsilon()


def test_noise_is_drawn_once_per_logical_batch_with_std_zC_over_M():
    """With a zero learning-rate the update is pure noise plus the clipped mean: its std is z C / M."""
    m = nn.Sequential(nn.Linear(6, 400, bias=False)).double()
    engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.0), micro_batch_size=1, max_grad_norm=1.0,
                                 seed=0, privacy=OwnLossDP(noise_multiplier=2.0, sample_rate=Q, delta=1e-5))
    grads = []
    loader = engine.data_loader(dataset(), max_physical_batch_size=5)
    for x, _ in loader:
        engine.optimizer.zero_grad()
        (m(x) * 0).sum().backward()  # zero gradient: what reaches p.grad is the noise alone
        engine.optimizer.step()
        if m[0].weight.grad is not None:
            grads.append(m[0].weight.grad.clone())
    assert len(grads) == engine.steps_taken == len(loader)
    m_public = round(Q * N)
    std = torch.stack(grads).std().item()
    assert abs(std / (2.0 * 1.0 / m_public) - 1) < 0.05


@pytest.mark.parametrize("b", [1, 4])
def test_noise_free_chunks_equal_the_one_shot_step(b):
    m1, m2 = model(), model()
    e1, e2 = attach(m1, b, dp=False), attach(m2, b, dp=False)
    train(e1, m1, 3)
    train(e2, m2, 3, chunk=6)
    assert max_diff(m1, m2) < 1e-10


def test_adam_steps_once_per_logical_batch():
    m1, m2 = model(), model()
    e1 = attach(m1, 4, torch.optim.Adam, lr=1e-2)
    e2 = attach(m2, 4, torch.optim.Adam, lr=1e-2)
    train(e1, m1, 4)
    sizes = train(e2, m2, 4, chunk=8)
    assert len(sizes) > 4
    assert all(int(s["step"]) == 4 for s in e2.optimizer.state.values())
    assert max_diff(m1, m2) < 1e-10


def test_groups_stay_whole_and_follow_their_coins():
    g = torch.Generator().manual_seed(1)
    indices = torch.arange(50)
    groups = torch.randint(0, 12, (50,), generator=g)
    chunks = plan_chunks(indices, groups, 10)
    seen = torch.cat([c for c, _ in chunks])
    assert sorted(seen.tolist()) == indices.tolist()
    for c, cg in chunks:
        assert torch.equal(groups[c], cg)  # a record keeps the group its coin chose
    owners = [set(cg.tolist()) for _, cg in chunks]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1:])  # no group split
    assert all(len(c) <= 10 or len(set(cg.tolist())) == 1 for c, cg in chunks)
    assert [len(c) for c, _ in plan_chunks(torch.arange(0), None, 4)] == [0]  # empty batch: one empty chunk
    assert [len(c) for c, _ in plan_chunks(torch.arange(0), torch.arange(0), 4)] == [0]


def test_empty_logical_batch_makes_one_noise_only_step():
    m = model()
    engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0,
                                 seed=0, privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=1e-9, delta=1e-5))
    x, y = next(iter(engine.data_loader(dataset(), max_physical_batch_size=4)))
    assert len(x) == 0
    (m(x).sum() * 0).backward()
    engine.optimizer.step()
    assert all(torch.count_nonzero(p.grad) > 0 for p in m.parameters())
    assert engine._privacy.ledger.steps == 1


def test_resume_between_chunks_restarts_that_logical_batch():
    ref = model()
    e_ref = attach(ref, 4)
    train(e_ref, ref, 4, chunk=8)

    m = model()
    engine = attach(m, 4)
    loader = engine.data_loader(dataset(), max_physical_batch_size=8)
    it = iter(loader)
    while True:  # two logical batches and the first chunk of the third
        x, y = next(it)
        engine.optimizer.zero_grad()
        F.cross_entropy(m(x), y).backward()
        engine.optimizer.step()
        if engine.steps_taken == 2:
            x, y = next(it)
            F.cross_entropy(m(x), y).backward()
            engine.optimizer.step()
            assert engine.steps_taken == 2  # an intermediate chunk: no step
            break
    saved = engine.state_dict(include_rng_state=True), copy.deepcopy(m.state_dict()), engine.optimizer.state_dict()

    m2 = model()
    e2 = attach(m2, 4)
    m2.load_state_dict(saved[1])
    e2.optimizer.load_state_dict(saved[2])
    e2.load_state_dict(saved[0])
    train(e2, m2, 4, chunk=8)
    assert e2.steps_taken == 4 and e2._privacy.ledger.steps == 4
    assert max_diff(ref, m2) < 1e-10


def test_two_sampled_batches_in_one_step_are_still_refused():
    m = model()
    engine = attach(m, 1)
    loader = engine.data_loader(dataset(), max_physical_batch_size=8)
    with pytest.raises(PrivacyError, match="sampled batches|backward passes"):
        for i, (x, y) in enumerate(loader):
            F.cross_entropy(m(x), y).backward()  # no step until two logical batches went through
            if i > 12:
                engine.optimizer.step()


def test_a_chunk_backpropagated_twice_is_refused():
    m = model()
    engine = attach(m, 1)
    loader = engine.data_loader(dataset(), max_physical_batch_size=8)
    with pytest.raises(PrivacyError, match="exactly one forward and one backward"):
        for x, y in loader:
            loss = F.cross_entropy(m(x), y)
            loss.backward(retain_graph=True)
            loss.backward()
            engine.optimizer.step()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_physical_batch_size_is_refused(bad):
    engine = attach(model(), 1)
    with pytest.raises(ConfigurationError, match="max_physical_batch_size must be an int >= 1"):
        engine.data_loader(dataset(), max_physical_batch_size=bad)


def test_contiguous_chunks_must_hold_whole_micro_batches():
    m = model()
    engine = dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=4, max_grad_norm=1.0,
                                 grouping="contiguous")
    with pytest.raises(ConfigurationError, match="not a multiple of micro_batch_size=4"):
        engine.data_loader(dataset(), round(Q * N), max_physical_batch_size=6)


def test_logical_batch_loader_yields_each_sampled_batch_as_its_chunks():
    """integrations.logical_batches: one item per logical batch (for loops that count items as steps); the chunks
    of each item, backpropagated one after the other before ONE optimizer.step(), equal the one-shot step."""
    from dp_microclip.integrations.logical_batches import LogicalBatch, LogicalBatchLoader

    m1, m2 = model(), model()
    e1, e2 = attach(m1, 1), attach(m2, 1)
    one_shot = e1.data_loader(dataset())
    logical = LogicalBatchLoader(e2.data_loader(dataset(), max_physical_batch_size=7))
    assert len(logical) == len(one_shot)
    for step, ((x, y), chunks) in enumerate(zip(one_shot, logical)):
        if step == 3:
            break
        assert isinstance(chunks, LogicalBatch) and all(len(cx) <= 7 for cx, _ in chunks)
        assert torch.equal(torch.cat([cx for cx, _ in chunks]), x)      # b = 1: the chunks are slices, in order
        for m, e, pieces in ((m1, e1, [(x, y)]), (m2, e2, chunks)):
            e.optimizer.zero_grad()
            for cx, cy in pieces:
                F.cross_entropy(m(cx), cy).backward()
            e.optimizer.step()
    assert e1.steps_taken == e2.steps_taken == 3
    assert max_diff(m1, m2) < 1e-10
    with pytest.raises(ConfigurationError, match="yields no physical chunks"):
        LogicalBatchLoader(e1.data_loader(dataset()))
