"""Fashion-MNIST, issue 27 Part 2: noise-free micro-batch clipping against tuned plain SGD, and DP utility against b.

    python -m experiments.fmnist claim [--noise 0 0.2 0.4] [--seeds 10] [--tune-seeds 2]
                                       [--train 5000] [--val 1000] [--epochs 6] [--lr-schedule cosine]
    python -m experiments.fmnist dpcurve [--seeds 3] [--b 1 4 16 64] [--epochs 10]

Model: the paper's ScatterNet + linear (kymatio ``Scattering2D(J=2)`` features, GroupNorm with
27 groups and no affine, linear 3969->10). The GroupNorm has no parameters and normalises each
example on its own, so it is applied once to the cached features (:func:`normalized_features`)
and the trained model is the linear layer alone: the same function, far cheaper per run.

``claim``: for every label-noise rate, plain SGD against fixed and adaptive clipping at
b in {1, 4, 16, 64} with batch B = 64 (so b = 64 is whole-batch clipping; as for digits), each (method, b) with its own learning rate (and C for fixed)
tuned on a validation split as noisy as the training data, on tuning seeds 1000, 1001, ...
that are never reported; plain on a grid as fine as fixed's (lr x C). Every seed (tuning and
reporting) draws its own training subset and validation split from the 60,000 training images,
and its own flipped labels (:func:`claim_splits`); the test set is the official 10,000 test
images with clean labels, the same for every seed. Paired t intervals, p and Holm-adjusted p over
every comparison of the invocation (all noise levels), and the cell chosen on validation
(:meth:`SweepResult.best`), as for digits (``experiments.vision``).

``dpcurve``: DP-SGD with the same model on all 60,000 training images at epsilon 3, delta 1e-5
(noise calibrated by the engine for each b, PRV), expected batch 2048, C = 0.1, lr 4 with
momentum 0.9 (not tuned per b: tuning on private data costs privacy of its own), over paired seeds;
paired t interval of each b against b = 1.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import noise_table

RESULTS = Path(__file__).resolve().parent / "results"
#: The micro-batch sizes of the claim (64 = the batch: whole-batch clipping; adaptive there is plain SGD).
CLAIM_B = (1, 4, 16, 64)
#: Learning-rate grids and fixed clipping's bounds (the per-example gradient norms of this model are about 1-30).
#: Plain's grid is refined by the sweep to as many rates as fixed's 4 x 2 (lr, C) pairs, over its own range.
#: Per-example gradients of this model have norms of about 40 at the start (the features have unit variance per
#: entry over 3969 entries), so plain SGD needs rates near 1e-3; C = 1 makes fixed clipping normalised SGD, C = 10
#: leaves the smaller gradients of late training unclipped.
CLAIM_LRS = {"plain": (0.0003, 0.01), "fixed": (0.003, 0.01, 0.03, 0.1),
             "adaptive": (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)}
CLAIM_C = (1.0, 10.0)


def normalized_features(features: torch.Tensor, groups: int = 27, chunk: int = 5000) -> torch.Tensor:
    """``(N, 81, 7, 7)`` ScatterNet features through GroupNorm(groups, affine=False), flattened to ``(N, 3969)``.

    Why precompute: the GroupNorm has no parameters and each example is normalised on its own,
    so ``linear(groupnorm(x))`` trains exactly like the paper's ScatterNet + linear model.
    """
    c = features.shape[1]
    norm = nn.GroupNorm(groups, c, affine=False)
    with torch.no_grad():
        return torch.cat([norm(features[i:i + chunk]).flatten(1) for i in range(0, len(features), chunk)])


def normalized_cache(features, n_train: int, n_test: int, cache: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`normalized_features` of train and test, saved once under ``cache`` and memory-mapped after that.

    ``features()`` returns the ``(train, test)`` ScatterNet features; it is called only when the cache
    is missing. Why a cache: the flattened features are 1.1 GB; memory-mapped, several runs at once share one copy.
    """
    f = None if cache is None else Path(cache) / f"fmnist-scatter-norm-{n_train}-{n_test}.pt"
    if f is not None and f.exists():
        d = torch.load(f, mmap=True)
        return d["train"], d["test"]
    f_tr, f_te = features()
    tr, te = normalized_features(f_tr), normalized_features(f_te)
    del f_tr, f_te
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"train": tr, "test": te}, f)
    return tr, te


