"""nn.LSTM / nn.GRU / nn.RNN, unchanged: exact against the naive loop (tuple outputs, h_n used or not)."""

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
    def __init__(self, kind, batch_first, use_hidden):
        super().__init__()
        self.seq_first, self.use_hidden = not batch_first, use_hidden  # not "batch_first": that name declares the model's layout
        self.rnn = getattr(nn, kind)(4, 5, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # x: (B, T, 4)
        if self.seq_first:
            x = x.transpose(0, 1)
        out, hidden = self.rnn(x)
        if isinstance(hidden, tuple):
            hidden = hidden[0]  # LSTM: (h_n, c_n)
        feature = hidden[-1] if self.use_hidden else (out[-1] if self.seq_first else out[:, -1])
        return self.head(feature)


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("seq_len", [4, 6])  # 4 == B: a size guess would take time for the batch
@pytest.mark.parametrize("use_hidden", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_rnn_equals_naive_loop(kind, batch_first, use_hidden, seq_len, b):
    torch.manual_seed(0)
    model = Net(kind, batch_first, use_hidden).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, seq_len, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    want = naive_microbatch_grads(reference, F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generic-path notice
        dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=0.05)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert float((p.grad - want[name]).norm() / want[name].norm()) < 1e-9, name


def test_rnn_is_allowed_in_dp_mode_without_declaring_the_generic_path():
    model = Net("GRU", True, True)
    dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0,
                        privacy=dp_microclip.DP(noise_multiplier=1.0, sample_rate=0.1, delta=1e-5))


def test_packed_sequences_are_refused_with_the_fix():
    rnn = nn.GRU(4, 5, batch_first=True)

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, [3, 2], batch_first=True)
            return self.rnn(packed)[1][-1]

    model = Packed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0)
    with pytest.raises(dp_microclip.UnsupportedModuleError, match="PackedSequence.*pad_packed_sequence"):
        model(torch.randn(2, 3, 4)).sum().backward()


def test_rnn_dropout_between_layers_is_refused():
    model = nn.Sequential(nn.LSTM(4, 5, num_layers=2, dropout=0.5, batch_first=True))

    class Take(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(x)[0].sum((1, 2))

    wrapped = Take()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp_microclip.attach(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1), micro_batch_size=1,
                            max_grad_norm=1.0)
    with pytest.raises(dp_microclip.UnsupportedModuleError, match="dropout=0.5"):
        wrapped(torch.randn(3, 2, 4)).sum().backward()
