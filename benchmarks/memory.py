"""``python -m benchmarks.memory``: extra peak memory of one training step over plain PyTorch, per method.

Methods: plain PyTorch, the engine with its default memory budget, the engine with
``memory_budget="lean"``, and Opacus ghost clipping (``grad_sample_mode="ghost"``,
noise 0), all at b = 1 on the bench models (MLP B=256, CNN B=128, transformer
B=32 T=64; ``--models`` for others).

Two measurements, each method in a fresh process (the forkserver of
``benchmarks/measure.py``), after one warm-up step (the engine's first step also
checks itself against autograd and times its routes; that step is not the
steady state a training run lives in):

* **allocated**: the peak of live tensor bytes during one step, from the CPU
  allocator's own allocation and free events (``torch.profiler`` with
  ``profile_memory=True``), relative to what was live when the step began. Exact
  and deterministic: it counts every tensor the step creates, nothing else;
* **RSS**: the process's peak resident set size over two steps minus the size
  after setup (``benchmarks.measure.peak_memory_mb``), what ``benchmarks.bench``
  reports; it also counts one-time costs (code pages of lazily loaded kernels,
  allocator caches), so it is noisier on small models.

"Extra" is the method's number minus plain PyTorch's. Timings are not taken here
(``benchmarks.bench`` does that).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback
import warnings

import torch

from .measure import _context
from .methods import MethodSpec, Runner, make_runner
from .models import MAIN_MODELS, make_workload

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: (label, spec, memory budget given to attach)
METHODS = (
    ("plain PyTorch", MethodSpec("plain"), None),
    ("engine default", MethodSpec("engine", 1, "auto"), None),
    ("engine lean", MethodSpec("engine", 1, "auto"), "lean"),
    ("Opacus ghost", MethodSpec("opacus", 1, "ghost"), None),
)


def allocated_peak_mb(runner: Runner) -> float:
    """Peak of live tensor bytes (MiB) during one ``runner.step()``, over what was live when it began."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def _build(model: str, spec: MethodSpec, budget, threads: int) -> Runner:
    torch.set_num_threads(threads)
    work = make_workload(model, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if budget is None:
            return make_runner(spec, work, 1.0)
        from . import methods

        original = methods.dp_microclip.attach

        def attach(*args, **kwargs):
            return original(*args, memory_budget=budget, **kwargs)

        methods.dp_microclip.attach = attach  # this child process only: the runner's attach gets the budget
        try:
            return make_runner(spec, work, 1.0)
        finally:
            methods.dp_microclip.attach = original


def _allocated_child(conn, model, spec, budget, threads):
    try:
        runner = _build(model, spec, budget, threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner.step()  # warm-up: the engine's verification and route timing happen here
            runner.release()
            mb = allocated_peak_mb(runner)
        conn.send(("ok", mb, runner.strategies()))
    except BaseException as err:  # report, never hang the parent
        conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc(limit=3)))
    finally:
        conn.close()


def _rss_child(conn, model, spec, budget, threads):
    try:
        import gc

        from .measure import _current_rss_mb, _peak_rss_mb, _reset_peak_rss

        runner = _build(model, spec, budget, threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner.step()
            runner.release()
            gc.collect()
            exact = _reset_peak_rss()
            base = _current_rss_mb()
            for _ in range(2):
                runner.step()
                runner.release()
        conn.send(("ok", _peak_rss_mb() - base, "VmHWM" if exact else "ru_maxrss (upper bound)"))
    except BaseException as err:
        conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc(limit=3)))
    finally:
        conn.close()


def in_child(target, *args, timeout_s: float = 300.0):
    """Run ``target(conn, *args)`` in a fresh forkserver process; ``(value, detail)`` or ``(None, error)``."""
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            proc.kill()
            return None, f"timeout after {timeout_s:.0f} s"
        status, value, detail = parent.recv()
    except EOFError:
        return None, f"process died (exit code {proc.exitcode})"
    finally:
        parent.close()
        proc.join(timeout=10)
    return (value, detail) if status == "ok" else (None, value)


