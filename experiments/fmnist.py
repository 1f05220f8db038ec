"""Fashion-MNIST: Tramer & Boneh (ICLR 2021) Table 1 with the engine and with Opacus, and the clipping claim.

    python -m experiments.fmnist table1 [--rows linear cnn scatcnn] [--methods engine opacus]
                                        [--seeds 0 1 2 3 4] [--epochs 40]
    python -m experiments.fmnist report          # results/fmnist/*.json -> results/fmnist-table1.{md,json}
    python -m experiments.fmnist claim [--seeds 10] [--tune-seeds 2] [--train 5000] [--epochs 6]
    python -m experiments.fmnist dpcurve [--seeds 5] [--b 1 4 16 64]
    python -m experiments.fmnist features        # compute and cache the ScatterNet features
    python -m experiments.fmnist smoke           # seconds: every code path on a few hundred images

Data: the real Fashion-MNIST (60,000 training and 10,000 test images, 28x28, 10 classes), read
from the four IDX ``.gz`` files of the Debian package ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``; they land in ``/usr/share/datasets/fashion-mnist/``,
or point ``FMNIST_DIR`` elsewhere). Pixels are scaled to [0, 1] (the paper's ``ToTensor``), no
other normalisation.

Table 1 (epsilon = 3, delta = 1e-5), the settings of the paper's public code
(github.com/ftramer/Handcrafted-DP, ``cnns.py`` / ``baselines.py`` and its README):

* ``cnn``: end-to-end tanh CNN (conv 16 8x8 s2 p2, maxpool 2 s1, conv 32 4x4 s2, maxpool 2 s1,
  linear 512->32, tanh, linear 32->10), SGD momentum 0.9, lr 4, C 0.1, batch 2048, z 2.15,
  40 epochs; paper 86.0%.
* ``linear``: ScatterNet (kymatio ``Scattering2D(J=2)``, 81x7x7 features) + GroupNorm(27 groups,
  no affine) + linear 3969->10, lr 16, C 0.1, batch 8192, z 4.05, 40 epochs; paper 89.7%.
* ``scatcnn``: ScatterNet + GroupNorm(27) + CNN (conv 16 3x3 s2 p1, conv 32 3x3 s1 p1, tanh,
  linear 512->32, tanh, linear 32->10), lr 4, C 0.1, batch 2048, z 2.15, 40 epochs; paper 89.0%.

Two implementations of the same DP-SGD, each on its own Poisson batches at sample rate q = B/N:
``engine`` (``dp_microclip.attach(..., micro_batch_size=1, privacy=DP(noise_multiplier=z, ...))``,
batches from ``engine.data_loader``) and ``opacus`` (Opacus ``GradSampleModule`` + ``DPOptimizer``
+ ``DPDataLoader`` at the same q, z, C and expected batch size; its PRV accountant). Each run is
one JSON file under ``results/fmnist/`` (a finished run is not redone), with the test accuracy
after every epoch, the final accuracy (what we report) and the best epoch's (what a test-selected
number would be), epsilon and wall time. Differences from the paper's code: Poisson batches
instead of shuffled fixed-size batches; epsilon from a PRV accountant instead of RDP with the
old conversion (the paper's z was calibrated so that RDP reaches 3 after 40 epochs).

``claim`` (issue 27 Part 2: noise-free clipping against tuned plain SGD with flipped labels) and
``dpcurve`` (DP utility against b at epsilon 3) live in :mod:`experiments.fmnist_claim`.
"""

from __future__ import annotations

import argparse
from functools import partial
import gzip
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .fmnist_claim import CLAIM_B, normalized_cache, run_claim, run_dpcurve

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "fmnist"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CACHE = Path(os.environ.get("FMNIST_CACHE", Path(__file__).resolve().parent / ".cache"))
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MISSING = ("Fashion-MNIST not found: {path} is missing. Install it with `apt-get install dataset-fashion-mnist` "
           "(the four IDX .gz files land in /usr/share/datasets/fashion-mnist/), or set FMNIST_DIR to a folder "
           "holding them.")

