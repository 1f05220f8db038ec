"""``python -m benchmarks.bench --profile``: where an engine step spends its time beyond a plain step.

For each model (default MLP, CNN and transformer) at b=1 (or the --b values), grad_mode=auto
(or the first --modes value):

1. torch.profiler over a few plain steps and a few engine steps (same model,
   same batch): per-op self CPU time per step (self CUDA time on a GPU), and
   the difference engine minus plain, op by op: that difference is the cost of
   clipping, broken down by the kernels that pay for it;
2. cProfile over engine steps: the Python functions of dp_microclip by
   cumulative time (hooks, the end-of-backward pass, the step pre-hook), so
   the op costs can be traced back to the code that issues them;
3. a wall-clock split of the step: forward, backward (hooks and the engine's
   end-of-backward callback included), optimizer.step (the engine's pre-hook
   writes p.grad).

Writes ``<out>/<machine>-profile.md``.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import time
import warnings

from torch.profiler import ProfilerActivity, profile

from .methods import MethodSpec, _sync, make_runner
from .models import MAIN_MODELS, loss_fn, make_workload

PROFILE_MODELS = ("mlp", "cnn", "transformer")
STEPS = 5


def _op_table(runner, steps: int, device) -> dict[str, tuple[float, float]]:
    """{op name: (self time per step in ms, calls per step)} from torch.profiler."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.step()
            _sync(device)
            runner.release()
    table = {}
    for ev in prof.key_averages():
        if device.type == "cuda":
            self_us = getattr(ev, "self_device_time_total", 0.0) or getattr(ev, "self_cuda_time_total", 0.0)
        else:
            self_us = ev.self_cpu_time_total
        table[ev.key] = (self_us / 1e3 / steps, ev.count / steps)
    return table


def _phases(runner, steps: int, device) -> dict[str, float]:
    """Median wall time (ms) of forward, backward and optimizer.step of ``runner`` (plain or engine)."""
    fw, bw, st = [], [], []
    model, opt = runner.model, runner.opt
    x, y = runner.x, runner.y
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        fw.append(t1 - t0)
        bw.append(t2 - t1)
        st.append(t3 - t2)
    return {"forward": statistics.median(fw) * 1e3, "backward": statistics.median(bw) * 1e3,
            "step": statistics.median(st) * 1e3}


def _cprofile(runner, steps: int, limit: int = 22) -> str:
    """dp_microclip's Python functions over ``steps`` engine steps, per step, as a markdown table.

    cProfile's cumulative time of a function includes the torch ops it issues
    (they run synchronously on the CPU), so this attributes the engine's extra
    time to the code that spends it.
    """
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        runner.step()
        runner.release()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, func) -> (primitive calls, calls, tottime, cumtime, callers)
    step_total = max((ct for (f, _, fn), (_, _, _, ct, _) in stats.items() if fn == "step"
                      and f.endswith(os.path.join("benchmarks", "methods.py"))), default=0.0)
    rows = []
    for (filename, line, func), (_, calls, tottime, cumtime, _) in stats.items():
        if f"{os.sep}dp_microclip{os.sep}" not in filename:
            continue
        where = filename.split(f"{os.sep}dp_microclip{os.sep}", 1)[1]
        rows.append((cumtime, f"{where}:{line} {func}", calls, tottime))
    rows.sort(reverse=True)
    lines = [f"Whole step (cProfile on): {step_total / steps * 1e3:.1f} ms.", "",
             "| dp_microclip function | calls/step | cumulative ms/step | own ms/step (incl. tensor ops it runs) |",
             "|---|---|---|---|"]
    for cumtime, name, calls, tottime in rows[:limit]:
        if cumtime / steps * 1e3 < 0.05:
            break
        lines.append(f"| `{name}` | {calls / steps:g} | {cumtime / steps * 1e3:.2f} | {tottime / steps * 1e3:.2f} |")
    return "\n".join(lines)


