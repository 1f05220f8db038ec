"""A shared table the model broadcasts to the batch itself (``expand`` / ``repeat``), against the naive loop.

MPNet expands its relative-attention bias ``(1, H, T, T)`` to ``(B, H, T, T)`` before adding it to the scores;
DeBERTa-v2 repeats a per-head table ``(H, T, d)`` B times to meet ``(B*H, T, d)`` queries. Such an operand
of a meeting point (dp_microclip/shared_outputs.py) is recognised by content in the meeting probe
(dp_microclip/meetings.py): its rows along the batch follow the batch size AND are equal to each other. A table
axis that merely has B entries (rows that differ) is not taken for the batch: refused, never paired with the
examples by position.
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

D, HEADS, CLASSES = 8, 2, 3
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared machine


def _buckets(T: int) -> torch.Tensor:
    pos = torch.arange(T)
    return (pos[None, :] - pos[:, None]).clamp(-3, 3) + 3  # (T, T) in [0, 6]


class Attention(nn.Module):
    """Self-attention with a relative bias table, broadcast to the batch by the model: ``how`` says how."""

    def __init__(self, how: str, heads: int = HEADS):
        super().__init__()
        self.how, self.heads = how, heads
        self.qk = nn.Linear(D, 2 * D)
        self.table = nn.Embedding(7, heads)

    def forward(self, x):  # x: (B, T, D)
        B, T, _ = x.shape
        H = self.heads
        q, k = self.qk(x).view(B, T, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, T, d) each
        bias = self.table(_buckets(T)).permute(2, 0, 1)  # (H, T, T): the same for every example
        if self.how == "expand":  # MPNet
            scores = q @ k.transpose(-1, -2) + bias.unsqueeze(0).expand(B, -1, -1, -1).contiguous()
        elif self.how == "repeat":  # DeBERTa-v2: heads folded into the batch
            q2, k2 = q.reshape(B * H, T, -1), k.reshape(B * H, T, -1)
            scores = (torch.bmm(q2, k2.transpose(-1, -2)) + bias.repeat(B, 1, 1)).view(B, H, T, T)
        elif self.how == "sequence_first":  # the model's broadcast along dimension 1: (H, B, T, T) scores
            scores = (q @ k.transpose(-1, -2)).transpose(0, 1) + bias.unsqueeze(1).expand(-1, B, -1, -1)
            scores = scores.transpose(0, 1)
        elif self.how == "by_position":  # B rows of a table (they differ): paired with the examples by position
            rows = self.table(torch.arange(7))[:B]  # (B, H): its size follows the batch, its rows do not
            scores = q @ k.transpose(-1, -2) + bias + rows[:, :, None, None]
        else:  # "reduced": broadcast to the batch, then averaged over it (never meets a batched tensor)
            scores = q @ k.transpose(-1, -2) + bias.unsqueeze(0).expand(B, -1, -1, -1).mean(0)
        return (scores.softmax(-1) @ q).transpose(1, 2).reshape(B, T, D)


class Net(nn.Module):
    def __init__(self, how, heads: int = HEADS):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.attn = Attention(how, heads)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.head(self.attn(self.embed(x)).mean(1))


def _step(model, b, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no generic-path notice
        engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=0.05)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return engine


def _step_equals_naive_loop(model, b, x, y, step=None):
    """One engine step (``step``, default ``_step``) whose every trained parameter's gradient equals the naive
    loop's on a copy of the model, to float64 precision; returns the engine."""
    want = naive_microbatch_grads(copy.deepcopy(model), F.cross_entropy, x, y, micro_batch_size=b,
                                  max_grad_norm=0.05)
    engine = (step or _step)(model, b, x, y)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert float((p.grad - want[name]).norm()) <= 1e-9 * float(want[name].norm()) + 1e-15, name
    return engine


def _exact(model, b, x, y):
    engine = _step_equals_naive_loop(model, b, x, y)
    assert all(route != "func" for route in engine.last_strategies.values())


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("T", [4, 5])  # T == B and T != B
@pytest.mark.parametrize("how", ["expand", "repeat"])
def test_broadcast_by_the_model_equals_naive_loop(how, T, b):
    torch.manual_seed(0)
    model = Net(how).double()
    x, y = torch.randn(4, T, 4, dtype=torch.float64), torch.arange(4) % CLASSES
    engine = _step_equals_naive_loop(model, b, x, y)
    assert all(route != "func" for route in engine.last_strategies.values())


