"""No host synchronisation in a steady-state step, and non-finite micro-batches still skipped exactly on the device.

A host read (``.item()``, ``float(t)``, ``bool(t)``) stalls a GPU's launch queue; the engine handles a NaN/inf
micro-batch on the device instead (zero weight, its rows zeroed where the sums read them). The sync count comes
from ``benchmarks/launches.py``'s dispatch-mode counter (deterministic, no timing); the skipped gradient is
checked against the naive loop over the remaining examples.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from benchmarks.launches import count
from dp_microclip.reference import naive_microbatch_grads


@pytest.mark.parametrize("model", ["mlp", "transformer"])  # the transformer has an embedding (keyed sums)
@pytest.mark.parametrize("method", ["b=1", "b=8", "dp b=1"])
def test_a_steady_state_step_reads_nothing_back_to_the_host(model, method):
    launches, syncs, ops = count(model, method)
    reads = ("item", "_local_scalar_dense", "is_nonzero", "unique", "_unique2", "masked_select")
    assert syncs == 0, {op: n for op, n in ops.items() if op in reads}
    assert launches > 0


@pytest.mark.parametrize("model, method", [
    ("mlp", "b=1"), ("mlp", "b=8"), ("mlp", "dp b=1"), ("cnn", "b=1"), ("cnn", "dp b=1"),
    ("cnn", "b=8 materialize"), ("transformer", "b=1"), ("transformer", "dp b=1"),
    ("transformer", "b=8 materialize"),
])
def test_the_met_launch_targets_stay_met(model, method):
    """At most 1.5x plain's launches (1.6x in DP mode) where the targets are met (benchmarks/results/
    cpu-launches.md): the row buffer, the reused convolution group gradients and the one-launch fingerprints
    keep them; a change that loses one of those shows up here."""
    plain = count(model, "plain")[0]
    launches = count(model, method)[0]
    assert launches <= (1.6 if method.startswith("dp") else 1.5) * plain, (model, method, launches, plain)


@pytest.mark.parametrize("per_group", [1, 3, 50])
def test_keyed_sums_without_unique_equal_the_unique_form(per_group, monkeypatch):
    from dp_microclip import tensors
    from dp_microclip.layers.embedding import keyed_group_sq_norms

    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 4, (40,), generator=g)
    keys = groups * per_group + torch.randint(0, per_group, (40,), generator=g)  # many repeated keys
    values = torch.randn(40, 6, generator=g, dtype=torch.float64)
    expected = torch.zeros(4, dtype=torch.float64)
    for k in keys.unique():  # the definition: each key's rows summed, squared, added to its group
        expected[k // per_group] += values[keys == k].sum(0).pow(2).sum()
    for device_path in (False, True):
        monkeypatch.setattr(tensors, "DEVICE_PATHS_ON_CPU", device_path)
        torch.testing.assert_close(keyed_group_sq_norms(keys, values, 4, per_group), expected)


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("layer", ["embedding", "bag"])
def test_embedding_norms_on_the_device_path_equal_the_naive_loop(layer, device_path, monkeypatch):
    from dp_microclip import tensors

    monkeypatch.setattr(tensors, "DEVICE_PATHS_ON_CPU", device_path)
    torch.manual_seed(0)
    table = nn.Embedding(7, 4) if layer == "embedding" else nn.EmbeddingBag(7, 4, mode="sum")
    m = nn.Sequential(table, nn.Flatten(), nn.LazyLinear(3)).double() if layer == "embedding" else \
        nn.Sequential(table, nn.Linear(4, 3)).double()
    x = torch.randint(0, 7, (6, 5))
    y = torch.randint(0, 3, (6,))
    m(x)  # materialise the lazy layer
    ref = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    engine = dp_microclip.attach(m, opt, micro_batch_size=2, max_grad_norm=0.05, grad_mode="bookkeeping")
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.step()  # the engine writes the clipped gradients here (lr 0: the weights stay as the reference's)
    expected = naive_microbatch_grads(ref, F.cross_entropy, x, y, micro_batch_size=2, max_grad_norm=0.05)
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12)
    engine.detach()


class WithNorm(nn.Module):
    """Linear (ghost route), LayerNorm (materialised route), Linear head: both kinds of masked tensor."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.inp(x))))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("b", [1, 2])
def test_a_nonfinite_example_is_zeroed_on_the_device_exactly(value, b):
    torch.manual_seed(0)
    m = WithNorm().double()
    ref = copy.deepcopy(m)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    engine = dp_microclip.attach(m, opt, micro_batch_size=b, max_grad_norm=0.05, verify_steps=0,
                                 grad_mode="bookkeeping")
    bad = x.clone()
    bad[5, 2] = value
    F.cross_entropy(m(bad), y).backward()
    opt.step()
    assert int(engine.nonfinite_groups) == 1
    dropped = {5} if b == 1 else {4, 5}
    keep = torch.tensor([i for i in range(8) if i not in dropped])
    want = naive_microbatch_grads(ref, F.cross_entropy, x[keep], y[keep], micro_batch_size=b, max_grad_norm=0.05)
    groups, kept = 8 // b, len(keep) // b
    for name, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, want[name] * kept / groups, rtol=1e-9, atol=1e-12)


