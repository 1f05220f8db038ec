"""nn.LSTM / nn.GRU / nn.RNN, unchanged: exact against the naive loop (tuple outputs, h_n used or not).

They take the RNN route (layers/rnn.py: the fused call run step by step, each weight matrix a Linear
record), never the generic torch.func path."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from dp_microclip.reference import naive_microbatch_grads


class Net(nn.Module):
    def __init__(self, kind, batch_first, use_hidden, bidirectional=False, h0=False, **options):
        super().__init__()
        self.seq_first, self.use_hidden = not batch_first, use_hidden  # not "batch_first": that name declares the model's layout
        self.h0 = h0
        self.rnn = getattr(nn, kind)(4, 5, num_layers=2, batch_first=batch_first, bidirectional=bidirectional,
                                     **options)
        width = options.get("proj_size") or 5
        self.head = nn.Linear(width if use_hidden or not bidirectional else 2 * width, 3)

    def forward(self, x):  # x: (B, T, 4)
        if self.seq_first:
            x = x.transpose(0, 1)
        if self.h0:  # a batched initial state, different per example
            scale = x.mean(-1)[-1 if self.seq_first else slice(None)]  # (B, T) or (B,)
            scale = scale.mean(-1) if scale.dim() == 2 else scale
            h0 = torch.ones(self.rnn.num_layers * (2 if self.rnn.bidirectional else 1), 1, 5, dtype=x.dtype)
            out, hidden = self.rnn(x, h0 * scale[None, :, None])
        else:
            out, hidden = self.rnn(x)
        if isinstance(hidden, tuple):
            hidden = hidden[0]  # LSTM: (h_n, c_n)
        feature = hidden[-1] if self.use_hidden else (out[-1] if self.seq_first else out[:, -1])
        return self.head(feature)


def _compare(model, b, seq_len=4, grad_mode="auto", batch=4):
    torch.manual_seed(1)
    reference = copy.deepcopy(model)
    x, y = torch.randn(batch, seq_len, 4, dtype=torch.float64), torch.arange(batch) % 3
    want = naive_microbatch_grads(reference, F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no generic-path notice: the RNN has its own route
        engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=0.05, grad_mode=grad_mode)
    assert f"rnn: {type(model.rnn).__name__} -> RNN capture + Linear rule" in engine.summary()
    for _ in range(2):  # the first step is checked against autograd, the second is not
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for name, p in model.named_parameters():  # (some are exactly zero: the reverse direction's last step)
            assert float((p.grad - want[name]).norm()) <= 1e-9 * float(want[name].norm()) + 1e-15, name
    assert all(not route.startswith("func") for route in engine.last_strategies.values())


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("seq_len", [4, 6])  # 4 == B: a size guess would take time for the batch
@pytest.mark.parametrize("use_hidden", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_rnn_equals_naive_loop(kind, batch_first, use_hidden, seq_len, b):
    torch.manual_seed(0)
    _compare(Net(kind, batch_first, use_hidden).double(), b, seq_len)


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("options", [
    {"kind": "LSTM"}, {"kind": "GRU"}, {"kind": "RNN", "nonlinearity": "relu"}, {"kind": "GRU", "bias": False},
    {"kind": "LSTM", "proj_size": 3},
], ids=lambda o: "-".join(f"{v}" for v in o.values()))
@pytest.mark.parametrize("batch_first", [True, False])
def test_bidirectional_two_layers_equal_naive_loop(options, batch_first, b):
    torch.manual_seed(0)
    options = dict(options)
    model = Net(options.pop("kind"), batch_first, use_hidden=False, bidirectional=True, **options).double()
    _compare(model, b, seq_len=5)


@pytest.mark.parametrize("grad_mode", ["bookkeeping", "materialize"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_initial_state_and_every_route(kind, grad_mode):
    torch.manual_seed(0)
    _compare(Net(kind, False, use_hidden=True, bidirectional=True, h0=kind != "LSTM").double(), 2, seq_len=3,
             grad_mode=grad_mode)


class LearnedState(nn.Module):
    """An LSTM whose (h_0, c_0) a Linear computes from the input: gradients reach it through the state."""

    def __init__(self):
        super().__init__()
        self.init = nn.Linear(4, 5)
        self.rnn = nn.LSTM(4, 5, num_layers=2, bidirectional=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x: (B, T, 4), the LSTM sequence-first
        h0 = torch.tanh(self.init(x.mean(1)))[None].expand(4, -1, -1).contiguous()
        _, (h, c) = self.rnn(x.transpose(0, 1), (h0, 0.5 * h0))
        return self.head(h[-1] + c[0])


@pytest.mark.parametrize("b", [1, 2])
def test_lstm_with_a_learned_initial_state_tuple(b):
    torch.manual_seed(0)
    _compare(LearnedState().double(), b, seq_len=5)


def test_dropout_between_layers_in_training_is_exact():
    """The masks are drawn by the step-by-step run the records come from: autograd's gradient through the same
    forward (the first steps' check) equals the engine's sum, and with no clipping the step is that gradient."""
    torch.manual_seed(0)
    model = Net("LSTM", True, use_hidden=False, dropout=0.5).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1e9, verify_steps=3)
    x, y = torch.randn(4, 5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()  # raises if the engine's per-example sums differ from autograd's gradient


def test_rnn_is_allowed_in_dp_mode_without_declaring_the_generic_path():
    model = Net("GRU", True, True)
    dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0,
                        privacy=dp_microclip.DP(noise_multiplier=1.0, sample_rate=0.1, delta=1e-5))


class PackedNet(nn.Module):
    """Packs its padded input by the lengths its rows carry (padded steps are zero vectors), as RNN language
    models do, and reads both the packed output (mean over each example's own steps) and h_n."""

    def __init__(self, kind, enforce_sorted=False, **options):
        super().__init__()
        self.enforce_sorted = enforce_sorted
        self.rnn = getattr(nn, kind)(4, 5, num_layers=2, batch_first=True, **options)
        width = (options.get("proj_size") or 5) * (2 if options.get("bidirectional") else 1)
        self.head = nn.Linear(width + (options.get("proj_size") or 5), 3)

    def forward(self, x):  # x: (B, T, 4), zero after each example's last step
        lengths = (x.abs().sum(-1) > 0).sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=self.enforce_sorted)
        out, hidden = self.rnn(packed)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        pooled = padded.sum(1) / lengths[:, None].to(padded.dtype)
        return self.head(torch.cat([pooled, hidden[-1]], -1))


def _packed_batch(lengths, seq_len=5):
    x = torch.randn(len(lengths), seq_len, 4, dtype=torch.float64)
    for i, n in enumerate(lengths):
        x[i, n:] = 0
    return x


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("options", [
    {"kind": "LSTM"}, {"kind": "GRU"}, {"kind": "RNN"}, {"kind": "LSTM", "bidirectional": True},
    {"kind": "GRU", "bidirectional": True, "bias": False}, {"kind": "LSTM", "proj_size": 3, "bidirectional": True},
], ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_packed_sequences_equal_naive_loop(options, b):
    """Unsorted lengths (the rows are sorted inside the packing and the states permuted back), a length equal to
    T and a length 1, bidirectional (the reverse direction starts at each example's own last step)."""
    torch.manual_seed(0)
    options = dict(options)
    model = PackedNet(options.pop("kind"), **options).double()
    reference = copy.deepcopy(model)
    x, y = _packed_batch([3, 5, 1, 4]), torch.tensor([0, 1, 2, 0])
    want = naive_microbatch_grads(reference, F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no generic-path notice
        engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=0.05)
    for _ in range(2):  # the first step is also checked against autograd
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for name, p in model.named_parameters():
            assert float((p.grad - want[name]).norm()) <= 1e-9 * float(want[name].norm()) + 1e-15, name
    assert all(not route.startswith("func") for route in engine.last_strategies.values())


def test_packed_sequences_need_the_probe_to_reorder_them():
    """enforce_sorted=True cannot run on the probe's reordered examples: refused, naming torch's own fix."""
    model = PackedNet("LSTM", enforce_sorted=True).double()
    dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=1, max_grad_norm=1.0)
    with pytest.raises(dp_microclip.BatchError, match="enforce_sorted"):
        model(_packed_batch([5, 4, 2]))


def test_packed_outputs_match_torch():
    """The attached module's forward returns what torch's packed kernel returns, and the step is exact."""
    torch.manual_seed(0)
    model = PackedNet("LSTM", bidirectional=True).double()
    reference = copy.deepcopy(model)
    x, y = _packed_batch([5, 2, 4]), torch.tensor([0, 1, 2])
    want = naive_microbatch_grads(reference, F.cross_entropy, x, y, micro_batch_size=1, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=0.05)
    out = model(x)
    assert torch.allclose(out, reference(x), rtol=0, atol=1e-12)
    F.cross_entropy(out, y).backward()
    opt.step()
    for name, p in model.named_parameters():
        assert float((p.grad - want[name]).norm()) <= 1e-9 * float(want[name].norm()) + 1e-15, name