class ProjectedTable(nn.Module):
    """A (1, 2k, D) table run through a Linear (a rule layer: its output has size 1 where the batch goes) and
    folded by its size, as DeBERTa-v2 does: ``view(-1, ...)`` then ``repeat(B, 1, 1)``. Expanding that output
    to the batch would change what the model computes; it is followed as a shared output instead."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.table = nn.Parameter(0.3 * torch.randn(6, D), requires_grad=False)  # frozen: read as a tensor
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):  # x: (B, T, 4)
        B, T, _ = x.shape
        h = self.embed(x)  # (B, T, D)
        pos = self.proj(self.table.unsqueeze(0))  # (1, 6, D): BROADCAST at the batch dimension
        heads = pos.view(6, HEADS, D // HEADS).transpose(0, 1).reshape(-1, 6, D // HEADS)  # (H, 6, d)
        keys = heads.repeat(B, 1, 1)  # (B*H, 6, d)
        q = h.view(B, T, HEADS, D // HEADS).transpose(1, 2).reshape(B * HEADS, T, D // HEADS)
        scores = torch.bmm(q, keys.transpose(1, 2)).softmax(-1)  # (B*H, T, 6)
        mixed = torch.bmm(scores, keys).view(B, HEADS, T, -1).transpose(1, 2).reshape(B, T, D)
        return self.head((h + mixed).mean(1))


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("T", [4, 5])
def test_a_projected_table_keeps_its_shape_and_equals_naive_loop(T, b):
    torch.manual_seed(0)
    model = ProjectedTable().double()
    x, y = torch.randn(4, T, 4, dtype=torch.float64), torch.arange(4) % CLASSES
    engine = _step_equals_naive_loop(model, b, x, y)
    assert all(route != "func" for route in engine.last_strategies.values())


class NormalisedTable(ProjectedTable):
    """DeBERTa-v2's shape of the problem: a trainable position table read as a tensor outside its module
    (``positions.weight``; the Embedding is never called), normalised by a LayerNorm, then projected and folded
    as above. Its per-example gradient is the LayerNorm's input gradient of each example's output gradient."""

    def __init__(self):
        super().__init__()
        self.positions = nn.Embedding(6, D)
        self.norm = nn.LayerNorm(D)
        del self.table

    def forward(self, x):
        self.table = self.norm(self.positions.weight)  # read outside the Embedding's forward: (6, D), no batch
        try:
            return super().forward(x)
        finally:
            del self.table


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("T", [4, 5])
def test_a_parameter_read_outside_its_module_into_a_shared_layer_equals_naive_loop(T, b):
    torch.manual_seed(0)
    model = NormalisedTable().double()
    plain = copy.deepcopy(model)  # lr=0: the same parameters at every step, without the engine's hooks
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=0.05)
    for step in range(2):  # the first step checks against autograd; the second runs without requires_grad
        x, y = torch.randn(4, T, 4, dtype=torch.float64), torch.arange(4) % CLASSES
        want = naive_microbatch_grads(copy.deepcopy(plain), F.cross_entropy, x, y, micro_batch_size=b,
                                      max_grad_norm=0.05)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for name, p in model.named_parameters():
            assert float((p.grad - want[name]).norm()) <= 1e-9 * float(want[name].norm()) + 1e-15, (step, name)
    assert all(route != "func" for route in engine.last_strategies.values())


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("how", ["expand", "repeat", "sequence_first"])
def test_a_table_axis_of_length_b_is_not_the_batch(how, b):
    # B == T == heads == 4: the table (H, T, T) has an axis of length B that is NOT broadcast (its rows differ per
    # head), next to the batch the model broadcasts it to (equal rows). Only the content tells them apart.
    torch.manual_seed(0)
    model = Net(how, heads=4).double()
    x, y = torch.randn(4, 4, 4, dtype=torch.float64), torch.arange(4) % CLASSES
    _exact(model, b, x, y)


def test_rows_of_a_table_paired_with_examples_by_position_are_refused():
    # ``table(...)[:B]``: B rows whose count follows the batch but whose rows differ (not a broadcast): each
    # example would get another row of the table: the meeting probe sees rows that do not follow the examples.
    torch.manual_seed(0)
    model = Net("by_position").double()
    x, y = torch.randn(4, 5, 4, dtype=torch.float64), torch.arange(4) % CLASSES
    with pytest.raises(dp_microclip.BatchError, match="its rows .* change when the other examples of the batch change"):
        _step(model, 1, x, y)


def test_a_broadcast_of_size_b_that_is_averaged_away_stays_shared_and_exact():
    # Averaged over the broadcast dimension: its size equals B, but its rows never follow the examples, so the
    # content-learned meetings keep it shared until it meets the batch; exact against the naive loop.
    torch.manual_seed(0)
    model = Net("reduced").double()
    x, y = torch.randn(4, 5, 4, dtype=torch.float64), torch.arange(4) % CLASSES
    _step_equals_naive_loop(model, 1, x, y)


class ResampledBias(nn.Module):
    """A module without a rule that computes a batch-free function of its parameters with whatever operations
    (BEiT's relative-position bias): a table resampled by ``F.interpolate`` to the sequence length, gathered
    with a fixed relative-distance index, through a nonlinearity and a scale. No tensor input, so its output,
    ``(1, H, T, T)`` (``squeeze=False``) or ``(H, T, T)``, is the same for every example."""

    def __init__(self, squeeze: bool):
        super().__init__()
        self.squeeze = squeeze
        self.table = nn.Parameter(0.5 * torch.randn(HEADS, 5))
        self.scale = nn.Parameter(torch.tensor([1.5, 0.7]))

    def forward(self, T: int):
        resampled = F.interpolate(self.table.unsqueeze(0), size=2 * T - 1, mode="linear", align_corners=True)[0]
        pos = torch.arange(T)
        bias = torch.tanh(resampled[:, pos[None, :] - pos[:, None] + T - 1]) * self.scale[:, None, None]
        return bias if self.squeeze else bias.unsqueeze(0)


class ResampledNet(nn.Module):
    def __init__(self, squeeze: bool):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.qk = nn.Linear(D, 2 * D)
        self.bias = ResampledBias(squeeze)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        B, T, _ = x.shape
        h = self.embed(x)
        q, k = self.qk(h).view(B, T, 2, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) + self.bias(T)
        return self.head((scores.softmax(-1) @ q).transpose(1, 2).reshape(B, T, D).mean(1))


def _step_no_generic(model, b, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no generic-path notice
        engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=0.05, fallback="error")
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return engine


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("T", [4, 5])  # T == B and T != B
@pytest.mark.parametrize("squeeze", [False, True])
def test_a_batch_free_module_without_a_rule_takes_its_own_vjp(squeeze, T, b):
    # The usage route cannot follow F.interpolate or tanh; the generic path is not allowed (fallback="error"):
    # its call has no batch in or out, so each example's gradient is the VJP of its forward with the example's
    # output gradient read where the bias meets the scores (layers/batch_free.py).
    torch.manual_seed(0)
    model = ResampledNet(squeeze).double()
    x, y = torch.randn(4, T, 4, dtype=torch.float64), torch.arange(4) % CLASSES
    engine = _step_equals_naive_loop(model, b, x, y, step=_step_no_generic)
    assert engine.last_strategies.get("bias") not in (None, "func")


class RandomBias(ResampledBias):
    """A batch-free bias that draws dropout in training mode: its replay would draw another mask."""

    def forward(self, T: int):
        return F.dropout(super().forward(T), 0.5, self.training)


def test_a_batch_free_module_that_draws_random_numbers_is_refused_in_training_and_exact_in_eval():
    torch.manual_seed(0)
    model = ResampledNet(False).double()
    model.bias = RandomBias(False).double()
    x, y = torch.randn(4, 5, 4, dtype=torch.float64), torch.arange(4) % CLASSES
    with pytest.raises(dp_microclip.UnsupportedModuleError, match="random .*dropout.*Move the random part"):
        _step_no_generic(model, 1, x, y)
    model = ResampledNet(False).double()
    model.bias = RandomBias(False).double().eval()  # no draw: the replay gives the same output
    _step_equals_naive_loop(model, 1, x, y, step=_step_no_generic)


class ScaledBroadcast(nn.Module):
    """The model's broadcast of a table to the batch, scaled, averaged over that dimension, then added: its
    ``(B, ...)`` product has B equal rows that no example's data touched (not a meeting point)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.table = nn.Embedding(7, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, x):
        B, T, _ = x.shape
        rows = self.table(_buckets(T)[0]).unsqueeze(0).expand(B, -1, -1)  # (B, T, D): equal rows
        scaled = rows * torch.ones(B, 1, 1, dtype=x.dtype)  # B rows, none of them an example's
        return self.head((self.embed(x) + scaled.mean(0)).tanh().mean(1))


def test_equal_rows_that_no_example_touched_are_not_given_to_examples():
    # ``scaled`` has B rows, equal to each other, so the content cannot say which example each belongs to, and
    # averaged over them each example's gradient is spread over every row. Refused, not guessed.
    torch.manual_seed(0)
    model = ScaledBroadcast().double()
    x, y = torch.randn(4, 5, 4, dtype=torch.float64), torch.arange(4) % CLASSES
    with pytest.raises(dp_microclip.BatchError, match="combined with examples by position"):
        _step(model, 1, x, y)