def flat_linear(dim: int = 81 * 49, classes: int = 10) -> nn.Module:
    """The trained part of ScatterNet + linear on :func:`normalized_features`: one linear layer."""
    return nn.Linear(dim, classes)


def flip(y: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    """Each label flipped with probability ``fraction`` to one of the 9 other classes, uniformly."""
    y = y.clone()
    mask = torch.rand(len(y), generator=g) < fraction
    y[mask] = (y[mask] + torch.randint(1, 10, (int(mask.sum()),), generator=g)) % 10
    return y


def claim_splits(x: torch.Tensor, y: torch.Tensor, test, noise: float, seed: int, n_train: int, n_val: int):
    """Seed ``seed``'s data: a training subset and a validation split drawn from ``(x, y)``, both with flipped labels.

    The draw depends only on the seed and the noise rate, so every method at one seed sees the
    same data (paired), and every seed its own (the seed-to-seed spread includes the split and
    the label noise). Test labels stay clean. Returns ``(train, val, test)`` as ``(x, y)`` pairs.
    """
    if n_train + n_val > len(x):
        raise ValueError(f"train {n_train} + val {n_val} > {len(x)} examples available")
    g = torch.Generator().manual_seed(10_007 * seed + 17)
    perm = torch.randperm(len(x), generator=g)
    tr, va = perm[:n_train], perm[n_train:n_train + n_val]
    return (x[tr], flip(y[tr], noise, g)), (x[va], flip(y[va], noise, g)), test


def claim_settings(noise: float, seeds: int, tune_seeds: int, epochs: int, n_train: int, batch_size: int = 64,
                   bs=CLAIM_B, lr_schedule: str = "constant"):
    """The :class:`SweepSettings` of one noise rate (plain's grid refined to fixed's 8 (lr, C) pairs)."""
    from dp_microclip.tools.sweep import SweepSettings

    return SweepSettings(
        methods=("plain", "fixed", "adaptive"), micro_batch_sizes=tuple(bs), seeds=tuple(range(seeds)),
        tune_seeds=tune_seeds, learning_rates=CLAIM_LRS, max_grad_norms=CLAIM_C, batch_size=batch_size,
        epochs=epochs, grad_mode="bookkeeping", lr_schedule=lr_schedule,
        name=f"fmnist-scatlin-noise{noise:g}-n{n_train}-e{epochs}-split-per-seed")


def summary_table(results: dict) -> tuple[str, int, dict]:
    """Plain's accuracy and every clipping cell's paired difference, p and Holm-adjusted p over all comparisons."""
    first = next(iter(results.values()))
    cells = [c for c in first.settings.cells() if c[0] != "plain"]
    return noise_table(results, cells, "reporting seeds", "clipping cell")


def null_lines(results: dict) -> str:
    """The chosen cell against the built-in null, adaptive clipping at b = B (plain SGD at that cell's own rate).

    Extra comparisons (not in the Holm family): they show how much of the chosen cell's gain over plain survives a
    plain baseline at another learning rate of the grid.
    """
    from dp_microclip.tools.sweep_report import paired_t

    lines = []
    for noise, result in results.items():
        rows = {(r["method"], r["b"]): r for r in result.table()}
        best, bb = result.best(), result.settings.batch_size
        if best is None or ("adaptive", bb) not in rows or (best["method"], best["b"]) == ("adaptive", bb):
            continue
        null = rows[("adaptive", bb)]
        t = paired_t([100 * (a - b) for a, b in zip(rows[(best["method"], best["b"])]["test_per_seed"],
                                                     null["test_per_seed"])])
        lines.append(f"- {noise:.0%}: chosen {best['method']} b={best['b']} against the null (adaptive b={bb}, "
                     f"lr {null['lr']:g}): {t['mean']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}], p = {t['p']:.2g}")
    return ("Against the built-in null (adaptive clipping at b = B is plain SGD at its own rate; extra comparisons, "
            "not in the Holm family):\n\n" + "\n".join(lines) + "\n") if lines else ""


def run_claim(x: torch.Tensor, labels: torch.Tensor, test, args, out: Path = RESULTS) -> str:
    """Part 2 over ``args.noise``: one resumable sweep per noise rate, then the summary (md + json) in ``out``.

    ``x`` and ``test[0]`` are :func:`normalized_features`. With ``args.methods`` a part of the three
    methods, only those runs are trained into the stores (so that several processes can share the work)
    and no summary is written: a later call with all three reads every run back.
    """
    from dataclasses import replace

    from dp_microclip.tools.sweep import sweep

    from .common import run_sweep, write_summary

    out = Path(out)
    start = time.perf_counter()
    methods = tuple(getattr(args, "methods", None) or ("plain", "fixed", "adaptive"))
    results, text, blob = {}, [], {"noise": {}}
    schedule = getattr(args, "lr_schedule", "constant")
    tag = "fmnist-claim" if schedule == "constant" else f"fmnist-claim-{schedule}"  # own summaries per schedule
    for noise in args.noise:
        settings = claim_settings(noise, args.seeds, args.tune_seeds, args.epochs, args.train, args.batch_size,
                                  args.b, schedule)
        if set(methods) != {"plain", "fixed", "adaptive"}:
            # plain's grid is refined against fixed's whatever the subset: keep fixed in the settings' grid reference
            part = replace(settings, methods=methods, learning_rates={**CLAIM_LRS, "plain": settings.lrs("plain")},
                           match_plain_grid=False)
            sweep(flat_linear, lambda s, noise=noise: claim_splits(x, labels, test, noise, s, args.train, args.val),
                  None, None, part, store=out / f"{tag}-noise{noise:g}.runs.jsonl", progress=False)
            continue
        result, seconds = run_sweep(
            flat_linear, lambda s, noise=noise: claim_splits(x, labels, test, noise, s, args.train, args.val),
            None, None, settings, out, f"{tag}-noise{noise:g}", progress=False, plots=True)
        results[noise] = result
        text.append(f"## Label noise {noise:.0%} ({seconds:.0f} s)\n\n{result.to_markdown()}\n\n"
                    f"![]({tag}-noise{noise:g}-vs-b.png)\n")
        blob["noise"][str(noise)] = {"table": result.table(), "best": result.best(), "seconds": seconds}
    if not results:
        return f"trained {methods} into the stores; run without --methods for the summary"
    summary, blob["comparisons"], blob["chosen"] = summary_table(results)
    summary += "\n" + null_lines(results)
    total = time.perf_counter() - start
    s = next(iter(results.values())).settings
    head = (f"Fashion-MNIST, ScatterNet + linear (GroupNorm(27) precomputed, linear 3969->10), a training subset of "
            f"{args.train} and a validation split of {args.val} drawn from the 60,000 training images per seed "
            f"(each with its own flipped labels), the clean 10,000-image test set; SGD momentum 0.9, batch "
            f"{s.batch_size}, {s.epochs} epochs for every method; b in {list(s.micro_batch_sizes)}; "
            f"{len(s.seeds)} paired reporting seeds, {len(s.tune_seeds)} tuning seeds {list(s.tune_seeds)}; grids: "
            f"plain {list(s.lrs('plain'))}, fixed {list(s.lrs('fixed'))} x C {list(s.max_grad_norms)}, adaptive "
            f"{list(s.lrs('adaptive'))}; one CPU thread, fixed gradient route. Regenerate: "
            f"`python -m experiments.fmnist claim --seeds {len(s.seeds)} --tune-seeds {len(s.tune_seeds)} "
            f"--train {args.train} --val {args.val} --epochs {s.epochs}"
            + (f" --lr-schedule {schedule}" if schedule != "constant" else "")
            + f"` ({s.lr_schedule} learning rate; this invocation: {total:.0f} s; runs already in the stores are "
            "read back).\n")
    write_summary(out, tag, "Fashion-MNIST: noise-free clipping against tuned plain SGD",
                  head + "\n" + summary + "\n" + "\n".join(text), dict(blob, seconds=total))
    return head + "\n" + summary


# ------------------------------------------------------------------------------------------- DP curve
def dp_run(b: int, seed: int, train, test, epochs: int, batch_size: int = 2048, lr: float = 4.0,
           C: float = 0.1, epsilon: float = 3.0, delta: float = 1e-5, noise_multiplier: float | None = None) -> dict:
    """One DP-SGD run at micro-batch size ``b``, noise calibrated by the engine to ``(epsilon, delta)``.

    ``noise_multiplier``: the z an earlier run of the same b was calibrated to (calibration takes
    minutes on a loaded machine; the run's own epsilon is still read from its ledger).
    """
    import dp_microclip
    from dp_microclip.tools.sweep import accuracy

    torch.manual_seed(seed)
    model = flat_linear(train[0].shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n = len(train[0])
    start = time.perf_counter()
    engine = dp_microclip.attach(
        model, opt, micro_batch_size=b, max_grad_norm=C, seed=seed, grad_mode="bookkeeping",
        privacy=dp_microclip.DP(target_epsilon=epsilon, delta=delta, sample_rate=batch_size / n, epochs=epochs)
        if noise_multiplier is None else
        dp_microclip.DP(noise_multiplier=noise_multiplier, delta=delta, sample_rate=batch_size / n))
    loader = engine.data_loader(torch.utils.data.TensorDataset(*train))
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            engine.loss(F.cross_entropy, model(xb), yb, reduction="none").backward()
            opt.step()
    row = dict(b=b, seed=seed, accuracy=accuracy(model, *test), noise_multiplier=float(engine.noise_multiplier),
               epsilon=float(engine.epsilon()), epochs=epochs, batch_size=batch_size, lr=lr, C=C,
               seconds=time.perf_counter() - start)
    engine.detach()
    return row


def run_dpcurve(x, labels, test, args, out: Path = RESULTS) -> str:
    """DP utility against b at epsilon 3 (resumable: runs in ``fmnist-dpcurve.runs.jsonl`` are read back)."""
    import json

    from dp_microclip.tools.sweep_report import paired_t

    from .common import write_summary

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "fmnist-dpcurve.runs.jsonl"
    done = {}
    if store.exists():
        for line in store.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["b"], r["seed"], r["epochs"], r["batch_size"], r["lr"])] = r
    train = (x, labels)
    rows: dict[int, list] = {}
    for b in args.b:
        for seed in range(args.seeds):
            key = (b, seed, args.epochs, args.batch_size, args.lr)
            if key not in done:
                z = rows[b][0]["noise_multiplier"] if rows.get(b) else None    # calibrated once per b
                done[key] = dp_run(b, seed, train, test, args.epochs, args.batch_size, args.lr, noise_multiplier=z)
                with open(store, "a") as f:
                    f.write(json.dumps(done[key]) + "\n")
            rows.setdefault(b, []).append(done[key])
    base = [r["accuracy"] for r in rows[args.b[0]]]
    lines = [f"| b | z | epsilon | test accuracy (%), mean ± std | vs b={args.b[0]} (points, paired t) |",
             "|---|---|---|---|---|"]
    blob = {}
    for b, rs in rows.items():
        acc = np.array([r["accuracy"] for r in rs])
        d = paired_t(100 * (acc - np.array(base))) if b != args.b[0] else None
        diff = "" if d is None else f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] p={d['p']:.2g}"
        lines.append(f"| {b} | {rs[0]['noise_multiplier']:.2f} | {rs[0]['epsilon']:.2f} | "
                     f"{100 * acc.mean():.2f} ± {100 * acc.std(ddof=1) if len(acc) > 1 else 0:.2f} | {diff} |")
        blob[str(b)] = dict(runs=rs, diff_vs_first=d)
    text = (f"DP-SGD, ScatterNet + linear on all {len(labels)} Fashion-MNIST training images, expected batch "
            f"{args.batch_size}, {args.epochs} epochs, C = 0.1, lr {args.lr} (momentum 0.9, not tuned per b), noise "
            f"calibrated by the engine to epsilon 3 at delta 1e-5 (PRV) for each b; {args.seeds} paired seeds. "
            f"Regenerate: `python -m experiments.fmnist dpcurve --seeds {args.seeds} --epochs {args.epochs} "
            f"--b {' '.join(map(str, args.b))}`.\n\n" + "\n".join(lines) + "\n")
    write_summary(out, "fmnist-dpcurve", "Fashion-MNIST: DP utility against b at epsilon 3", text, blob)
    return text
