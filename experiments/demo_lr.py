"""Learning rates for a fair digits demo: tuned per method on a validation split, then checked on test.

    python -m experiments.demo_lr [--seeds 4] [--test-seeds 5] [--epochs 30]

The demo (``python -m tutorials.demo_digits``) and tutorial 01 compare plain SGD
with fixed clipping (b=8, C=1). They once did so at one shared learning rate,
which measures the learning rate rather than the method. Here each of the two
gets its own learning rate (the demo's and tutorial 01's defaults since),
chosen on a validation split carved out of the demo's (noisy) training set,
with the demo's exact model, optimizer, batch size, epochs and noise. The
chosen rates are then run through the demo's own ``train`` function on the
demo's test split, for several seeds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dp_microclip.tools.sweep import SweepSettings
from dp_microclip.tools.sweep_report import paired_t
from tutorials.data import digits
from tutorials.demo_digits import small_cnn, train

from .common import RESULTS, run_sweep, write_summary

LRS = (0.003, 0.01, 0.02, 0.05, 0.1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=4, help="seeds averaged on validation per learning rate")
    p.add_argument("--test-seeds", type=int, default=5, help="demo seeds run on test with the chosen rates")
    p.add_argument("--epochs", type=int, default=30, help="the demo's epochs (default %(default)s)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    start = time.perf_counter()
    full, _test, _ = digits(label_noise=0.2, seed=0)  # the demo's training set, labels already flipped
    x, y = full.tensors
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    n_val = len(x) // 5
    val, tr = perm[:n_val], perm[n_val:]
    # This sweep only chooses: its tuning seeds 0..n-1 pick the rates; its one "reporting" seed (n) is unused.
    settings = SweepSettings(methods=("plain", "fixed"), micro_batch_sizes=(8,), seeds=(args.seeds,),
                             tune_seeds=tuple(range(args.seeds)), learning_rates=LRS, max_grad_norms=(1.0,),
                             batch_size=64, epochs=args.epochs, name="demo-digits-cnn-noise0.2")
    # The sweep's test split here is the validation split again: this sweep only chooses; the demo's test split is
    # used below, once per chosen rate.
    result, seconds = run_sweep(small_cnn, (x[tr], y[tr]), (x[val], y[val]), (x[val], y[val]), settings, out,
                                "demo-lr", progress=not args.no_progress, plots=False)
    md = out / "demo-lr.md"  # its "test" column is the validation split again: say so in the file
    md.write_text(md.read_text().replace(
        "\n\n|", "\n\nThe \"test\" column below is the validation split (this sweep only chooses the rates; the "
        "demo's test split is in demo-lr-summary.md).\n\n|", 1))
    lr_plain = result.selected[("plain", None)]["lr"]
    lr_clip = result.selected[("fixed", 8)]["lr"]
    curve = {m: {lr: float(np.mean([r["val"] for r in result.tuning if r["method"] == m and r["lr"] == lr]))
                 for lr in LRS} for m in ("plain", "fixed")}
    tests = {"plain": [], "fixed": []}
    for seed in range(args.test_seeds):
        for method, lr in (("plain", lr_plain), ("fixed", lr_clip)):
            demo_args = argparse.Namespace(micro_batch_size=8, max_grad_norm=1.0, clipping="fixed", batch_size=64,
                                           epochs=args.epochs, lr_plain=lr_plain, lr_clip=lr_clip, label_noise=0.2,
                                           seed=seed)
            tests[method].append(train(demo_args, clip=method == "fixed", progress=lambda it, desc="": it))
    diffs = np.array(tests["fixed"]) - np.array(tests["plain"])
    t = paired_t(diffs)
    total = time.perf_counter() - start
    rows = "\n".join(f"| {lr:g} | {curve['plain'][lr]:.4f} | {curve['fixed'][lr]:.4f} |" for lr in LRS)
    text = (
        f"Demo setting: small CNN, SGD momentum 0.9, batch 64, {args.epochs} epochs, 20% of labels flipped. Validation: "
        f"{n_val} of the demo's 1437 (noisy) training examples; {args.seeds} seeds per rate. Total {total:.0f} s.\n\n"
        f"| lr | plain: val accuracy | fixed b=8, C=1: val accuracy |\n|---|---|---|\n{rows}\n\n"
        f"Chosen: plain lr = {lr_plain:g}, clipping (b=8, C=1) lr = {lr_clip:g}.\n\n"
        f"Demo test accuracy with these rates (demo's own train(), seeds 0..{args.test_seeds - 1}): plain "
        f"{np.mean(tests['plain']):.4f} ({', '.join(f'{v:.4f}' for v in tests['plain'])}); clipping "
        f"{np.mean(tests['fixed']):.4f} ({', '.join(f'{v:.4f}' for v in tests['fixed'])}); paired difference "
        f"{diffs.mean():+.4f} (per seed {', '.join(f'{d:+.4f}' for d in diffs)}; 95% paired t interval "
        f"[{t['low']:+.4f}, {t['high']:+.4f}], p = {t['p']:.2g}; one demo split, so the test sample's own error is "
        "not in it).\n")
    write_summary(out, "demo-lr-summary", "Learning rates for the digits demo", text,
                  {"lr_plain": lr_plain, "lr_clip": lr_clip, "val_by_lr": curve, "test": tests, "seconds": total})
    print(text)


if __name__ == "__main__":
    main()