class Widths(nn.Module):
    """Linears of five widths (the masked copies take the flat form), two LayerNorms (one joined block) and
    a sequence dimension (T = 3 rows per example)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 9)
        self.norm1 = nn.LayerNorm(9)
        self.c = nn.Linear(9, 11)
        self.norm2 = nn.LayerNorm(11)
        self.head = nn.Linear(11, 3)

    def forward(self, x):  # (B, 3, 5)
        h = self.norm1(self.b(torch.tanh(self.a(x))))
        return self.head(torch.relu(self.norm2(self.c(h))).mean(1))


class SeqFirstAttention(nn.Module):
    """Self-attention run sequence-first inside (its captured rows are strided batch-first views)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (B, 3, 5)
        h = self.inp(x).transpose(0, 1)  # (T, B, 8)
        out, _ = self.attn(h, h, h, need_weights=False)
        return self.head(out.mean(0))


@pytest.mark.parametrize("model", [Widths, SeqFirstAttention])
@pytest.mark.parametrize("form", ["host read", "flat", "stacked"])
@pytest.mark.parametrize("grouping", ["contiguous", "keyed"])
@pytest.mark.parametrize("clipping", ["fixed", "normalize", "per_layer"])
def test_a_nonfinite_group_is_zeroed_exactly_in_every_masked_form(model, form, grouping, clipping, monkeypatch):
    from dp_microclip import fused, tensors

    monkeypatch.setattr(tensors, "DEVICE_PATHS_ON_CPU", form != "host read")
    monkeypatch.setattr(fused, "_FLAT_LAUNCHES", 0 if form == "flat" else 99)  # force one form of masked_copies
    torch.manual_seed(1)
    m = model().double()
    ref = copy.deepcopy(m)
    x = torch.randn(12, 3, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    keyed = dict(grouping="keyed", num_groups=4, seed=3) if grouping == "keyed" else {}
    bounds = {n: 0.05 * (1 + i % 3) / 2 for i, (n, _) in enumerate(m.named_parameters())}
    engine = dp_microclip.attach(m, opt, micro_batch_size=3, max_grad_norm=bounds if clipping == "per_layer" else 0.05,
                                 verify_steps=0, clipping=clipping, grad_mode="bookkeeping", **keyed)
    bad = x.clone()
    bad[7, 1, 2] = float("nan")
    F.cross_entropy(m(bad), y).backward()
    opt.step()
    assert int(engine.nonfinite_groups) == 1
    index = engine.last_groups.index
    keep = torch.nonzero(index != index[7]).flatten()
    kept_index = torch.unique(index[keep], return_inverse=True)[1]
    want = naive_microbatch_grads(ref, F.cross_entropy, x[keep], y[keep], group_index=kept_index, num_groups=3,
                                  max_grad_norm=0.05, clipping=clipping,
                                  **(dict(per_param_bounds=bounds) if clipping == "per_layer" else {}))
    for name, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, want[name] * 3 / 4, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mix", ["grams", "grams_and_roots", "all_forms", "large_grams"])
def test_joined_gram_sums_equal_the_norms_of_the_materialised_group_gradients(mix):
    """GramDot squares are joined into one sum with the roots and squares (one _foreach_mul, one sum); the
    total equals the norm of the concatenated group gradients, and per parameter each form is its own norm.
    Large Gram products (over fused.JOIN_MAX_ELEMENTS per group: N = 3 x 90 rows) are summed on their own,
    a weight's with its bias's in one _foreach_addcmul; a Linear without bias leaves its product unfused."""
    from dp_microclip.aggregate import _combined_norm, _norm_of
    from dp_microclip.grouping import contiguous_groups
    from dp_microclip.layers.linear import linear_group_grads, linear_group_sq_norms
    from dp_microclip.layers.registry import NormProduct, Unsquared, squared_norm

    torch.manual_seed(0)
    groups = contiguous_groups(12, 3)  # M = 4 groups of 3 examples: the Gram forms
    values, parts = [], []
    shapes = [(5, 4, 90, True), (3, 6, 1, True), (2, 3, 90, False)] if mix == "large_grams" \
        else [(5, 4, 1, True), (3, 6, 2, True), (7, 2, 3, False)]
    for d, p, t, bias in shapes:
        a, g = torch.randn(12, t, d, dtype=torch.float64), torch.randn(12, t, p, dtype=torch.float64)
        norms = linear_group_sq_norms(a, g, groups, bias)
        grads = linear_group_grads(a, g, groups, bias)
        for name in ("weight", "bias") if bias else ("weight",):
            want = grads[name].flatten(1)
            torch.testing.assert_close(_norm_of(norms[name]), want.norm(dim=1), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(squared_norm(norms[name]), want.square().sum(1), rtol=1e-10, atol=1e-12)
            values.append(norms[name])
            parts.append(want)
    if mix != "grams":
        extra = torch.randn(4, 5, dtype=torch.float64)
        values.append(Unsquared(extra.norm(dim=1)))
        parts.append(extra)
    if mix == "all_forms":
        left, right = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
        values += [NormProduct(left, right), torch.rand(4, dtype=torch.float64)]
        parts += [(left * right)[:, None], values[-1].sqrt()[:, None]]
    torch.testing.assert_close(_combined_norm(values), torch.cat(parts, dim=1).norm(dim=1), rtol=1e-10, atol=1e-12)
