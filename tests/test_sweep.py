"""dp_microclip.tools.sweep (and sweep_report) on tiny settings: selection on validation only, paired seeds, resume, table, plots, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from dp_microclip.tools import sweep as sw
from dp_microclip.tools.sweep_report import paired_bootstrap
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
                        epochs=2, bootstrap=200, name="tiny")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    settings = sw.SweepSettings(methods=("plain", "fixed"), micro_batch_sizes=(4,), seeds=(0, 1),
                                learning_rates=(0.03, 0.3), max_grad_norms=(0.5,), batch_size=16, epochs=1)
    first = sw.sweep(make_model, data(0), data(1), data(2), settings, store=store, progress=False)
    lines = store.read_text().splitlines()
    assert len(lines) == 2 + 1 + 2 + 1  # plain: 2 lrs + 1 more seed; fixed: same
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
    assert "| plain | - |" in md and "| fixed | 4 |" in md and "bootstrap" in md
    paths = result.save(tmp_path, "tiny")
    assert {p.name for p in paths} == {"tiny.md", "tiny.json", "tiny-vs-b.png", "tiny-curves.png"}
    blob = json.loads((tmp_path / "tiny.json").read_text())
    assert blob["settings"]["seeds"] == [0, 1, 2] and len(blob["runs"]) == 7 * 3
    row = [r for r in result.table() if r["method"] == "fixed" and r["b"] == 4][0]
    diffs = np.array(row["test_per_seed"]) - np.array([r["test"] for r in result.final[("plain", None)]])
    assert row["diff_vs_plain"] == pytest.approx(diffs.mean())
    assert row["diff_ci_low"] <= row["diff_vs_plain"] <= row["diff_ci_high"]


def test_paired_bootstrap():
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
        sw.SweepSettings(seeds=(0,), tune_seeds=2)
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
    assert (tmp_path / "runs.jsonl").exists() and (tmp_path / "digits-mlp-noise0.2-vs-b.png").exists()


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
