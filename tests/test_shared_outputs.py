"""Layers whose output is the same for every example (relative-position tables), against the naive loop.

The engine follows such an output to where it meets the batch (dp_microclip/shared_outputs.py): T5-style
bias tables, a table normalised by a LayerNorm before use (two shared layers in a chain), a position table
projected by a Linear and added to every example, a table reused by several layers. A use it cannot split
per example is refused when the gradient arrives, never guessed."""

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

D, HEADS, CLASSES = 8, 2, 3


def _buckets(T: int) -> torch.Tensor:
    pos = torch.arange(T)
    return (pos[None, :] - pos[:, None]).clamp(-3, 3) + 3  # (T, T) in [0, 6]


class RelativeBiasAttention(nn.Module):
    """Self-attention with a relative-position bias table shared by the batch (T5's shape of the idea)."""

    def __init__(self, normed: bool):
        super().__init__()
        self.qk = nn.Linear(D, 2 * D)
        self.table = nn.Embedding(7, HEADS)
        self.norm = nn.LayerNorm(HEADS) if normed else None

    def bias(self, T: int) -> torch.Tensor:
        b = self.table(_buckets(T))  # (T, T, H): no batch dimension
        if self.norm is not None:
            b = self.norm(b)  # a second shared layer, fed by the first
        return b.permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)

    def forward(self, x, bias=None):  # x: (B, T, D)
        B, T, _ = x.shape
        q, k = self.qk(x).view(B, T, 2, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        bias = self.bias(T) if bias is None else bias
        scores = q @ k.transpose(-1, -2) + bias  # the shared bias meets the batch here
        return (scores.softmax(-1) @ q).transpose(1, 2).reshape(B, T, D), bias


class Net(nn.Module):
    def __init__(self, normed=False, reuse=False, projected=False):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.layers = nn.ModuleList([RelativeBiasAttention(normed), RelativeBiasAttention(normed)])
        self.reuse = reuse
        self.positions = nn.Linear(5, D) if projected else None
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):  # x: (B, T, 4)
        h = self.embed(x)
        if self.positions is not None:
            fixed = torch.linspace(-1, 1, x.shape[1] * 5, dtype=x.dtype).view(x.shape[1], 5)
            h = h + self.positions(fixed)  # (T, D): a shared Linear output added to every example
        bias = None
        for layer in self.layers:
            h, b = layer(h, bias if self.reuse else None)
            bias = b  # T5 passes the first layer's bias to the next ones
        return self.head(h.mean(1))


def _compare(model, b, T, B=4, clipping="fixed"):
    torch.manual_seed(1)
    reference = copy.deepcopy(model)
    x, y = torch.randn(B, T, 4, dtype=torch.float64), torch.arange(B) % CLASSES
    want = naive_microbatch_grads(reference, F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=0.05,
                                  clipping=clipping)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no generic-path notice
        engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=0.05, clipping=clipping)
    for _ in range(2):  # the first step is also checked against autograd
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for name, p in model.named_parameters():  # (reuse: the second layer's table is never used: no gradient)
            assert (p.grad is None) == (name not in want), name
            got, expected = (p.grad, want[name]) if name in want else (torch.zeros(()), torch.zeros(()))
            assert float((got - expected).norm()) <= 1e-9 * float(expected.norm()) + 1e-15, name
    assert all(not route.startswith("func") for route in engine.last_strategies.values())
    return engine


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("T", [4, 5])  # T == B and T != B
@pytest.mark.parametrize("variant", [
    dict(), dict(normed=True), dict(reuse=True), dict(projected=True), dict(normed=True, reuse=True),
], ids=lambda v: "-".join(v) or "plain")
def test_shared_tables_equal_naive_loop(variant, T, b):
    torch.manual_seed(0)
    _compare(Net(**variant).double(), b, T)


def test_adaptive_clipping_with_a_shared_table():
    torch.manual_seed(0)
    _compare(Net(normed=True).double(), 1, 5, clipping="adaptive")


class Penalised(Net):
    """A penalty on the bias table's output added to the loss itself: it never meets the batch."""

    def forward(self, x):
        self.penalty = self.layers[0].bias(x.shape[1]).square().mean()
        return super().forward(x)


def test_a_use_that_does_not_meet_the_batch_is_refused_with_the_fix():
    torch.manual_seed(0)
    model = Penalised().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0)
    x, y = torch.randn(4, 5, 4, dtype=torch.float64), torch.arange(4) % CLASSES
    with pytest.raises(dp_microclip.UnsupportedModuleError, match="table.*same for every example.*Freeze"):
        (F.cross_entropy(model(x), y) + model.penalty).backward()