# The paper's settings (Handcrafted-DP README and cnns.py/baselines.py defaults) and Table 1 numbers.
ROWS = {
    "cnn": dict(title="end-to-end CNN", batch_size=2048, lr=4.0, noise_multiplier=2.15, paper=86.0, scatter=False),
    "linear": dict(title="ScatterNet + linear", batch_size=8192, lr=16.0, noise_multiplier=4.05, paper=89.7,
                   scatter=True),
    "scatcnn": dict(title="ScatterNet + CNN", batch_size=2048, lr=4.0, noise_multiplier=2.15, paper=89.0,
                    scatter=True),
}
COMMON = dict(max_grad_norm=0.1, momentum=0.9, delta=1e-5, epochs=40, target_epsilon=3.0)


# ------------------------------------------------------------------------------------------- data
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one gzip-compressed IDX file (the MNIST format) into a ``uint8`` array of its shape.

    The header is two zero bytes, a type byte (0x08: unsigned byte, the only type Fashion-MNIST
    uses), the number of dimensions, then one big-endian 32-bit size per dimension.

    Raises:
        FileNotFoundError: the file is missing (the message names the Debian package).
        ValueError: the header is not an unsigned-byte IDX header or the payload has the wrong size.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(MISSING.format(path=path))
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header {raw[:4].hex()}).")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes), payload has {data.size}.")
    return data.reshape(dims)


def load_fmnist(root: str | os.PathLike | None = None):
    """Fashion-MNIST as float tensors: ``(x_train, y_train, x_test, y_test)``.

    Images are ``(N, 1, 28, 28)`` float32 in [0, 1], labels int64 in 0..9. ``root`` defaults to
    ``$FMNIST_DIR`` or ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).

    Raises:
        FileNotFoundError: a file is missing; the message says ``apt-get install dataset-fashion-mnist``.
        ValueError: image and label counts disagree, or a file is not IDX.
    """
    root = Path(root or os.environ.get("FMNIST_DIR", DEFAULT_DIR))
    for name in FILES.values():
        if not (root / name).exists():
            raise FileNotFoundError(MISSING.format(path=root / name))
    out = []
    for split in ("train", "test"):
        x = read_idx(root / FILES[f"{split}_images"])
        y = read_idx(root / FILES[f"{split}_labels"])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{root}: {split} images {x.shape} and labels {y.shape} do not match.")
        out += [torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1), torch.from_numpy(y.astype(np.int64))]
    return tuple(out)


def _kymatio_scattering(shape=(28, 28)):
    """kymatio's ``Scattering2D(J=2)``; patches ``scipy.special.sph_harm`` (gone in scipy 1.17)."""
    import scipy.special

    if not hasattr(scipy.special, "sph_harm"):  # only kymatio's 3-D frontend uses it
        scipy.special.sph_harm = scipy.special.sph_harm_y
    try:
        from kymatio.torch import Scattering2D
    except ImportError as err:
        raise ImportError("the ScatterNet rows need kymatio: pip install 'dp-microclip[experiments]' "
                          "(or pip install kymatio)") from err
    return Scattering2D(J=2, shape=shape)


