"""dp_microclip.tools.sweep (and sweep_report) on tiny settings: selection on validation only, tuning seeds apart from
reporting seeds, data drawn per seed, paired t statistics with Holm, resume, table, plots, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dp_microclip.tools import sweep as sw
from dp_microclip.tools.sweep_report import SweepResult, holm, paired_bootstrap, paired_t
from dp_microclip.errors import ConfigurationError


def data(seed=0, n=96):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def make_model():
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))


TINY = sw.SweepSettings(methods=("plain", "fixed", "adaptive", "normalize"), micro_batch_sizes=(1, 4),
                        seeds=(0, 1, 2), learning_rates=(0.03, 0.3), max_grad_norms=(0.5,), batch_size=16,
                        tune_seeds=1, epochs=2, name="tiny")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_selection_reads_validation_never_test():
    train, val = data(0), data(1)
    result = sw.sweep(make_model, train, val, data(2), TINY, progress=False)
    flipped_test = (data(2)[0], 1 - data(2)[1])  # a test set that ranks every run the other way round
    again = sw.sweep(make_model, train, val, flipped_test, TINY, progress=False)
    assert {k: v["lr"] for k, v in result.selected.items()} == {k: v["lr"] for k, v in again.selected.items()}
    for (method, b), chosen in result.selected.items():
        tuning = [r for r in result.tuning if r["method"] == method and r["micro_batch_size"] == b]
        best = max(tuning, key=lambda r: (r["val"], -r["lr"]))
        assert chosen["lr"] == best["lr"]
        assert [r["seed"] for r in result.final[(method, b)]] == [0, 1, 2]
    assert len(result.table()) == 1 + 3 * 2


def test_seeds_are_paired_across_methods():
    # fixed clipping with a bound no gradient reaches is plain training: same init, same batches -> same model
    settings = sw.SweepSettings(methods=("plain", "fixed"), micro_batch_sizes=(4,), seeds=(0, 1),
                                learning_rates=(0.1,), max_grad_norms=(1e9,), batch_size=16, epochs=2, name="pair")
    result = sw.sweep(make_model, data(0), data(1), data(2), settings, progress=False)
    plain = result.final[("plain", None)]
    fixed = result.final[("fixed", 4)]
    for p, f in zip(plain, fixed):
        assert p["seed"] == f["seed"]
        assert np.allclose(p["train_loss"], f["train_loss"], rtol=1e-5)
    assert plain[0]["train_loss"] != plain[1]["train_loss"]  # seeds differ
    row = [r for r in result.table() if r["method"] == "fixed"][0]
    assert row["diff_vs_plain"] == pytest.approx(0.0, abs=1e-12)


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    store = tmp_path / "runs.jsonl"
    settings = sw.SweepSettings(methods=("plain", "fixed"), micro_batch_sizes=(4,), seeds=(0, 1), tune_seeds=1,
                                learning_rates=(0.03, 0.3), max_grad_norms=(0.5,), batch_size=16, epochs=1)
    first = sw.sweep(make_model, data(0), data(1), data(2), settings, store=store, progress=False)
    lines = store.read_text().splitlines()
    assert len(lines) == 2 + 2 + 2 + 2  # plain: 2 lrs x 1 tuning seed + 2 reporting seeds; fixed: same
    calls = []
    real = sw.train_run
    monkeypatch.setattr(sw, "train_run", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = sw.sweep(make_model, data(0), data(1), data(2), settings, store=store, progress=False)
    assert calls == []
    assert again.table() == first.table()
    store.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # the last run was cut off mid-write
    sw.sweep(make_model, data(0), data(1), data(2), settings, store=store, progress=False)
    assert len(calls) == 1


def test_table_markdown_json_and_plots(tmp_path):
    result = sw.sweep(make_model, data(0), data(1), data(2), TINY, progress=False)
    md = result.to_markdown()
    assert "| plain | - |" in md and "| fixed | 4 |" in md and "t interval" in md
    assert "Holm (6 comparisons)" in md and "Chosen on validation (tuning seeds 1000" in md
    paths = result.save(tmp_path, "tiny")
    assert {p.name for p in paths} == {"tiny.md", "tiny.json", "tiny-vs-b.png", "tiny-curves.png"}
    blob = json.loads((tmp_path / "tiny.json").read_text())
    assert blob["settings"]["seeds"] == [0, 1, 2] and len(blob["runs"]) == 7 * 3
    row = [r for r in result.table() if r["method"] == "fixed" and r["b"] == 4][0]
    diffs = np.array(row["test_per_seed"]) - np.array([r["test"] for r in result.final[("plain", None)]])
    assert row["diff_vs_plain"] == pytest.approx(diffs.mean())
    assert row["diff_ci_low"] <= row["diff_vs_plain"] <= row["diff_ci_high"]
    assert row["comparisons"] == 6 and row["p_holm"] >= row["p_value"]


def test_paired_t_equals_scipy():
    from scipy import stats

    a = np.array([0.95, 0.93, 0.97, 0.91, 0.96, 0.94, 0.92, 0.98, 0.95, 0.93])
    b = np.array([0.94, 0.94, 0.95, 0.90, 0.93, 0.94, 0.93, 0.95, 0.94, 0.91])
    d = a - b
    t = paired_t(d, 0.95)
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert t["n"] == 10 and t["mean"] == pytest.approx(d.mean())
    assert (t["low"], t["high"]) == (pytest.approx(low), pytest.approx(high))
    assert t["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired_t([0.02, 0.02, 0.02]) == {"n": 3, "mean": pytest.approx(0.02), "low": pytest.approx(0.02),
                                            "high": pytest.approx(0.02), "p": 0.0}
    assert np.isnan(paired_t([0.1])["p"])


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.5, float("nan"), 0.01])  # NaN is not a comparison: m = 2
    assert out[0] == pytest.approx(0.5) and np.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_best_picks_method_and_b_on_validation_even_when_test_disagrees():
    settings = sw.SweepSettings(methods=("plain", "fixed"), micro_batch_sizes=(1, 4), seeds=(0, 1, 2), tune_seeds=1)

    def runs(method, b, tests):
        return [{"method": method, "micro_batch_size": b, "seed": s, "test": t, "val": 0.5, "diverged": False}
                for s, t in enumerate(tests)]

    sel = {"lr": 0.1, "max_grad_norm": None, "lr_at_grid_edge": False}
    result = SweepResult(settings, {("plain", None): {**sel, "val_tune": 0.70},
                                    ("fixed", 1): {**sel, "val_tune": 0.90},   # best on validation
                                    ("fixed", 4): {**sel, "val_tune": 0.80}},  # best on test
                         {("plain", None): runs("plain", None, [0.6, 0.6, 0.6]),
                          ("fixed", 1): runs("fixed", 1, [0.5, 0.55, 0.6]),
                          ("fixed", 4): runs("fixed", 4, [0.99, 0.98, 0.97])})
    best = result.best()
    assert best is not None and (best["method"], best["b"]) == ("fixed", 1)
    assert "Chosen on validation (tuning seeds 1000, not the reporting seeds): fixed b=1" in result.to_markdown()


def test_tuning_and_reporting_seeds_are_disjoint():
    assert sw.SweepSettings().tune_seeds == (1000, 1001) and len(sw.SweepSettings().seeds) >= 10
    with pytest.raises(ConfigurationError, match="also reporting seeds"):
        sw.SweepSettings(seeds=(0, 1, 2), tune_seeds=(2, 3))
    result = sw.sweep(make_model, data(0), data(1), data(2), TINY, progress=False)
    tuned = {r["seed"] for r in result.tuning}
    reported = {r["seed"] for rows in result.final.values() for r in rows}
    assert tuned == {1000} and reported == {0, 1, 2}


def test_splits_and_label_noise_are_drawn_per_seed():
    pytest.importorskip("sklearn")
    a, b = sw.digits_splits(0.2, seed=0), sw.digits_splits(0.2, seed=1)
    assert not torch.equal(a[3], b[3]) and not torch.equal(a[2][1], b[2][1])  # flips and test split differ
    assert torch.equal(a[3], sw.digits_splits(0.2, seed=0)[3])  # and are reproducible
    asked = []

    def per_seed(seed):
        asked.append(seed)
        return data(10 * seed % 97), data(1), data(2)

    settings = sw.SweepSettings(methods=("plain", "fixed"), micro_batch_sizes=(4,), seeds=(0, 1), tune_seeds=1,
                                learning_rates=(0.1,), max_grad_norms=(1e9,), batch_size=16, epochs=1)
    result = sw.sweep(make_model, per_seed, None, None, settings, progress=False)
    assert sorted(asked) == [0, 1, 1000]  # each seed's data drawn once, shared by the methods
    plain, fixed = result.final[("plain", None)], result.final[("fixed", 4)]
    assert np.allclose(plain[0]["train_loss"], fixed[0]["train_loss"], rtol=1e-5)  # paired within a seed
    with pytest.raises(ConfigurationError, match="val_set=None"):
        sw.sweep(make_model, per_seed, data(1), None, settings, progress=False)


def test_plain_gets_as_fine_a_grid_as_clipping():
    lrs = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    s = sw.SweepSettings(methods=("plain", "fixed", "adaptive"), learning_rates=lrs, max_grad_norms=(0.3, 1.0))
    assert len(s.grid("fixed")) == 12 and len(s.grid("plain")) == 12
    assert (min(s.lrs("plain")), max(s.lrs("plain"))) == (0.003, 1.0)
    assert len(sw.SweepSettings(methods=("plain", "fixed"), learning_rates=lrs, max_grad_norms=(0.3, 1.0),
                                match_plain_grid=False).grid("plain")) == 6


def test_paired_bootstrap_kept_for_old_results():
    assert paired_bootstrap([0.02, 0.02, 0.02], 100, 0.95) == (pytest.approx(0.02), pytest.approx(0.02))
    lo, hi = paired_bootstrap([0.0, 0.1, 0.2, 0.3], 2000, 0.9)
    assert 0.0 <= lo < 0.15 < hi <= 0.3
    assert all(np.isnan(paired_bootstrap([0.1], 100, 0.95)))


def test_settings_errors_name_the_fix():
    with pytest.raises(ConfigurationError, match="divisors of the batch size"):
        sw.SweepSettings(micro_batch_sizes=(3,), batch_size=16)
    with pytest.raises(ConfigurationError, match="choose from"):
        sw.SweepSettings(methods=("sgd",))
    with pytest.raises(ConfigurationError, match="tune_seeds"):
        sw.SweepSettings(seeds=(0,), tune_seeds=(5, 5))
    assert sw.SweepSettings().grid("fixed") == [(lr, c) for lr in sw.DEFAULT_LRS["fixed"] for c in (0.3, 1.0)]
    assert sw.SweepSettings(learning_rates={"adaptive": (1.0,)}).lrs("adaptive") == (1.0,)
    with pytest.raises(ConfigurationError, match="fit in memory"):
        sw.sweep(make_model, [1, 2, 3], data(1), data(2), TINY, progress=False)


def test_command_line(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert sw.main(["--methods", "plain", "fixed", "-b", "8", "--seeds", "0", "1", "--lrs", "0.1",
                    "--max-grad-norms", "1", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| fixed | 8 | 0.1 | 1 |" in out
    assert (tmp_path / "runs.jsonl").exists() and (tmp_path / "digits-mlp-noise0.2-split-per-seed-vs-b.png").exists()


def test_extra_test_sets_per_domain():
    settings = sw.SweepSettings(methods=("plain", "fixed"), micro_batch_sizes=(4,), seeds=(0, 1),
                                learning_rates=(0.1,), max_grad_norms=(0.5,), batch_size=16, epochs=1, name="extra")
    a, b = data(3, n=32), data(4, n=32)
    result = sw.sweep(make_model, data(0), data(1), data(2), settings, progress=False,
                      extra_test_sets={"a": a, "b": b})
    row = [r for r in result.table() if r["method"] == "fixed"][0]
    per_seed = [r["extra"]["a"] for r in result.final[("fixed", 4)]]
    assert row["test_a_mean"] == pytest.approx(np.mean(per_seed))
    plain = [r["extra"]["a"] for r in result.final[("plain", None)]]
    assert row["diff_a_vs_plain"] == pytest.approx(np.mean(per_seed) - np.mean(plain))
    assert len(row["diff_b_ci"]) == 2


def test_demo_lr_runs(tmp_path):
    """``python -m experiments.demo_lr`` used to fail with AttributeError 'lr_clip' (the demo's train() reads
    lr_plain / lr_clip); a one-epoch run through the same code."""
    pytest.importorskip("sklearn")
    from experiments import demo_lr

    demo_lr.main(["--seeds", "1", "--test-seeds", "1", "--epochs", "1", "--no-progress", "--out", str(tmp_path)])
    blob = json.loads((tmp_path / "demo-lr-summary.json").read_text())
    assert blob["lr_plain"] in demo_lr.LRS and len(blob["test"]["fixed"]) == 1


def test_cosine_schedule_equals_a_hand_written_loop_and_keeps_old_keys():
    # The reference: plain SGD with torch's own CosineAnnealingLR stepped once per batch, same seed and batches.
    settings = sw.SweepSettings(methods=("plain",), micro_batch_sizes=(1,), seeds=(0,), learning_rates=(0.3,), batch_size=16, epochs=3,
                                lr_schedule="cosine", name="cos")
    (x, y), val, test = data(0), data(1), data(2)
    row = sw.train_run(make_model, ((x, y), val, test), sw.RunConfig("plain", None, 0.3, None, 0), settings)
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=settings.momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3 * (len(x) // 16))
    order = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(3):
        perm, total = torch.randperm(len(x), generator=order), 0.0
        for i in range(0, len(x) - 15, 16):
            idx = perm[i:i + 16]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss)
        losses.append(total / (len(x) // 16))
    assert row["train_loss"] == pytest.approx(losses, rel=1e-6)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)          # decayed to zero by the end
    constant = sw.RunConfig("plain", None, 0.3, None, 0)
    assert "lr_schedule" not in constant.key(sw.SweepSettings(name="cos"))    # stored constant-rate runs stay valid
    assert constant.key(settings) != constant.key(sw.SweepSettings(methods=("plain",), micro_batch_sizes=(1,), name="cos", batch_size=16,
                                                                    epochs=3, learning_rates=(0.3,)))
    with pytest.raises(ConfigurationError, match="lr_schedule"):
        sw.SweepSettings(lr_schedule="step")