def profile_model(model: str, device, args, b: int = 1, mode: str = "auto") -> str:
    work = make_workload(model, device, args.batch_size, args.seq_len, seed=args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = make_runner(MethodSpec("plain"), work, args.max_grad_norm)
        engine = make_runner(MethodSpec("engine", b, mode), work, args.max_grad_norm)
        for _ in range(3):  # warm up both
            plain.step()
            plain.release()
            engine.step()
            engine.release()
        phases_plain = _phases(plain, 2 * STEPS, device)
        phases_engine = _phases(engine, 2 * STEPS, device)
        ops_plain = _op_table(plain, STEPS, device)
        ops_engine = _op_table(engine, STEPS, device)
        cprof = _cprofile(engine, STEPS)
        strategies = engine.strategies()
        by_layer = dict(getattr(engine.engine, "last_strategies", {}) or {})
    engine.close()

    total_plain = sum(v[0] for v in ops_plain.values())
    total_engine = sum(v[0] for v in ops_engine.values())
    rows = []
    for name in set(ops_plain) | set(ops_engine):
        e_ms, e_calls = ops_engine.get(name, (0.0, 0.0))
        p_ms, p_calls = ops_plain.get(name, (0.0, 0.0))
        rows.append((e_ms - p_ms, name, e_ms, p_ms, e_calls, p_calls))
    rows.sort(reverse=True)
    unit = "self CUDA" if device.type == "cuda" else "self CPU"
    lines = [
        f"## {work.tag}, engine b={b}, grad_mode={mode}",
        "",
        f"Paths: {strategies} ("
        + ", ".join(f"`{k}` {v}" for k, v in by_layer.items()) + ").",
        "",
        "Wall-clock split, median of {} steps (ms): ".format(2 * STEPS)
        + ", ".join(f"{k} {phases_plain[k]:.1f} -> {phases_engine[k]:.1f}" for k in phases_plain)
        + f" (plain -> engine; total {sum(phases_plain.values()):.1f} -> {sum(phases_engine.values()):.1f}).",
        "",
        f"torch.profiler, {unit} time per step summed over ops: plain {total_plain:.1f} ms, engine "
        f"{total_engine:.1f} ms (profiler overhead included in both). Top ops by extra time (engine minus plain):",
        "",
        "| op | extra ms/step | engine ms/step | plain ms/step | engine calls/step | plain calls/step |",
        "|---|---|---|---|---|---|",
    ]
    for diff, name, e_ms, p_ms, e_calls, p_calls in rows[:15]:
        lines.append(f"| `{name}` | {diff:+.2f} | {e_ms:.2f} | {p_ms:.2f} | {e_calls:g} | {p_calls:g} |")
    lines += ["", "Ops the engine saves (negative extra):", "",
              "| op | extra ms/step | engine | plain |", "|---|---|---|---|"]
    for diff, name, e_ms, p_ms, _, _ in sorted(rows)[:5]:
        if diff < 0:
            lines.append(f"| `{name}` | {diff:+.2f} | {e_ms:.2f} | {p_ms:.2f} |")
    lines += ["", f"cProfile, {STEPS} engine steps, dp_microclip functions by cumulative time:", "", cprof, ""]
    return "\n".join(lines)


def run_profile(args, device, env, out_dir, tag) -> list[str]:
    # The default --models (all main models) profiles the MLP and the transformer; otherwise what was asked.
    models = list(PROFILE_MODELS) if tuple(args.models) == MAIN_MODELS else list(args.models)
    sections = [
        "# Profile of one dp_microclip step against a plain step",
        "",
        f"{env['date']}; device {env['device']}, torch threads {env['torch_threads']}; torch {env['torch']}; "
        f"commit {env['commit']}. Command: `python -m benchmarks.bench --profile`.",
        "",
    ]
    mode = args.modes[0] if args.modes else "auto"
    from .measure import wait_for_quiet

    for model in models:
        for b in args.b or [1]:
            if args.wait_idle > 0:
                wait_for_quiet(args.wait_idle, log=lambda m: print(m, file=sys.stderr, flush=True))
            sections.append(profile_model(model, device, args, b=b, mode=mode))
    text = "\n".join(sections)
    path = os.path.join(out_dir, f"{tag}-profile.md")
    with open(path, "w") as fh:
        fh.write(text)
    print(text, flush=True)
    return [path]