def scatter(x: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """ScatterNet features of ``(N, 1, 28, 28)`` images: ``(N, 81, 7, 7)`` float32 (J=2, as in the paper)."""
    s = _kymatio_scattering(tuple(x.shape[-2:]))
    with torch.no_grad():
        parts = [s(x[i:i + chunk]).reshape(len(x[i:i + chunk]), -1, x.shape[-2] // 4, x.shape[-1] // 4)
                 for i in range(0, len(x), chunk)]
    return torch.cat(parts).float()


def scatter_features(x_train, x_test, cache: Path | None = CACHE):
    """ScatterNet features of the full train and test sets, cached in ``cache`` (gitignored) after the first call."""
    f = None if cache is None else Path(cache) / f"fmnist-scatter-{len(x_train)}-{len(x_test)}.pt"
    if f is not None and f.exists():
        d = torch.load(f)
        return d["train"], d["test"]
    start = time.perf_counter()
    tr, te = scatter(x_train), scatter(x_test)
    print(f"scattering: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"train": tr, "test": te}, f)
    return tr, te


# ------------------------------------------------------------------------------------------- models
def tanh_cnn() -> nn.Module:
    """The paper's end-to-end (Fashion-)MNIST CNN: 26,010 parameters, tanh, max-pool stride 1."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(512, 32), nn.Tanh(), nn.Linear(32, 10))


def scatter_linear(channels: int = 81, groups: int = 27) -> nn.Module:
    """ScatterNet + linear: GroupNorm (no affine, data-independent) on the 81x7x7 features, then 3969->10."""
    return nn.Sequential(nn.GroupNorm(groups, channels, affine=False), nn.Flatten(), nn.Linear(channels * 49, 10))


def scatter_cnn(channels: int = 81, groups: int = 27) -> nn.Module:
    """ScatterNet + CNN, the paper's ``MNIST_CNN`` (default size, as its README command runs it) on scattering
    input: 33,066 parameters."""
    return nn.Sequential(
        nn.GroupNorm(groups, channels, affine=False),
        nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(16, 32, 3, stride=1, padding=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(512, 32), nn.Tanh(), nn.Linear(32, 10))


MODELS = {"cnn": tanh_cnn, "linear": scatter_linear, "scatcnn": scatter_cnn}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on ``(x, y)``, evaluated without gradients."""
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    model.train()
    return correct / len(x)


# ------------------------------------------------------------------------------------------- one run
def train_dp(row: str, method: str, seed: int, data, epochs: int = 40, log=None, progress=None,
             **overrides) -> dict:
    """One DP-SGD run of a Table 1 ``row`` with ``method`` (``engine``, ``engine_shuffled``, ``opacus``, ``opacus_ghost``).

    ``data`` is ``(x_train, y_train, x_test, y_test)`` (pixels for ``cnn``, ScatterNet features for the
    others). ``overrides`` replace entries of the row's settings (``batch_size``, ``lr``, ...), for
    smoke runs. Seed ``seed`` fixes the initialisation and the sampling and noise generators.
    ``progress(partial_result)`` is called after every epoch (so a run stopped by a time limit
    leaves what it reached). Returns the result dict.
    """
    cfg = {**COMMON, **ROWS[row], **overrides, "epochs": epochs, "row": row, "method": method, "seed": seed}
    x_tr, y_tr, x_te, y_te = data
    n = len(x_tr)
    q = cfg["batch_size"] / n
    cfg.update(n_train=n, n_test=len(x_te), sample_rate=q, threads=torch.get_num_threads(), torch=torch.__version__)
    train_set = torch.utils.data.TensorDataset(x_tr, y_tr)
    torch.manual_seed(seed)
    model = MODELS[row]()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])
    t0 = time.perf_counter()
    loss_fn = F.cross_entropy
    if method in ("engine", "engine_shuffled"):
        import dp_microclip

        # engine_shuffled: the paper code's batches (a shuffled epoch of fixed-size batches, the last partial
        # one dropped), accounted as if Poisson at q = B/N as the paper does. That epsilon is NOT a guarantee
        # for these batches (docs/accounting.md, "Refused: shuffled epochs"); the run only measures accuracy.
        shuffled = method == "engine_shuffled"
        engine = dp_microclip.attach(
            model, opt, micro_batch_size=1, max_grad_norm=cfg["max_grad_norm"], seed=seed,
            privacy=dp_microclip.DP(noise_multiplier=cfg["noise_multiplier"], delta=cfg["delta"], sample_rate=q,
                                    **(dict(sampling="poisson", expected_batch_size=cfg["batch_size"]) if shuffled
                                       else {})))
        loss_fn = partial(engine.loss, F.cross_entropy, reduction="none")  # per-example, checked
        loader = (torch.utils.data.DataLoader(train_set, batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
                                              generator=torch.Generator().manual_seed(seed))
                  if shuffled else engine.data_loader(train_set))
        if shuffled:
            cfg["epsilon_note"] = "as if Poisson (the paper's accounting); not a guarantee for shuffled batches"
        epsilon = engine.epsilon
        net = model
    elif method in ("opacus", "opacus_ghost"):
        from opacus.accountants import PRVAccountant
        from opacus.data_loader import DPDataLoader

        dp = dict(noise_multiplier=cfg["noise_multiplier"], max_grad_norm=cfg["max_grad_norm"],
                  expected_batch_size=cfg["batch_size"], generator=torch.Generator().manual_seed(seed + 1))
        if method == "opacus":  # Opacus' default: per-example gradients from hooks
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer

            net = GradSampleModule(model)
            opt = DPOptimizer(opt, **dp)
        else:  # ghost clipping: per-example norms without per-example gradients, a second backward
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            net = GradSampleModuleFastGradientClipping(model, max_grad_norm=cfg["max_grad_norm"],
                                                       use_ghost_clipping=True)
            opt = DPOptimizerFastGradientClipping(opt, **dp)
            loss_fn = DPLossFastGradientClipping(net, opt, nn.CrossEntropyLoss())
        accountant = PRVAccountant()
        opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
        loader = DPDataLoader(train_set, sample_rate=q, generator=torch.Generator().manual_seed(seed))
        epsilon = lambda: accountant.get_epsilon(delta=cfg["delta"])  # noqa: E731
    else:
        raise ValueError(f"method {method!r}: engine, engine_shuffled, opacus or opacus_ghost")
    cfg["setup_s"] = time.perf_counter() - t0
    curve, epoch_s, steps, seen = [], [], 0, 0
    for epoch in range(epochs):
        t = time.perf_counter()
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(net(xb), yb).backward()
            opt.step()
            steps += 1
            seen += len(yb)
        epoch_s.append(time.perf_counter() - t)
        curve.append(accuracy(model, x_te, y_te))
        if log:
            log(f"{row} {method} seed {seed} epoch {epoch + 1}/{epochs}: test {curve[-1]:.4f} "
                f"({epoch_s[-1]:.1f} s train)")
        if progress:
            progress(dict(cfg, epochs_done=epoch + 1, accuracy=curve[-1], best_accuracy=max(curve), curve=list(curve),
                          epsilon=float(epsilon()), steps=steps, train_s=sum(epoch_s), epoch_s=list(epoch_s),
                          wall_s=time.perf_counter() - t0))
    cfg.update(
        epochs_done=epochs, accuracy=curve[-1], best_accuracy=max(curve), best_epoch=int(np.argmax(curve)) + 1, curve=curve,
        epsilon=float(epsilon()), steps=steps, examples=seen, train_s=sum(epoch_s), epoch_s=epoch_s,
        wall_s=time.perf_counter() - t0)
    if method in ("engine", "engine_shuffled"):
        cfg["epsilon_rdp"] = float(engine.epsilon(accountant="rdp"))
        engine.detach()
    return cfg


def run_path(row: str, method: str, seed: int, epochs: int, out: Path = RUNS) -> Path:
    """Where one run's JSON lives (its presence means the run is done)."""
    return Path(out) / f"table1-{row}-{method}-e{epochs}-s{seed}.json"


def partial_path(path: Path) -> Path:
    """Where a run's progress is written after every epoch until it finishes (``*.partial.json``)."""
    return Path(path).with_suffix(".partial.json")


def row_data(row: str, cache: Path | None = CACHE, root=None):
    """``(x_train, y_train, x_test, y_test)`` for a row: pixels for ``cnn``, cached ScatterNet features otherwise."""
    x_tr, y_tr, x_te, y_te = load_fmnist(root)
    if ROWS[row]["scatter"]:
        x_tr, x_te = scatter_features(x_tr, x_te, cache)
    return x_tr, y_tr, x_te, y_te


# ------------------------------------------------------------------------------------------- report
def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of ``values`` (needs at least 2)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - h, m + h


def report(out: Path = RUNS, dest: Path = RESULTS) -> str:
    """Summarise every finished run under ``out`` into ``dest/fmnist-table1.{md,json}``; return the markdown."""
    runs = [json.loads(p.read_text()) for p in sorted(Path(out).glob("table1-*.json"))]
    groups: dict = {}
    for r in runs:
        done = r.get("epochs_done", r["epochs"])
        # a run stopped early (time limit) is its own group, labelled "k of E": never mixed with finished runs
        key = r["epochs"] if done == r["epochs"] else f"{done} of {r['epochs']} (stopped)"
        groups.setdefault((r["row"], r["method"], key), []).append(r)
    lines = ["| row | paper | method | epochs | seeds | final test acc. (%) | per seed | best epoch's acc. (%) "
             "| epsilon (PRV) | train s per epoch | wall s per run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    blob = []
    order = {k: i for i, k in enumerate(ROWS)}
    for (row, method, epochs), rs in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], str(kv[0][2]))):
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = [100 * r["accuracy"] for r in rs]
        best = [100 * r["best_accuracy"] for r in rs]
        m, lo, hi = t_interval(acc)
        interval = f"{m:.2f} [{lo:.2f}, {hi:.2f}]" if len(acc) > 1 else f"{m:.2f}"
        eps = sorted({round(r["epsilon"], 3) for r in rs})
        wall = [r["wall_s"] for r in rs]
        per_epoch = [r["train_s"] / r.get("epochs_done", r["epochs"]) for r in rs]
        lines.append(f"| {ROWS[row]['title']} | {ROWS[row]['paper']} | {method} | {epochs} | "
                     f"{','.join(str(r['seed']) for r in rs)} | {interval} | {', '.join(f'{a:.2f}' for a in acc)} | "
                     f"{np.mean(best):.2f} | {', '.join(map(str, eps))} | {np.mean(per_epoch):.1f} | {np.mean(wall):.0f} |")
        blob.append(dict(row=row, method=method, epochs=epochs, seeds=[r["seed"] for r in rs], accuracy=acc,
                         mean=m, t95=[lo, hi], best_epoch_accuracy=best, epsilon=eps, wall_s=wall, train_s_per_epoch=per_epoch,
                         paper=ROWS[row]["paper"]))
    text = ("Fashion-MNIST, Tramer & Boneh (2021) Table 1 at (epsilon=3, delta=1e-5). Regenerate: "
            "`python -m experiments.fmnist table1 ...` then `python -m experiments.fmnist report`. "
            "Final = test accuracy after the last epoch (reported); best epoch = the max over epochs "
            "(test-selected, shown only to compare with a number picked that way). Interval: 95% Student t "
            "over seeds (only where more than one seed ran). Wall time: one thread on a shared 2-core CPU.\n\n"
            + "\n".join(lines) + "\n")
    Path(dest).mkdir(parents=True, exist_ok=True)
    (Path(dest) / "fmnist-table1.md").write_text("# Fashion-MNIST Table 1\n\n" + text)
    (Path(dest) / "fmnist-table1.json").write_text(json.dumps(blob, indent=1))
    return text


