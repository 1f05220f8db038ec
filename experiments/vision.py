"""Vision: scikit-learn digits (real 8x8 handwriting), clean and with a known fraction of flipped labels.

    python -m experiments.vision [--seeds 10] [--tune-seeds 2] [--noise 0 0.2 0.4] [--quick]

For each label-noise rate: plain SGD against fixed and adaptive micro-batch
clipping at b in {1, 4, 16, 64} (64 = the whole batch), each (method, b) with
its own learning rate (and C) tuned on a validation split as noisy as the
training data (plain on 12 learning rates, as many as fixed's 6 x 2 (lr, C)),
on tuning seeds 1000, 1001, ...; then scored on clean test labels over the
paired reporting seeds 0..n-1, each drawing its own split and label noise.
Paired t intervals, p-values and Holm over every comparison of the run; the
method and b are chosen on validation. Seed 0's flipped examples are recorded
(``vision.json``) as known draggers, and a
:class:`~dp_microclip.tools.diagnostics.DraggerProbe` run shows whether clipping
gives their micro-batches less weight.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import dp_microclip
from dp_microclip.tools.diagnostics import ClipMonitor, DraggerProbe
from dp_microclip.tools.sweep import SweepSettings, digits_mlp, digits_splits

from .common import noise_table, run_sweep, setup, write_summary


def probe_run(train, flipped, lr: float, C: float, b: int, out, epochs: int = 20, seed: int = 0) -> dict:
    """Train fixed clipping once with a ClipMonitor and a DraggerProbe on 64 held training examples."""
    x, y = train
    torch.manual_seed(seed)
    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=C)
    monitor = ClipMonitor(every=5)
    probe = DraggerProbe(x[:64], y[:64], F.cross_entropy, every=50, flags=flipped[:64])
    engine.add_observer(monitor)
    engine.add_observer(probe)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 63, 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    engine.detach()
    monitor.to_csv(out / "vision-probe-monitor.csv")
    probe.to_csv(out / "vision-probe-examples.csv")
    summary = probe.summary()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    steps = [s["step"] for s in summary]
    for ax, key, label in zip(axes, ("weight", "cosine_to_mean", "grad_norm"),
                              ("micro-batch weight", "cosine to batch mean", "per-example grad norm")):
        ax.plot(steps, [s[f"flagged_{key}"] for s in summary], "r-o", ms=3, label="flipped label")
        ax.plot(steps, [s[f"other_{key}"] for s in summary], "b-o", ms=3, label="clean label")
        ax.set_xlabel("step")
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Dragger probe: fixed clipping b={b}, C={C}, lr={lr}, 64 held training examples")
    fig.tight_layout()
    fig.savefig(out / "vision-probe.png", dpi=110)
    plt.close(fig)
    mon = monitor.records
    return {"summary": summary, "monitor_first": mon[0], "monitor_last": mon[-1],
            "clipped_fraction_mean": sum(r["clipped_fraction"] for r in mon) / len(mon),
            "cosine_mean": sum(r["cosine"] for r in mon) / len(mon)}


def summary_table(results: dict) -> tuple[str, int]:
    """The docs' table: plain's test accuracy and every clipping cell's paired difference (points), t interval and
    p Holm-adjusted over every comparison of this run (all noise levels), and the cell chosen on validation."""
    cells = [(m, b) for m in ("fixed", "adaptive") for b in (1, 4, 16, 64)]
    text, comparisons, _ = noise_table(results, cells, "seeds", "cell")
    return text, comparisons


def main(argv=None) -> None:
    args = setup(__doc__.split("\n\n")[0], argv, lambda p: (
        p.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.2, 0.4]),
        p.add_argument("--epochs", type=int, default=20)))
    from pathlib import Path

    out = Path(args.out)
    start = time.perf_counter()
    text, blob = [], {"noise": {}}
    epochs = 8 if args.quick else args.epochs
    results = {}
    for noise in args.noise:
        train, val, test, flipped = digits_splits(label_noise=noise, seed=0)
        settings = SweepSettings(
            methods=("plain", "fixed", "adaptive"), micro_batch_sizes=(1, 4, 16, 64), seeds=tuple(range(args.seeds)),
            learning_rates=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), tune_seeds=args.tune_seeds,
            max_grad_norms=(0.3, 1.0), batch_size=64, epochs=epochs, name=f"vision-digits-noise{noise:g}-split-per-seed")
        result, seconds = run_sweep(digits_mlp, lambda seed, noise=noise: digits_splits(noise, seed)[:3], None, None,
                                    settings, out, f"vision-noise{noise:g}", progress=not args.no_progress)
        results[noise] = result
        text.append(f"## Label noise {noise:.0%} (seed 0: {int(flipped.sum())} of {len(flipped)} training labels "
                    f"flipped; {seconds:.0f} s)\n\n{result.to_markdown()}\n\n![](vision-noise{noise:g}-vs-b.png)\n")
        blob["noise"][str(noise)] = {"table": result.table(), "seconds": seconds, "best": result.best(),
                                     "flipped_train_indices_seed0": flipped.nonzero().flatten().tolist()}
        if noise == 0.2:
            sel = result.selected[("fixed", 4)]
            probe = probe_run(train, flipped, sel["lr"], sel["max_grad_norm"], 4, out, epochs)
            blob["probe"] = probe
            first, last = probe["summary"][0], probe["summary"][-1]
            text.append(
                f"## Dragger probe (noise 20%, fixed b=4, C={sel['max_grad_norm']}, lr={sel['lr']})\n\n"
                f"Mean micro-batch weight of flipped vs clean examples: step {first['step']}: "
                f"{first['flagged_weight']:.3f} vs {first['other_weight']:.3f}; step {last['step']}: "
                f"{last['flagged_weight']:.3f} vs {last['other_weight']:.3f}. Mean cosine to the batch mean: "
                f"{last['flagged_cosine_to_mean']:+.3f} vs {last['other_cosine_to_mean']:+.3f}. Over training, "
                f"{probe['clipped_fraction_mean']:.0%} of micro-batches were clipped; clipped/unclipped cosine "
                f"{probe['cosine_mean']:.3f}.\n\n![](vision-probe.png)\n")
    total = time.perf_counter() - start
    summary, blob["comparisons"] = summary_table(results)
    text.insert(0, summary)
    text.insert(0, f"scikit-learn digits, MLP 64-128-10, SGD momentum 0.9, batch 64, {epochs} epochs, "
                   f"{args.seeds} paired reporting seeds (each its own split and label noise), "
                   f"{args.tune_seeds} tuning seeds, one CPU thread; this invocation took {total:.0f} s (runs already in the store are read back, not retrained).\n")
    blob["seconds"] = total
    write_summary(out, "vision", "Vision: digits with label noise", "\n".join(text), blob)
    print("\n".join(text))


if __name__ == "__main__":
    main()