class SeqFirst(nn.Module):
    """A sequence-first model: the batch is dimension 1 where the table meets it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.table = nn.Linear(5, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):  # x: (T, B, 4)
        fixed = torch.linspace(-1, 1, x.shape[0] * 5, dtype=x.dtype).view(x.shape[0], 5)
        h = torch.tanh(self.embed(x) + self.table(fixed).unsqueeze(1))  # (T, B, D) + (T, 1, D)
        return self.head(h.mean(0))


class SeqFirstInside(nn.Module):
    """Batch-first outside, a sequence-first block inside: with T == B, dimension 0 of the (T, B, D) block has
    the batch size, but the batch is dimension 1 (a meeting point found by size would split per time step)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.table = nn.Linear(5, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):  # x: (B, T, 4)
        h = self.embed(x).transpose(0, 1)  # (T, B, D)
        shift = self.table(torch.linspace(-1, 1, 5, dtype=x.dtype))  # (D,): the same for every example
        h = torch.tanh(h * 1.5 + shift)
        return self.head(h.mean(0))


class Windows(nn.Module):
    """Rows of two tokens (B * T/2 windows, window-attention style) meet a per-window-position table."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.table = nn.Embedding(2, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):  # x: (B, T, 4), T even
        B, T, _ = x.shape
        w = self.embed(x).reshape(B * T // 2, 2, D)  # (B * windows, 2, D): the batch folded with the windows
        w = torch.tanh(w + self.table(torch.arange(2)))
        return self.head(w.reshape(B, T, D).mean(1))


def _compare_layout(model, b, x, batch_first=True):
    reference = copy.deepcopy(model)
    B = x.shape[0] if batch_first else x.shape[1]
    y = torch.arange(B) % CLASSES
    xs = x if batch_first else x.transpose(0, 1)

    class BatchFirst(nn.Module):  # the oracle slices dimension 0
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t if batch_first else t.transpose(0, 1))

    want = naive_microbatch_grads(BatchFirst(reference), F.cross_entropy, xs, y, micro_batch_size=b, max_grad_norm=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=0.05)  # nothing declared
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for name, p in model.named_parameters():
            w = want[f"inner.{name}"]
            assert float((p.grad - w).norm()) <= 1e-9 * float(w.norm()) + 1e-15, name
    assert not any(route.startswith("func") for route in engine.last_strategies.values())


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("T", [4, 6])  # T == B: the sequence dimension has the batch size
@pytest.mark.parametrize("make", [SeqFirst, SeqFirstInside, Windows], ids=lambda m: m.__name__)
def test_where_a_table_meets_the_batch_is_learned_by_content(make, T, b):
    torch.manual_seed(0)
    model = make().double()
    seq_first = make is SeqFirst
    x = torch.randn(T, 4, 4, dtype=torch.float64) if seq_first else torch.randn(4, T, 4, dtype=torch.float64)
    _compare_layout(model, b, x, batch_first=not seq_first)


class ByPosition(nn.Module):
    """A table whose rows are added to the examples by their position in the batch: not per example."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.table = nn.Linear(5, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):  # x: (B, T, 4) with T == B
        rows = self.table(torch.linspace(-1, 1, x.shape[1] * 5, dtype=x.dtype).view(x.shape[1], 5))  # (T, D)
        h = self.embed(x) + rows[: x.shape[0]].unsqueeze(1)  # row i goes to example i
        return self.head(torch.tanh(h).mean(1))


def test_a_table_combined_with_examples_by_position_is_refused():
    # The probe's reordered batch moves the examples but not the table's rows: the meeting's rows do not follow
    # their examples, and the step is refused instead of splitting the table's gradient by position.
    torch.manual_seed(0)
    model = ByPosition().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0)
    x = torch.randn(4, 6, 4, dtype=torch.float64)
    with pytest.raises(dp_microclip.BatchError, match="same for every example.*change when the other examples"):
        F.cross_entropy(model(x), torch.arange(4) % CLASSES).backward()


def test_dp_step_with_a_shared_table_has_noise_and_an_epsilon():
    torch.manual_seed(0)
    model = Net(normed=True).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0,
                                 privacy=OwnLossDP(noise_multiplier=1.0, sample_rate=0.5, delta=1e-5))
    data = torch.utils.data.TensorDataset(torch.randn(8, 5, 4, dtype=torch.float64), torch.arange(8) % CLASSES)
    for x, y in engine.data_loader(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert engine.epsilon() > 0


def test_the_meeting_probe_keeps_no_activation_alive():
    """The meeting probe follows everything downstream of a shared output; it must not hold those tensors
    (held, a forward's activations stayed alive through all three probe passes)."""
    import weakref

    from dp_microclip import meetings

    follower = meetings._Follower({("table", 0)})
    table = torch.randn(4, 4)
    follower.on_output(("table", 0), table)
    with follower:
        y = table * 2
        z = y + 1
        alive = weakref.ref(y), weakref.ref(z)
        assert follower._of(z)  # followed while alive
        del y, z
    assert all(ref() is None for ref in alive)
    assert len(follower.ops) == 2