def measure(models, threads: int, rss: bool) -> list[dict]:
    rows = []
    for model in models:
        base_alloc = base_rss = None
        for label, spec, budget in METHODS:
            alloc, paths = in_child(_allocated_child, model, spec, budget, threads)
            rss_mb = in_child(_rss_child, model, spec, budget, threads)[0] if rss else None
            if spec.kind == "plain":
                base_alloc, base_rss = alloc, rss_mb
            row = {"model": model, "method": label, "allocated_mb": alloc, "rss_mb": rss_mb,
                   "extra_allocated_mb": None if alloc is None or base_alloc is None else alloc - base_alloc,
                   "extra_rss_mb": None if rss_mb is None or base_rss is None else rss_mb - base_rss,
                   "paths": paths if alloc is not None else f"failed: {paths}"}
            rows.append(row)
            print(f"{model:12s} {label:15s} alloc {_fmt(alloc)} MiB (extra {_fmt(row['extra_allocated_mb'], True)})"
                  f"  rss extra {_fmt(row['extra_rss_mb'], True)}  {row['paths']}", file=sys.stderr, flush=True)
    return rows


def _fmt(x, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.1f}" if signed else f"{x:.1f}"


def markdown(rows: list[dict], command: str, stamp: str) -> str:
    lines = [
        "# dp-microclip: extra peak memory of one training step over plain PyTorch (b = 1)", "",
        f"{stamp}. Command: `{command}`.", "",
        "`allocated`: peak of live tensor bytes during one step (after one warm-up step), from the CPU "
        "allocator's events (`torch.profiler`, `profile_memory=True`), over what was live when the step began; "
        "exact and deterministic. `RSS`: peak resident set size over two steps minus the size before them "
        "(noisier: also counts lazily loaded code and allocator caches). Each method in a fresh process. "
        "Engine default: `attach(...)` as is; engine lean: `attach(..., memory_budget=\"lean\")`; Opacus ghost: "
        "`make_private(..., grad_sample_mode=\"ghost\")`, noise 0.", "",
        "| model | method | allocated peak MiB | extra allocated MiB | extra RSS MiB | engine paths |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {_fmt(r['allocated_mb'])} | "
                     f"{_fmt(r['extra_allocated_mb'], True)} | {_fmt(r['extra_rss_mb'], True)} | {r['paths']} |")
    lines.append("")
    verdicts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["method"]: r for r in rows if r["model"] == model}
        lean, ghost = by.get("engine lean"), by.get("Opacus ghost")
        if lean and ghost and lean["extra_allocated_mb"] is not None and ghost["extra_allocated_mb"] is not None:
            ok = lean["extra_allocated_mb"] <= ghost["extra_allocated_mb"]
            verdicts.append(f"- {model}: engine lean {lean['extra_allocated_mb']:+.1f} MiB vs Opacus ghost "
                            f"{ghost['extra_allocated_mb']:+.1f} MiB (allocated): {'met' if ok else 'missed'}")
    if verdicts:
        lines += ["Target (issue 25): engine lean's extra peak at most Opacus ghost's on every bench model.", ""]
        lines += verdicts + [""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MAIN_MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-rss", action="store_true", help="skip the RSS measurement (allocated only)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    rows = measure(models, args.threads, rss=not args.no_rss)
    stamp = (f"{datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, "
             f"{os.cpu_count()} CPUs, torch threads {args.threads}")
    command = "python -m benchmarks.memory" + ("" if argv is None and len(sys.argv) == 1 else " " +
                                               " ".join(argv if argv is not None else sys.argv[1:]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu-memory.md"), "w") as fh:
        fh.write(markdown(rows, command, stamp))
    with open(os.path.join(args.out, "cpu-memory.json"), "w") as fh:
        json.dump({"stamp": stamp, "command": command, "rows": rows}, fh, indent=1)
    print(markdown(rows, command, stamp))


if __name__ == "__main__":
    main()
