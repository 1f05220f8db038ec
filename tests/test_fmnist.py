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

from experiments import fmnist


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


def test_flip_labels_flips_exactly_the_fraction():
    y = torch.arange(1000) % 10
    noisy, mask = fmnist.flip_labels(y, 0.2, seed=0)
    assert int(mask.sum()) == 200
    assert torch.all(noisy[mask] != y[mask]) and torch.equal(noisy[~mask], y[~mask])


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


def test_claim_code_path_on_random_features(tmp_path):
    """Part 2's small-scale sweep runs end to end (random features: checks the plumbing, not the science)."""
    import argparse

    torch.manual_seed(0)
    feats = torch.randn(150, 81, 7, 7)
    labels = torch.arange(150) % 10
    test = (torch.randn(20, 81, 7, 7), torch.arange(20) % 10)
    args = argparse.Namespace(subset=100, epochs=1, seeds=1, b=[1, 4], batch_size=20, lrs=[0.1])
    result, prefix = fmnist.claim(feats, labels, test, 0.2, args, tmp_path)
    assert prefix == "fmnist-claim-noise0.2"
    table = result.to_markdown()
    for method in ("plain", "fixed", "adaptive"):
        assert method in table
    assert (tmp_path / "fmnist-claim-noise0.2.runs.jsonl").exists()


def test_command_line_names_the_package_when_data_is_missing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fmnist.cli(["--data", str(tmp_path), "smoke"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "Traceback" not in err
