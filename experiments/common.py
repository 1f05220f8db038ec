"""Shared plumbing of the experiments: one thread, timing, where results go, the sweep call."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dp_microclip.tools.sweep import SweepSettings, sweep
from dp_microclip.tools.sweep_report import SweepResult

RESULTS = Path(__file__).resolve().parent / "results"


def setup(description: str, argv=None, extra=None) -> argparse.Namespace:
    """Parse the common options (``--seeds``, ``--epochs``, ``--quick``, ``--no-progress``) and use one thread.

    Why one thread: the development machine has 2 cores shared by several people; runs are tiny,
    so a second thread buys little and slows everyone else.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, default=10, help="paired reporting seeds 0..n-1 per (method, b)")
    p.add_argument("--tune-seeds", type=int, default=2,
                   help="tuning seeds (1000, 1001, ...), apart from the reporting seeds")
    p.add_argument("--quick", action="store_true", help="2 seeds and fewer epochs: a smoke run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=str(RESULTS))
    if extra:
        extra(p)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.seeds, args.tune_seeds = 2, 1
    return args


def run_sweep(make_model, train, val, test, settings: SweepSettings, out: Path, prefix: str,
              progress: bool = True, plots: bool = True, **kwargs) -> tuple[SweepResult, float]:
    """Run (or resume) one sweep with its own run store; save md/json/png; return the result and seconds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = sweep(make_model, train, val, test, settings, store=out / f"{prefix}.runs.jsonl",
                   progress=progress, **kwargs)
    seconds = time.perf_counter() - start
    result.save(out, prefix, plots=plots)
    return result, seconds


def write_summary(out: Path, prefix: str, title: str, text: str, blob: dict) -> None:
    """``{prefix}.md`` (human) and ``{prefix}.json`` (machine) summaries of a whole experiment."""
    out = Path(out)
    (out / f"{prefix}.md").write_text(f"# {title}\n\n{text}\n")
    (out / f"{prefix}.json").write_text(json.dumps(blob, indent=1, default=str))


def noise_table(results: dict, cells: list, seeds: str, cell: str) -> tuple[str, int, dict]:
    """The claim table over label-noise rates: plain's test accuracy and every clipping cell's paired difference
    (points), t interval and p Holm-adjusted over every comparison of the run, and the cell chosen on validation.

    ``results`` maps a noise rate to its ``SweepResult``; ``seeds`` and ``cell`` word the header ("reporting
    seeds", "clipping cell"). Returns the markdown, the number of comparisons and, per noise rate, the chosen
    cell's row with its Holm-adjusted p.
    """
    from dp_microclip.tools.sweep_report import holm

    rows = {noise: {(r["method"], r["b"]): r for r in result.table()} for noise, result in results.items()}
    family = [(noise, c) for noise in results for c in cells if c in rows[noise]]
    adjusted = dict(zip(family, holm([rows[n][c]["p_value"] for n, c in family])))
    n_seeds = len(next(iter(results.values())).settings.seeds) if results else 0
    lines = [f"Difference to plain in points, paired over {n_seeds} {seeds}, 95% t interval, p (two-sided) and, "
             f"after `H`, p Holm-adjusted over all {len(family)} comparisons below. Chosen on validation: the {cell} "
             "with the best validation accuracy on the tuning seeds.\n",
             "| label noise | plain | " + " | ".join(f"{m} b={b}" for m, b in cells) + " | chosen on validation |",
             "|---" * (len(cells) + 3) + "|"]
    chosen = {}
    for noise, result in results.items():
        plain = rows[noise][("plain", None)]
        out = [f"{noise:.0%}", f"{100 * plain['test_mean']:.2f} ± {100 * plain['test_std']:.2f}"]
        for c in cells:
            r = rows[noise].get(c)
            out.append("" if r is None else f"{100 * r['diff_vs_plain']:+.2f} [{100 * r['diff_ci_low']:+.2f}, "
                       f"{100 * r['diff_ci_high']:+.2f}] p={r['p_value']:.2g} H={adjusted[(noise, c)]:.2g}")
        best = result.best()
        chosen[noise] = dict(best, holm=adjusted.get((noise, (best["method"], best["b"]))))
        out.append(f"{best['method']} b={best['b']}: {100 * best['diff_vs_plain']:+.2f} "
                   f"[{100 * best['diff_ci_low']:+.2f}, {100 * best['diff_ci_high']:+.2f}] p={best['p_value']:.2g}")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n", len(family), chosen
