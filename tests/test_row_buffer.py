"""The few-launch forms of this round against their unfused results and the naive loop.

* ``fused.RowBuffer`` (accelerator path; ``tensors.DEVICE_PATHS_ON_CPU`` runs it here): the captured tensors
  of row-factored layers (Linear on ``(B, d)``) in one buffer, their norms by one segmented reduction, the
  non-finite rows zeroed in place, the clip weights applied once to every output gradient and the sums read
  from it. Checked directly against materialised per-example gradients (a NaN/inf row included: it must
  not reach the other rows' norms or sums), and end to end against the naive loop.
* ``layers.registry.GroupGrads``: a convolution's ghost norms from its materialised group gradients, which
  the engine now reuses for the clipped sum (no second convolution): against the naive loop.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from dp_microclip import fused, tensors
from dp_microclip.grouping import Groups
from dp_microclip.layers.registry import GroupGrads, Unsquared, rule_for
from dp_microclip.reference import naive_microbatch_grads


def _groups(batch: int, b: int) -> Groups:
    m = batch // b
    return Groups(torch.arange(batch) // b, m, torch.full((m,), float(b)), b)


def _records(shapes, batch, bias, dtype=torch.float64):
    """Fake Linear records: ``(d, p)`` per layer, random ``(B, d)`` inputs and ``(B, p)`` output gradients."""
    rule = rule_for(nn.Linear(1, 1))
    out = []
    for d, p in shapes:
        layer = nn.Linear(d, p, bias=bias).to(dtype)
        a = torch.randn(batch, d, dtype=dtype)
        g = torch.randn(batch, p, dtype=dtype)
        out.append(SimpleNamespace(rule=rule, layer=layer, inputs=(a,), out_grad=g, params=dict(layer.named_parameters()),
                                   unit=SimpleNamespace(parametrized={})))
    return out


def _per_example(record):
    """``{name: (B, *param.shape)}``: each example's gradient, materialised."""
    a, g = record.inputs[0], record.out_grad
    out = {"weight": torch.einsum("bp,bd->bpd", g, a)}
    if "bias" in record.params:
        out["bias"] = g.clone()
    return out


def _as_replaceable(records):
    # RowBuffer rebinds records with dataclasses.replace: give the fakes a dataclass shape
    from dataclasses import make_dataclass

    cls = make_dataclass("R", ["rule", "layer", "inputs", "out_grad", "params", "unit"])
    return [cls(r.rule, r.layer, r.inputs, r.out_grad, r.params, r.unit) for r in records]


def _net_and_batch(seed: int):
    """(the conv + Linear net in float64, a copy for the naive loop, a batch of 12, an SGD with lr 0)."""
    torch.manual_seed(seed)
    m = Net().double()
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    return m, copy.deepcopy(m), x, y, torch.optim.SGD(m.parameters(), lr=0.0)


