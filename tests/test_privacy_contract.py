"""The per-example contract DP mode verifies (issue 24, findings 3, 4, 7, 8 and the unsampled first step).

Each test failed on the code before the fix: the coupled model trained, the reordered batch stepped, the
observer was accepted, the distributed DP attach with its own Poisson loaders went through.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import dp_microclip
import dp_microclip.losses
from dp_microclip import PrivacyError
from dp_microclip.tools.diagnostics import ClipMonitor
from .helpers import OwnLossDP

N = 100


def dp_attach(m, **kw):
    kw.setdefault("micro_batch_size", 1)
    dp = OwnLossDP(noise_multiplier=1.0, sample_rate=kw.pop("sample_rate", 0.2), delta=1e-5, accountant="rdp",
            **kw.pop("dp", {}))
    return dp_microclip.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), seed=0, max_grad_norm=1.0,
                               privacy=dp, **kw)


def seq_data(n=N, t=5, d=8):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, t, d, generator=g), torch.randint(0, 3, (n,), generator=g))


def flat_data(n=N, d=6):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g))


def one_step(engine, m, data, reorder=None):
    x, y = next(iter(engine.data_loader(data)))
    if reorder is not None:
        order = reorder(x)
        x, y = x[order], y[order]
    engine.optimizer.zero_grad()
    out = m(x)
    F.cross_entropy(out.reshape(out.shape[0], -1, 3).mean(1), y).backward()
    engine.optimizer.step()


class BatchStandardised(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b((h - h.mean(0)) / h.std(0))


class DirectBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(F.batch_norm(self.a(x), None, None, training=True))


class Attention(nn.Module):
    def __init__(self, batch_first, dropout=0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, dropout=dropout)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, T, D) always
        return self.head(self.attn(x, x, x, need_weights=False)[0])


class Encoder(nn.Module):
    def __init__(self, batch_first, dropout=0.0):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (B, T, D) always
        return self.head(self.layer(x))


# ------------------------------------------------------------------ finding 3, model side: rows mixed in forward
@pytest.mark.parametrize("make, data, fix", [
    (BatchStandardised, flat_data, r"x.mean\(0\)"),
    (DirectBatchNorm, flat_data, r"F.batch_norm"),
    (lambda: Attention(batch_first=False), seq_data, r"batch_first=True"),
    (lambda: Encoder(batch_first=False), seq_data, r"batch_first=True"),
], ids=["mean-std-in-forward", "F.batch_norm", "mha-batch_first-mistake", "encoder-batch_first-mistake"])
def test_a_model_that_mixes_examples_is_refused_in_dp_mode(make, data, fix):
    torch.manual_seed(0)
    m = make()
    engine = dp_attach(m)
    with pytest.raises(PrivacyError, match=f"depends on that example only.*{fix}"):
        one_step(engine, m, data())
    assert engine.steps_taken == 0


@pytest.mark.parametrize("make, data", [
    (lambda: nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3)), flat_data),
    (lambda: Attention(batch_first=True, dropout=0.5), seq_data),
    (lambda: Encoder(batch_first=True, dropout=0.5), seq_data),
], ids=["mlp-dropout", "mha-dropout", "encoder-dropout"])
def test_example_wise_models_with_dropout_pass_the_check(make, data):
    torch.manual_seed(0)
    m = make().train()
    engine = dp_attach(m)
    one_step(engine, m, data())
    one_step(engine, m, data())
    assert engine.steps_taken == 2


def test_the_mixing_check_costs_nothing_in_noise_free_mode():
    torch.manual_seed(0)
    m = BatchStandardised()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    dp_microclip.attach(m, opt, micro_batch_size=1, max_grad_norm=1.0)
    x, y = flat_data()[:10]
    F.cross_entropy(m(x), y).backward()
    opt.step()  # noise-free: the contract is DP mode's


# ------------------------------------------------------------------ finding 3, loss side: a loss inside the model
def test_huggingface_labels_loss_is_refused_in_dp_mode():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = transformers.GPT2LMHeadModel(cfg)
    engine = dp_attach(m, micro_batch_size=1, fallback="generic")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (N, 6), generator=g)
    labels = ids.clone()
    labels[::2, 4:] = -100  # padding in half the examples
    batches = iter(engine.data_loader(TensorDataset(ids, labels)))
    x, lab = next(batches)
    with pytest.raises(PrivacyError, match=r"labels=.*causal_lm_per_example_loss\(output.logits, labels\).mean\(\)"):
        m(input_ids=x, labels=lab).loss.backward()
    x, lab = next(batches)
    out = m(input_ids=x)  # the fix: no labels=, a mean of per-example losses
    dp_microclip.losses.causal_lm_per_example_loss(out.logits, lab).mean().backward()
    engine.optimizer.step()
    assert engine.steps_taken == 1


# ------------------------------------------------------------------ finding 4: rows keep their groups at b > 1
def test_rows_sorted_in_the_training_loop_are_refused_at_b2():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    engine = dp_attach(m, micro_batch_size=2)
    with pytest.raises(PrivacyError, match="another order.*enforce_sorted=False"):
        one_step(engine, m, flat_data(), reorder=lambda x: x[:, 0].argsort(descending=True))
    assert engine.steps_taken == 0


def test_an_input_in_the_loaders_order_is_not_refused_for_matching_the_labels_as_a_set():
    """Small integer inputs and labels can hold the same values in another order (found by the property test
    with token ids [0, 1, 1, 0] and labels [0, 0, 1, 1]): the input equals the loader's inputs row for row, so
    it is in order, whatever other loader tensor it matches as a set. A reordered input is still refused."""
    from dp_microclip import contract

    x, y = torch.tensor([[0], [1], [1], [0]]), torch.tensor([0, 0, 1, 1])
    expected = contract.batch_fingerprints((x, y), 4)
    assert contract.row_order_problem(expected, ((x,), {}), 0, 4) is None
    assert contract.row_order_problem(expected, ((y,), {}), 0, 4) is None  # the labels, in order
    assert "another order" in contract.row_order_problem(expected, ((x[[1, 0, 2, 3]],), {}), 0, 4)
    reordered = torch.tensor([[1], [0], [1], [0]])  # the same set as both, in the order of neither
    assert "another order" in contract.row_order_problem(expected, ((reordered,), {}), 0, 4)


def test_rows_in_the_loaders_order_pass_at_b2():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    engine = dp_attach(m, micro_batch_size=2)
    loader = engine.data_loader(flat_data())
    for x, y in loader:  # a whole epoch, inputs moved and cast like ordinary code does
        engine.optimizer.zero_grad()
        F.cross_entropy(m(x.to(torch.float32).contiguous()), y).backward()
        engine.optimizer.step()
    assert engine.steps_taken == len(loader)


# ------------------------------------------------------------------ finding 7: observers in DP mode
def test_an_observer_on_a_dp_engine_needs_an_explicit_opt_in():
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    engine = dp_attach(m)
    with pytest.raises(PrivacyError, match=r"un-noised.*add_observer\(observer, release_unnoised=True\)"):
        engine.add_observer(ClipMonitor())
    assert "Un-noised statistics" not in engine.privacy_statement()
    engine.add_observer(ClipMonitor(), release_unnoised=True)
    one_step(engine, m, flat_data())
    assert "Un-noised statistics of the private batches" in engine.privacy_statement()
    state = engine.state_dict()
    m2 = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    engine2 = dp_attach(m2)
    engine2.load_state_dict(state)  # the statement keeps saying it after a resume
    assert "Un-noised statistics of the private batches" in engine2.privacy_statement()


# ------------------------------------------------------------------ finding 8: multi-process sampling
@pytest.mark.parametrize("sampling", ["poisson", "shuffle"])
def test_distributed_dp_refuses_a_declared_sampling(sampling):
    import dp_microclip.distributed as distributed

    m = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(PrivacyError, match=r"several ranks' shares.*engine.data_loader\(dataset\)"):
        distributed.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0,
                           privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=0.1, sampling=sampling))


# ------------------------------------------------------------------ unsampled batch: refused at the first step
def test_a_dp_step_from_a_shuffled_loader_is_refused_at_the_first_step():
    m = nn.Sequential(nn.Linear(6, 3))
    engine = dp_attach(m, dp={"expected_batch_size": 20})
    x, y = next(iter(torch.utils.data.DataLoader(flat_data(), batch_size=20, shuffle=True)))
    F.cross_entropy(m(x), y).backward()
    with pytest.raises(PrivacyError, match=r'did not come from engine.data_loader.*DP\(sampling="poisson"\)'):
        engine.optimizer.step()


WEIGHTS = torch.tensor([1.0, 4.0, 0.5])
LOSSES = {
    "class weights, mean": (lambda out, y: F.cross_entropy(out, y, weight=WEIGHTS), True),
    "ignore_index, mean": (lambda out, y: F.cross_entropy(out, torch.where(y == 0, -100, y)), True),
    "per-example mean": (lambda out, y: F.cross_entropy(out, y), False),
    "class weights per example, batch mean (the fix)":
        (lambda out, y: (F.cross_entropy(out, y, reduction="none") * WEIGHTS[y]).mean(), False),
    "label smoothing": (lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1), False),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_normalised_over_the_batch_are_refused_in_dp_mode(name):
    loss_fn, refused = LOSSES[name]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    engine = dp_attach(m)
    x, y = next(iter(engine.data_loader(flat_data())))
    engine.optimizer.zero_grad()
    loss_fn(m(x), y).backward()
    if refused:
        with pytest.raises(dp_microclip.ConfigurationError, match=r"reduction='none'.*\.mean\(\)"):
            engine.optimizer.step()
    else:
        engine.optimizer.step()
        assert engine.steps_taken == 1
