"""dp_microclip.tools.diagnostics against hand computations on a tiny model (float64, one backward per example)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from dp_microclip.tools.diagnostics import ClipMonitor, DraggerProbe
from dp_microclip.errors import ConfigurationError


def tiny(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    x[0] *= 6.0  # one example with a much larger gradient (a "dragger")
    y = torch.randint(0, 2, (8,))
    return model, x, y


def per_example(model, x, y):
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    model.zero_grad()
    return torch.stack(rows)


def hand(model, x, y, b, mode, C):
    g = per_example(model, x, y)
    groups = g.reshape(-1, b, g.shape[1]).mean(1)
    norms = groups.norm(dim=1)
    if mode == "fixed":
        f = (C / (norms + 1e-6)).clamp(max=1.0)
    elif mode == "adaptive":
        f = norms.min() / norms
    else:
        raise AssertionError(mode)
    clipped = (f[:, None] * groups).mean(0)
    unclipped = groups.mean(0)
    cos = float(clipped @ unclipped / (clipped.norm() * unclipped.norm()))
    return norms, f, clipped, unclipped, cos


def run_step(mode, C, b=2, every=1, track=True, writer=None, passes=1):
    model, x, y = tiny()
    expected = hand(model, x, y, b, mode, C)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=C, clipping=mode)
    monitor = ClipMonitor(writer=writer, every=every, track_unclipped=track)
    engine.add_observer(monitor)
    for _ in range(2):
        opt.zero_grad()
        for chunk in torch.arange(8).chunk(passes):
            F.cross_entropy(model(x[chunk]), y[chunk]).backward()
        opt.step()
    engine.detach()
    return monitor, expected


@pytest.mark.parametrize("passes", [1, 2])
def test_fixed_matches_hand_computation(passes):
    monitor, (norms, f, clipped, unclipped, cos) = run_step("fixed", C=0.7, passes=passes)
    row = monitor.records[0]
    assert row["step"] == 1 and row["num_groups"] == 4
    assert row["norm_min"] == pytest.approx(float(norms.min()), rel=1e-9)
    assert row["norm_max"] == pytest.approx(float(norms.max()), rel=1e-9)
    assert row["norm_median"] == pytest.approx(float(norms.median() + norms.sort().values[2]) / 2, rel=1e-9)
    assert row["bound"] == 0.7
    assert row["clipped_fraction"] == pytest.approx(float((norms > 0.7).double().mean()))
    assert 0 < row["clipped_fraction"] < 1  # the test exercises both cases
    assert row["clipped_update_norm"] == pytest.approx(float(clipped.norm()), rel=1e-9)
    assert row["unclipped_update_norm"] == pytest.approx(float(unclipped.norm()), rel=1e-9)
    assert row["cosine"] == pytest.approx(cos, rel=1e-9)
    assert row["weight_min"] == pytest.approx(float(f.min()), rel=1e-9)
    assert len(monitor.records) == 2


def test_nothing_clipped_gives_cosine_one():
    monitor, (norms, *_rest) = run_step("fixed", C=1e6)
    row = monitor.records[0]
    assert row["clipped_fraction"] == 0.0
    assert row["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert row["clipped_update_norm"] == pytest.approx(row["unclipped_update_norm"], rel=1e-9)


def test_adaptive_bound_is_smallest_norm():
    monitor, (norms, f, clipped, unclipped, cos) = run_step("adaptive", C=1.0)
    row = monitor.records[0]
    assert row["bound"] == pytest.approx(float(norms.min()), rel=1e-9)
    assert row["clipped_fraction"] == pytest.approx(3 / 4)  # every group but the smallest is scaled down
    assert row["clipped_update_norm"] == pytest.approx(float(clipped.norm()), rel=1e-9)
    assert row["cosine"] == pytest.approx(cos, rel=1e-9)


def test_every_and_no_unclipped_tracking():
    monitor, _ = run_step("fixed", C=0.7, every=2, track=False)
    assert [r["step"] for r in monitor.records] == [2]
    assert "cosine" not in monitor.records[0]


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


def test_tensorboard_scalars_and_csv(tmp_path):
    writer = FakeWriter()
    monitor, _ = run_step("fixed", C=0.7, writer=writer)
    tags = {t for t, _, _ in writer.calls}
    assert {"microclip/cosine", "microclip/clipped_fraction", "microclip/norm_min"} <= tags
    assert {s for _, _, s in writer.calls} == {1, 2}
    path = tmp_path / "clip.csv"
    monitor.to_csv(path)
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 2 and float(rows[0]["cosine"]) == pytest.approx(monitor.records[0]["cosine"])


def test_probe_matches_hand_computation():
    model, x, y = tiny()
    g = per_example(model, x, y)
    flags = [True] + [False] * 7
    probe = DraggerProbe(x, y, F.cross_entropy, flags=flags)
    rows = probe.measure(model, step=0, micro_batch_size=2, clipping="fixed", max_grad_norm=0.3)
    norms = torch.tensor([r["grad_norm"] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(norms, g.norm(dim=1))
    groups = g.reshape(4, 2, -1).mean(1)
    weights = (0.3 / (groups.norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert [r["weight"] for r in rows] == pytest.approx(weights.repeat_interleave(2).tolist(), rel=1e-9)
    mean = g.mean(0)
    cos = g @ mean / (g.norm(dim=1) * mean.norm())
    assert [r["cosine_to_mean"] for r in rows] == pytest.approx(cos.tolist(), rel=1e-9)
    summary = probe.summary()[0]
    assert summary["flagged_grad_norm"] == pytest.approx(float(g[0].norm()), rel=1e-9)
    assert summary["flagged_weight"] < summary["other_weight"]  # the large example's micro-batch is muted


def test_probe_as_observer_leaves_training_unchanged():
    def train(with_probe):
        model, x, y = tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.3)
        probe = DraggerProbe(x[:4], y[:4], F.cross_entropy, every=2)
        if with_probe:
            engine.add_observer(probe)
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        engine.detach()
        return [p.detach().clone() for p in model.parameters()], probe

    plain, _ = train(False)
    probed, probe = train(True)
    for a, b in zip(plain, probed):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)  # the autotuner may pick another exact route
    assert sorted({r["step"] for r in probe.records}) == [1, 2, 4]


def test_errors_name_the_fix():
    with pytest.raises(ConfigurationError, match="integer >= 1"):
        ClipMonitor(every=0)
    with pytest.raises(ConfigurationError, match="matching rows"):
        DraggerProbe(torch.zeros(3, 2), torch.zeros(2), F.cross_entropy)
    model, x, y = tiny()
    with pytest.raises(ConfigurationError, match="use 'fixed'"):
        DraggerProbe(x, y, F.cross_entropy).measure(model, 0, 2, clipping="bogus")
    assert math.isfinite(DraggerProbe(x, y, F.cross_entropy).measure(model, 0, 3)[0]["weight"])


def test_per_layer_has_no_single_clipped_fraction():
    model, x, y = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.2, clipping="per_layer")
    monitor = ClipMonitor()
    engine.add_observer(monitor)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    row = monitor.records[0]
    assert math.isnan(row["clipped_fraction"])  # factors are per parameter tensor
    assert 0 < row["cosine"] <= 1 and row["clipped_update_norm"] < row["unclipped_update_norm"]
