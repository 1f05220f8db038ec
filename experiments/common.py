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