# ------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> None:
    """Command line: ``table1``, ``report``, ``claim``, ``dpcurve``, ``features``, ``smoke`` (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1)")
    p.add_argument("--data", default=None, help="folder of the IDX .gz files (default $FMNIST_DIR or Debian's)")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table1", help="the Table 1 runs (resumable: finished runs are skipped)")
    t.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    t.add_argument("--methods", nargs="+", default=["engine", "opacus"], choices=["engine", "opacus", "opacus_ghost", "engine_shuffled"],
                   help="engine_shuffled: the paper code's shuffled fixed-size batches (accuracy only: its "
                        "epsilon is the paper's as-if-Poisson number, not a guarantee)")
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--out", default=str(RUNS))
    sub.add_parser("report", help="summarise results/fmnist/*.json")
    sub.add_parser("features", help="compute and cache the ScatterNet features")
    c = sub.add_parser("claim", help="Part 2: noise-free clipping vs tuned plain SGD with flipped labels")
    c.add_argument("--train", type=int, default=5000, help="training subset drawn per seed from the 60,000")
    c.add_argument("--val", type=int, default=1000, help="validation split drawn per seed (as noisy as training)")
    c.add_argument("--epochs", type=int, default=6)
    c.add_argument("--seeds", type=int, default=10, help="paired reporting seeds 0..n-1")
    c.add_argument("--tune-seeds", type=int, default=2, help="tuning seeds 1000, 1001, ... (never reported)")
    c.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.2, 0.4])
    c.add_argument("--b", nargs="+", type=int, default=list(CLAIM_B))
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="the learning-rate schedule of every method (summaries of cosine go to fmnist-claim-cosine*)")
    c.add_argument("--methods", nargs="+", choices=["plain", "fixed", "adaptive"], default=None,
                   help="train only these methods' runs into the stores (to share the work between processes); "
                        "the summary needs a call without it")
    c.add_argument("--out", default=str(RESULTS))
    d = sub.add_parser("dpcurve", help="DP utility against b at epsilon 3 (all 60,000 training images)")
    d.add_argument("--seeds", type=int, default=5)
    d.add_argument("--b", nargs="+", type=int, default=[1, 4, 16, 64])
    d.add_argument("--epochs", type=int, default=10)
    d.add_argument("--batch-size", type=int, default=2048)
    d.add_argument("--lr", type=float, default=4.0)
    d.add_argument("--out", default=str(RESULTS))
    sub.add_parser("smoke", help="every code path on a few hundred images (seconds)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.cmd == "features":
        x_tr, _, x_te, _ = load_fmnist(args.data)
        tr, te = scatter_features(x_tr, x_te)
        print(f"features: train {tuple(tr.shape)}, test {tuple(te.shape)} in {CACHE}")
    elif args.cmd == "table1":
        for row in args.rows:
            data = None
            for seed in args.seeds:
                for method in args.methods:
                    path = run_path(row, method, seed, args.epochs, args.out)
                    if path.exists():
                        log(f"done already: {path.name}")
                        continue
                    data = data or row_data(row, root=args.data)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    partial = partial_path(path)
                    res = train_dp(row, method, seed, data, epochs=args.epochs, log=log,
                                   progress=lambda r, f=partial: f.write_text(json.dumps(r, indent=1)))
                    path.write_text(json.dumps(res, indent=1))
                    partial.unlink(missing_ok=True)
                    log(f"== {path.name}: acc {res['accuracy']:.4f} (best {res['best_accuracy']:.4f}), "
                        f"eps {res['epsilon']:.3f}, {res['wall_s']:.0f} s")
        out = Path(args.out)
        print(report(out, RESULTS if out.resolve() == RUNS.resolve() else out))
    elif args.cmd == "report":
        print(report())
    elif args.cmd in ("claim", "dpcurve"):
        x_tr, y_tr, x_te, y_te = load_fmnist(args.data)
        f_tr, f_te = normalized_cache(lambda: scatter_features(x_tr, x_te), len(x_tr), len(x_te), CACHE)
        del x_tr, x_te
        run = run_claim if args.cmd == "claim" else run_dpcurve
        print(run(f_tr, y_tr, (f_te, y_te), args, Path(args.out)))
    elif args.cmd == "smoke":
        x_tr, y_tr, x_te, y_te = load_fmnist(args.data)
        small = (x_tr[:512], y_tr[:512], x_te[:256], y_te[:256])
        for method in ("engine", "opacus"):
            r = train_dp("cnn", method, 0, small, epochs=1, batch_size=128)
            print(f"cnn {method}: acc {r['accuracy']:.3f} eps {r['epsilon']:.2f} {r['wall_s']:.1f} s")


def cli(argv=None) -> None:
    """``main`` with a missing data set reported as one line (exit status 2), not a traceback."""
    try:
        main(argv)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
