"""experiments.fmnist: the IDX loader on a generated fixture, the missing-data error, a tiny training run.

Nothing here needs the Debian package or kymatio: the fixture is written into tmp_path.
"""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from experiments import fmnist, fmnist_claim


def write_idx(path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzip-compressed IDX file, as the MNIST distribution does."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fixture_dir(tmp_path):
    """A miniature Fashion-MNIST: 40 training and 12 test images whose labels are readable from the pixels."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 12)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 50, size=(n, 28, 28)).astype(np.uint8)
        x[np.arange(n), y, y] = 255          # pixel (label, label) is bright: a learnable signal
        x[:, 27, 27] = np.arange(n)          # pixel (27, 27) indexes the image: order is checkable
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", y)
    return tmp_path


def test_loader_reads_the_idx_fixture(fixture_dir):
    x_tr, y_tr, x_te, y_te = fmnist.load_fmnist(fixture_dir)
    assert x_tr.shape == (40, 1, 28, 28) and x_te.shape == (12, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) >= 0.0 and float(x_tr.max()) == 1.0        # scaled by 1/255
    assert torch.equal(y_tr, torch.arange(40) % 10) and torch.equal(y_te, torch.arange(12) % 10)
    # order and layout survive: pixel (27, 27) of image i is i/255, pixel (y, y) is the bright one
    assert torch.allclose(x_tr[:, 0, 27, 27] * 255, torch.arange(40, dtype=torch.float32))
    assert torch.all(x_tr[torch.arange(40), 0, y_tr, y_tr] == 1.0)


def test_read_idx_keeps_dimensions(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(fmnist.read_idx(tmp_path / "a.gz"), a)


def test_missing_files_name_the_debian_package(tmp_path, fixture_dir):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fmnist.load_fmnist(tmp_path / "nowhere")
    (fixture_dir / "t10k-labels-idx1-ubyte.gz").unlink()                # one file of four missing
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        fmnist.load_fmnist(fixture_dir)


def test_env_var_points_at_the_data(fixture_dir, monkeypatch):
    monkeypatch.setenv("FMNIST_DIR", str(fixture_dir))
    assert len(fmnist.load_fmnist()[0]) == 40


def test_corrupt_files_are_refused(tmp_path, fixture_dir):
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 3) + b"\0" * 12)   # float IDX: not ours
    with pytest.raises(ValueError, match="unsigned-byte"):
        fmnist.read_idx(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\1" * 7)   # header says 10, 7 bytes
    with pytest.raises(ValueError, match="payload"):
        fmnist.read_idx(tmp_path / "short.gz")
    write_idx(fixture_dir / "t10k-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))  # 12 images, 11 labels
    with pytest.raises(ValueError, match="do not match"):
        fmnist.load_fmnist(fixture_dir)


def test_models_have_the_papers_shapes():
    assert sum(p.numel() for p in fmnist.tanh_cnn().parameters()) == 26010
    assert fmnist.tanh_cnn()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in fmnist.scatter_linear().parameters()) == 81 * 49 * 10 + 10
    assert fmnist.scatter_cnn()(torch.zeros(2, 81, 7, 7)).shape == (2, 10)


@pytest.mark.parametrize("method", ["engine", "opacus", "opacus_ghost"])
def test_tiny_dp_run(fixture_dir, tmp_path, method):
    """A few seconds of the Table 1 training loop on the fixture: it records what ran and an epsilon."""
    torch.set_num_threads(1)
    data = fmnist.load_fmnist(fixture_dir)
    seen = []
    res = fmnist.train_dp("cnn", method, 0, data, epochs=2, batch_size=10, lr=0.5, progress=seen.append)
    assert [r["epochs_done"] for r in seen] == [1, 2] and seen[-1]["curve"] == res["curve"]
    assert seen[0]["epsilon"] < seen[1]["epsilon"] == pytest.approx(res["epsilon"])
    assert res["row"] == "cnn" and res["method"] == method and res["epochs"] == 2
    assert len(res["curve"]) == 2 and 0.0 <= res["accuracy"] <= 1.0
    assert res["sample_rate"] == pytest.approx(10 / 40)
    assert res["steps"] == 8                     # round(1/q) = 4 Poisson batches per epoch
    assert 0 < res["epsilon"] < float("inf")
    assert res["noise_multiplier"] == 2.15 and res["max_grad_norm"] == 0.1


def test_engine_shuffled_draws_the_paper_codes_fixed_size_batches(fixture_dir):
    """The paper code's batches: every epoch a shuffle cut into full batches of B (the rest dropped), the epsilon
    labelled as the paper's as-if-Poisson number; the same Poisson epsilon as the engine's own loader."""
    torch.set_num_threads(1)
    x, y, xt, yt = fmnist.load_fmnist(fixture_dir)
    data = (x[:35], y[:35], xt, yt)             # 35 = 3 full batches of 10, 5 dropped each epoch
    res = fmnist.train_dp("cnn", "engine_shuffled", 0, data, epochs=2, batch_size=10)
    assert res["steps"] == 6 and res["examples"] == 60
    assert "not a guarantee" in res["epsilon_note"]
    poisson = fmnist.train_dp("cnn", "engine", 0, data, epochs=2, batch_size=10)
    assert "epsilon_note" not in poisson
    assert res["sample_rate"] == poisson["sample_rate"] == pytest.approx(10 / 35)


def test_engine_and_opacus_spend_the_same_epsilon(fixture_dir):
    """Same z, q, steps: the two accountants (both PRV) agree closely."""
    torch.set_num_threads(1)
    data = fmnist.load_fmnist(fixture_dir)
    a = fmnist.train_dp("cnn", "engine", 0, data, epochs=3, batch_size=10)
    b = fmnist.train_dp("cnn", "opacus", 0, data, epochs=3, batch_size=10)
    assert a["steps"] == b["steps"] == 12
    assert a["epsilon"] == pytest.approx(b["epsilon"], rel=0.05)


def test_report_summarises_runs(tmp_path):
    for seed, acc in ((0, 0.80), (1, 0.82)):
        run = dict(row="linear", method="engine", epochs=3, seed=seed, accuracy=acc, best_accuracy=acc + 0.01,
                   epsilon=1.5, wall_s=10.0, train_s=9.0)
        fmnist.run_path("linear", "engine", seed, 3, tmp_path).write_text(json.dumps(run))
    stopped = dict(row="linear", method="engine", epochs=3, epochs_done=1, seed=2, accuracy=0.5,
                   best_accuracy=0.5, epsilon=0.5, wall_s=4.0, train_s=3.0)
    fmnist.partial_path(fmnist.run_path("linear", "engine", 2, 3, tmp_path)).write_text(json.dumps(stopped))
    text = fmnist.report(tmp_path, tmp_path)
    assert "| ScatterNet + linear | 89.7 | engine | 3 | 0,1 | 81.00 [" in text
    assert "| 3.0 | 10 |" in text                        # 9 s over 3 epochs; wall per run
    # the stopped run is reported on its own line, never averaged with the finished ones
    assert "| engine | 1 of 3 (stopped) | 2 | 50.00 |" in text
    assert (tmp_path / "fmnist-table1.json").exists()
    m, lo, hi = fmnist.t_interval([80.0, 82.0])
    assert m == 81.0 and lo < 80.0 and hi > 82.0     # t with 1 d.o.f. is wide


def test_scatter_features_if_kymatio_is_installed():
    pytest.importorskip("scipy")
    try:
        fmnist._kymatio_scattering()
    except ImportError:
        pytest.skip("kymatio not installed (pip install 'dp-microclip[experiments]')")
    f = fmnist.scatter(torch.rand(3, 1, 28, 28))
    assert f.shape == (3, 81, 7, 7)


def test_normalized_features_train_like_the_papers_model():
    """GroupNorm applied once + a linear layer is the paper's ScatterNet + linear, output for output."""
    torch.manual_seed(0)
    feats = 3 * torch.randn(6, 81, 7, 7) + 1
    full = fmnist.scatter_linear()
    lin = fmnist_claim.flat_linear()
    lin.load_state_dict(full[2].state_dict())
    flat = fmnist_claim.normalized_features(feats, chunk=4)      # chunked like the real 60,000
    assert flat.shape == (6, 3969)
    torch.testing.assert_close(lin(flat), full(feats))


def test_normalized_cache_is_written_once_and_read_back(tmp_path):
    calls = []

    def features():
        calls.append(1)
        torch.manual_seed(0)
        return torch.randn(5, 81, 7, 7), torch.randn(3, 81, 7, 7)

    tr, te = fmnist_claim.normalized_cache(features, 5, 3, tmp_path)
    tr2, te2 = fmnist_claim.normalized_cache(features, 5, 3, tmp_path)   # memory-mapped, features not recomputed
    assert calls == [1] and tr.shape == (5, 3969) and te.shape == (3, 3969)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    torch.testing.assert_close(tr, fmnist_claim.normalized_features(features()[0]))


def test_claim_splits_are_paired_within_a_seed_and_drawn_per_seed():
    x = torch.arange(1000, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(1000) % 10
    test = (x[:5], y[:5])
    a = fmnist_claim.claim_splits(x, y, test, 0.4, seed=3, n_train=600, n_val=200)
    b = fmnist_claim.claim_splits(x, y, test, 0.4, seed=3, n_train=600, n_val=200)
    c = fmnist_claim.claim_splits(x, y, test, 0.4, seed=4, n_train=600, n_val=200)
    for part in (0, 1):                                          # same seed: the same data for every method
        assert torch.equal(a[part][0], b[part][0]) and torch.equal(a[part][1], b[part][1])
    assert not torch.equal(a[0][0], c[0][0])                    # another seed: another subset
    (xtr, ytr), (xva, yva), t = a
    assert t is test and len(xtr) == 600 and len(xva) == 200
    assert not set(xtr[:, 0].tolist()) & set(xva[:, 0].tolist())   # train and validation disjoint
    clean_tr, clean_va = y[xtr[:, 0].long()], y[xva[:, 0].long()]
    flipped = (ytr != clean_tr).float().mean().item()
    assert 0.33 < flipped < 0.47                                 # about 40% flipped, never to the same class
    assert 0.3 < (yva != clean_va).float().mean().item() < 0.5
    clean = fmnist_claim.claim_splits(x, y, test, 0.0, seed=3, n_train=600, n_val=200)
    assert torch.equal(clean[0][1], y[clean[0][0][:, 0].long()])
    with pytest.raises(ValueError, match="examples available"):
        fmnist_claim.claim_splits(x, y, test, 0.0, seed=0, n_train=900, n_val=200)


def test_claim_runs_end_to_end_on_random_features(tmp_path, monkeypatch):
    """Part 2's sweeps and summary on random features: the plumbing, not the science."""
    import argparse

    torch.set_num_threads(1)
    monkeypatch.setattr(fmnist_claim, "CLAIM_LRS", {"plain": (0.001, 0.01), "fixed": (0.01,), "adaptive": (0.01,)})
    monkeypatch.setattr(fmnist_claim, "CLAIM_C", (1.0, 10.0))
    torch.manual_seed(0)
    feats, labels = fmnist_claim.normalized_features(torch.randn(80, 81, 7, 7)), torch.arange(80) % 10
    test = (fmnist_claim.normalized_features(torch.randn(20, 81, 7, 7)), torch.arange(20) % 10)
    args = argparse.Namespace(noise=[0.0, 0.4], seeds=2, tune_seeds=1, epochs=1, train=40, val=16, batch_size=8,
                              b=[1, 8], methods=["adaptive"])
    # the work split between processes: adaptive alone, then plain and fixed; no summary until all three ran
    assert "without --methods" in fmnist_claim.run_claim(feats, labels, test, args, tmp_path)
    fmnist_claim.run_claim(feats, labels, test, argparse.Namespace(**{**vars(args), "methods": ["plain", "fixed"]}),
                           tmp_path)
    stored = (tmp_path / "fmnist-claim-noise0.4.runs.jsonl").read_text()
    assert not (tmp_path / "fmnist-claim.md").exists()
    args.methods = None
    text = fmnist_claim.run_claim(feats, labels, test, args, tmp_path)
    assert (tmp_path / "fmnist-claim-noise0.4.runs.jsonl").read_text() == stored   # every run read back
    # 4 clipping cells x 2 noise levels compared with plain; Holm over all 8
    assert "Holm-adjusted over all 8 comparisons" in text and "chosen on validation" in text
    assert "| 40% |" in text and "fixed b=8" in text and "adaptive b=1" in text
    blob = json.loads((tmp_path / "fmnist-claim.json").read_text())
    assert blob["comparisons"] == 8 and set(blob["chosen"]) == {"0.0", "0.4"}
    runs = [json.loads(line) for line in (tmp_path / "fmnist-claim-noise0.4.runs.jsonl").read_text().splitlines()]
    assert {r["seed"] for r in runs} == {0, 1, 1000}             # tuning seed apart from the reporting seeds
    assert sum(r["method"] == "plain" and r["seed"] == 1000 for r in runs) == 2  # plain's grid as fine as fixed's
    # adaptive at b = B is plain SGD: at plain's learning rate it is the same run (the built-in null)
    same = [r for r in runs if r["seed"] == 1000 and r["lr"] == 0.01 and r["method"] in ("plain", "adaptive")
            and r["micro_batch_size"] in (None, 8)]
    assert len(same) == 2 and same[0]["val"] == same[1]["val"]
    assert (tmp_path / "fmnist-claim.md").exists() and (tmp_path / "fmnist-claim-noise0.4-vs-b.png").exists()


@pytest.mark.slow
def test_dp_curve_calibrates_each_b_to_the_target(tmp_path):
    """The DP curve: every b spends epsilon 3 (the engine's calibration); b > 1 needs about twice the noise."""
    import argparse

    torch.set_num_threads(1)
    torch.manual_seed(0)
    feats, labels = fmnist_claim.normalized_features(torch.randn(60, 81, 7, 7)), torch.arange(60) % 10
    test = (fmnist_claim.normalized_features(torch.randn(10, 81, 7, 7)), torch.arange(10) % 10)
    args = argparse.Namespace(seeds=2, b=[1, 4], epochs=2, batch_size=12, lr=1.0)
    text = fmnist_claim.run_dpcurve(feats, labels, test, args, tmp_path)
    blob = json.loads((tmp_path / "fmnist-dpcurve.json").read_text())
    z = {b: blob[b]["runs"][0]["noise_multiplier"] for b in ("1", "4")}
    for b in ("1", "4"):
        for r in blob[b]["runs"]:
            assert r["epsilon"] == pytest.approx(3.0, abs=0.05)
    assert z["4"] > 1.5 * z["1"]
    assert "vs b=1" in text and blob["4"]["diff_vs_first"]["n"] == 2
    lines = (tmp_path / "fmnist-dpcurve.runs.jsonl").read_text().splitlines()
    assert len(lines) == 4
    fmnist_claim.run_dpcurve(feats, labels, test, args, tmp_path)   # resumable: nothing rerun
    assert (tmp_path / "fmnist-dpcurve.runs.jsonl").read_text().splitlines() == lines


def test_command_line_names_the_package_when_data_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fmnist.cli(["--data", str(tmp_path), "smoke"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err
