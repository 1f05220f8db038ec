"""DP utility against the micro-batch size b at a fixed epsilon (digits, epsilon 8, delta 1e-5).

    python -m experiments.dp_b [--seeds 10]

For b > 1 one example can move one micro-batch's clipped gradient from one
vector of norm C to another, so the sensitivity doubles and, with about B/b
clipped terms, the signal-to-noise ratio at a fixed epsilon falls about 2b-fold
(README). This measures what that costs in accuracy: the same model, expected
batch 256, 30 epochs, noise calibrated by the engine to epsilon 8 for each b,
over paired seeds; each seed draws its own train/test split, initialisation,
sampling and noise. The learning rate is fixed (1.0, the DP tutorial's), not
tuned: tuning on private data has a privacy cost of its own. Differences to
b=1 are paired over seeds: mean, 95% Student t interval, p-value and Holm's
adjustment over the comparisons made.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import dp_microclip
from dp_microclip.tools.sweep import accuracy, digits_mlp, digits_splits
from dp_microclip.tools.sweep_report import holm, paired_t

from .common import RESULTS, write_summary


def run(b: int, seed: int, train, test, epochs: int = 30, lr: float = 1.0) -> tuple[float, float, float]:
    """Train one DP run; return (test accuracy, noise multiplier, epsilon)."""
    torch.manual_seed(seed)
    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5)
    n = len(train[0])
    engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=1.0, seed=seed,
                                 privacy=dp_microclip.DP(target_epsilon=8.0, delta=1e-5, sample_rate=256 / n,
                                                         epochs=epochs))
    loader = engine.data_loader(TensorDataset(*train))
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            engine.loss(F.cross_entropy, model(x), y, reduction="none").backward()
            opt.step()
    eps = engine.epsilon()
    z = engine.noise_multiplier
    engine.detach()
    return accuracy(model, *test), z, eps


def plot(results: dict, path: Path) -> None:
    """Test accuracy against b (mean +- std over seeds) at epsilon 8."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {int(b): rows for b, rows in results.items()}  # keys are str when read back from the json
    bs = sorted(results)
    acc = [np.array([r[0] for r in results[b]]) for b in bs]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(bs, [a.mean() for a in acc], yerr=[a.std(ddof=1) if len(a) > 1 else 0 for a in acc], marker="o",
                capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs)
    ax.set_xticklabels([str(b) for b in bs])
    ax.set_xlabel("micro-batch size b")
    ax.set_ylabel("test accuracy")
    ax.set_title("DP-SGD on digits at epsilon 8: utility against b")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--bs", nargs="+", type=int, default=[1, 2, 4, 8])
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {b: [] for b in args.bs}
    for seed in range(args.seeds):
        train, val, test, _ = digits_splits(0.0, seed=seed)
        train = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))  # no tuning here: use all of it
        for b in args.bs:
            results[b].append(run(b, seed, train, test))
    base = [a for a, _, _ in results[1]] if 1 in results else None
    lines = ["| b | noise multiplier z | epsilon | test accuracy (mean +- std) | vs b=1, points (paired, 95% t) "
             "| p | p Holm |", "|---|---|---|---|---|---|---|"]
    tests = {b: paired_t(100 * (np.array([a for a, _, _ in rows]) - np.array(base)))
             for b, rows in results.items() if base is not None and b != 1}
    adjusted = dict(zip(tests, holm([t["p"] for t in tests.values()])))
    for b, rows in results.items():
        acc = np.array([a for a, _, _ in rows])
        diff = " | | "
        if b in tests:
            t = tests[b]
            diff = f"{t['mean']:+.2f} [{t['low']:+.2f}, {t['high']:+.2f}] | {t['p']:.2g} | {adjusted[b]:.2g}"
        lines.append(f"| {b} | {rows[0][1]:.3f} | {rows[0][2]:.2f} | {acc.mean():.4f} +- {acc.std(ddof=1):.4f} "
                     f"| {diff} |")
    total = time.perf_counter() - start
    text = (f"digits MLP 64-128-10, 1437 training images, expected batch 256 (q = {256 / len(train[0]):.3f}), "
            f"30 epochs, C = 1, lr 1.0 (momentum 0.5), target epsilon 8 at delta 1e-5 (PRV accountant), "
            f"{args.seeds} paired seeds, each with its own split; {len(tests)} comparisons with b=1; one CPU thread; "
            f"total {total:.0f} s.\n\n" + "\n".join(lines) + "\n")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    plot(results, Path(args.out) / "dp-b.png")
    text += "\n![](dp-b.png)\n"
    write_summary(Path(args.out), "dp-b", "DP utility against b at epsilon 8", text,
                  {"results": {str(b): rows for b, rows in results.items()}, "seconds": total})
    print(text)


if __name__ == "__main__":
    main()