@pytest.mark.parametrize("b", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
@pytest.mark.parametrize("pairs", ["joined", "rules"])  # b > 1: every row pair in one mm, or the rules' Grams
def test_row_buffer_norms_masks_and_sums_equal_the_materialised_gradients(b, bias, poison, pairs, monkeypatch):
    if pairs == "rules":
        if b == 1:
            pytest.skip("one row per group: always joined")
        monkeypatch.setattr(fused, "OUTER_MAX_ELEMENTS", 0)
    torch.manual_seed(0)
    batch = 8
    records = _as_replaceable(_records([(5, 7), (7, 7), (7, 3)], batch, bias))
    if poison is not None:
        records[1].inputs[0][3, 2] = poison  # example 3: its group is non-finite
    groups = _groups(batch, b)
    per_example = [_per_example(r) for r in records]
    originals = [(r.inputs[0].clone(), r.out_grad.clone()) for r in records]
    captured = [(r.inputs[0], r.out_grad) for r in records]
    uses = {id(p): 1 for r in records for p in r.params.values()}
    found: dict = {}
    for i, r in enumerate(records):
        f = fused.RowBuffer.factors_of(r, groups, uses, found)
        assert f is not None
        found[i] = f
    buf = fused.RowBuffer.build(records, found, {}, groups)
    assert buf is not None
    norms = buf.norms(records, groups)
    if b == 1 or pairs == "joined":
        (total,) = norms.values()
        assert isinstance(total, Unsquared)
        total = total.norm
    else:  # the rules' Gram forms of the buffer's views, joined as the engine joins them
        from dp_microclip.aggregate import _combined_norm

        total = _combined_norm(list(norms.values()))
    # the materialised group gradients' norms
    sq = sum(groups.sum(g.flatten(1)).square().sum(1) for pe in per_example for g in pe.values())
    bad_group = 3 // b
    good = torch.ones(batch // b, dtype=torch.bool)
    if poison is not None:
        good[bad_group] = False
        assert not torch.isfinite(total[bad_group])
    torch.testing.assert_close(total[good], sq[good].sqrt(), rtol=1e-10, atol=1e-12)
    bad = ~total.lt(float("inf"))
    assert torch.equal(bad, ~good)
    buf.mask(bad, groups)
    weight = torch.rand(batch // b, dtype=torch.float64).masked_fill_(bad, 0.0)
    buf.weigh(weight, groups)
    sums = dict(buf.sums(records))
    rows = groups.rows(weight)
    for r, pe in zip(records, per_example):
        for name, p in r.params.items():
            keep = ~groups.rows(bad)  # a non-finite group's rows: left out (weight 0, and 0 * NaN is NaN)
            want = torch.einsum("b,b...->...", rows[keep], pe[name][keep])
            assert torch.isfinite(sums[id(p)]).all()
            torch.testing.assert_close(sums[id(p)], want, rtol=1e-10, atol=1e-12)
    for r, (a, g) in zip(captured, originals):  # the captured tensors are never written (the buffer is a copy)
        torch.testing.assert_close(r[0], a, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(r[1], g, rtol=0, atol=0, equal_nan=True)


class Net(nn.Module):
    """Two convolutions (their group gradients reused for the sum), 2-D Linears (the row buffer), a Linear
    without bias and a LayerNorm (a materialised group gradient beside them)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 2 * 2, 9)
        self.norm = nn.LayerNorm(9)
        self.fc2 = nn.Linear(9, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # (B, 1, 6, 6)
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).flatten(1)
        return self.head(torch.relu(self.fc2(self.norm(self.fc1(h)))))


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("grouping", ["contiguous", "keyed"])
@pytest.mark.parametrize("clipping", ["fixed", "normalize", "adaptive", "per_layer"])
@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
def test_buffered_and_reused_forms_equal_the_naive_loop(device_path, b, grouping, clipping, poison, monkeypatch):
    monkeypatch.setattr(tensors, "DEVICE_PATHS_ON_CPU", device_path)
    built = []
    real = fused.RowBuffer.__init__

    def spy(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(fused.RowBuffer, "__init__", spy)
    m, ref, x, y, opt = _net_and_batch(seed=2)
    keyed = dict(grouping="keyed", num_groups=4, seed=3) if grouping == "keyed" else {}
    if grouping == "keyed" and b == 1:
        pytest.skip("keyed groups: one size")
    bounds = {n: 0.05 * (1 + i % 3) / 2 for i, (n, _) in enumerate(m.named_parameters())}
    engine = dp_microclip.attach(m, opt, micro_batch_size=b if grouping != "keyed" else 3,
                                 max_grad_norm=bounds if clipping == "per_layer" else 0.05, verify_steps=0,
                                 clipping=clipping, grad_mode="bookkeeping", **keyed)
    bad = x.clone()
    if poison is not None:
        bad[7, 0, 2, 2] = poison
    F.cross_entropy(m(bad), y).backward()
    opt.step()
    assert bool(built) == (device_path and clipping != "per_layer")
    index = engine.last_groups.index
    dropped = index == index[7] if poison is not None else torch.zeros(12, dtype=torch.bool)
    assert int(engine.nonfinite_groups) == (poison is not None)
    keep = torch.nonzero(~dropped).flatten()
    kept_index = torch.unique(index[keep], return_inverse=True)[1]
    groups = int(index.max()) + 1 if grouping != "keyed" else 4
    kept = int(kept_index.max()) + 1
    if clipping == "adaptive":
        pytest.skip("adaptive: checked for finiteness only (its bound is the pass's smallest norm)")
    want = naive_microbatch_grads(ref, F.cross_entropy, x[keep], y[keep], group_index=kept_index, num_groups=kept,
                                  max_grad_norm=0.05, clipping=clipping,
                                  **(dict(per_param_bounds=bounds) if clipping == "per_layer" else {}))
    for name, p in m.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, want[name] * kept / groups, rtol=1e-9, atol=1e-12)


def test_conv_ghost_norms_from_group_gradients_are_reused_exactly():
    from dp_microclip.layers.conv import conv_group_grads, conv_group_sq_norms

    torch.manual_seed(3)
    layer = nn.Conv2d(2, 3, 3).double()
    x = torch.randn(6, 2, 7, 7, dtype=torch.float64)
    g = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    groups = _groups(6, 2)
    got = conv_group_sq_norms(layer, (x,), g, groups, method="materialize")
    want = conv_group_grads(layer, (x,), g, groups)
    for name in ("weight", "bias"):
        assert isinstance(got[name], GroupGrads)
        torch.testing.assert_close(got[name].grad, want[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[name].norm, want[name].flatten(1).norm(dim=1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("b", [1, 3])
def test_frozen_parameters_of_buffered_layers_stay_out(b, monkeypatch):
    monkeypatch.setattr(tensors, "DEVICE_PATHS_ON_CPU", True)
    torch.manual_seed(4)
    m = Net().double()
    m.fc1.weight.requires_grad_(False)  # the buffer takes the bias alone
    m.head.bias.requires_grad_(False)  # and the weight alone
    ref = copy.deepcopy(m)
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)
    dp_microclip.attach(m, opt, micro_batch_size=b, max_grad_norm=0.05, verify_steps=0, grad_mode="bookkeeping")
    F.cross_entropy(m(x), y).backward()
    opt.step()
    want = naive_microbatch_grads(ref, F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=0.05)
    assert m.fc1.weight.grad is None and m.head.bias.grad is None
    for name, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device_path", [False, True])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("memory", ["lean", "explicit"])
def test_under_a_memory_budget_the_conv_group_gradients_are_not_held(device_path, b, memory, monkeypatch):
    """Lean mode or an explicit budget: a convolution's ghost norms drop their group gradients (the sum is the
    rule's convolution again) and lean mode builds no row buffer; the numbers are the same."""
    monkeypatch.setattr(tensors, "DEVICE_PATHS_ON_CPU", device_path)
    held = []
    real = fused.ghost_norms

    def spy(record, groups, hold=False):
        out = real(record, groups, hold)
        held.append(out[1] is not None)
        return out

    monkeypatch.setattr("dp_microclip.aggregate.ghost_norms", spy)
    m, ref, x, y, opt = _net_and_batch(seed=5)
    budget = "lean" if memory == "lean" else 1 << 30
    dp_microclip.attach(m, opt, micro_batch_size=b, max_grad_norm=0.05, verify_steps=0, grad_mode="bookkeeping",
                        memory_budget=budget)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    assert held and not any(held)
    want = naive_microbatch_grads(ref, F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=0.05)
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12)
