"""``python -m benchmarks.bench``: time one training step of dp_microclip against plain PyTorch, Opacus and the naive loop.

One training step = what a user's loop runs, ``opt.zero_grad(); loss =
loss_fn(model(x), y); loss.backward(); opt.step()`` (clipping happens inside
backward and the optimizer's step pre-hook), on a fixed synthetic batch, with
Python's garbage collector left on and nothing freed outside the clock
(``--timing isolated`` gives the earlier tables' method). For each model (MLP B=256, CNN B=128, transformer
B=32 T=64) the default run times:

* plain PyTorch (the floor; every ratio is to it, measured in the same process);
* dp_microclip for b in {1, 2, 4, 8, 16, 32, B} x grad_mode auto / bookkeeping /
  materialize, and grad_mode func at b in {1, 8};
* Opacus make_private, grad_sample_mode "hooks" and "ghost" (b=1, noise 0);
* the naive loop (one backward per micro-batch) at b=1 and b=8.

Before a clipping method is timed, its gradient is compared once with the
naive loop's on the same model and batch (float32; worst relative error per
parameter tensor in the table); a method above 1e-4 is reported as wrong and
not timed. Timing is interleaved (see ``benchmarks/measure.py``); peak memory is
measured per method in its own process.

Outputs (``--out``, default ``benchmarks/results``): ``<machine>-<model>.md``,
``.json`` and ``.png`` per model; ``<machine>-scaling.md/.json`` with
``--scaling``; ``<machine>-profile.md`` with ``--profile``. ``--quick`` writes to
``<out>/quick/``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
import warnings

import torch

from . import report
from .measure import TIMING_MODES, cpu_busy_fraction, interleaved, machine_load, peak_memory_mb, wait_for_quiet
from .methods import CHECK_TOLERANCE, MethodSpec, ReferenceCache, SetupError, check_against_reference, make_runner
from .models import DEFAULT_BATCH, EXTRA_MODELS, MAIN_MODELS, make_workload
from .report import Row

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ENGINE_MODES = ("auto", "bookkeeping", "materialize")
FUNC_BS = (1, 8)
NAIVE_BS = (1, 8)
OPACUS_MODES = ("hooks", "ghost")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------- configuration
def micro_batch_sizes(batch: int, wanted=(1, 2, 4, 8, 16, 32)) -> list[int]:
    bs = sorted({b for b in (*wanted, batch) if b <= batch and batch % b == 0})
    return bs


def default_specs(batch: int, *, quick: bool, bs=None, modes=None, opacus=True) -> list[MethodSpec]:
    if quick:
        bs = bs or [1, 8]
        modes = modes or ["auto"]
        specs = [MethodSpec("engine", b, m) for m in modes for b in micro_batch_sizes(batch, bs)]
        if opacus:
            specs.append(MethodSpec("opacus", 1, "ghost"))
        specs.append(MethodSpec("naive", 8 if batch % 8 == 0 else 1))
        return specs
    bs = micro_batch_sizes(batch, bs or (1, 2, 4, 8, 16, 32))
    modes = modes or list(ENGINE_MODES) + ["func"]
    specs = []
    for m in modes:
        for b in bs if m != "func" else [b for b in FUNC_BS if b in bs]:
            specs.append(MethodSpec("engine", b, m))
    if opacus:
        specs += [MethodSpec("opacus", 1, m) for m in OPACUS_MODES]
    specs += [MethodSpec("naive", b) for b in NAIVE_BS if b <= batch and batch % b == 0]
    return specs


def machine_tag(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu{os.cpu_count()}-t{threads}"


def git_commit() -> str:
    """The checkout's commit and whether it has local changes (read-only git calls)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "dp_microclip"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head or "unknown") + (" + uncommitted changes in dp_microclip/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(args, device) -> dict:
    try:
        import opacus

        opacus_version = opacus.__version__
    except ImportError:
        opacus_version = "not installed"
    import dp_microclip

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "opacus": opacus_version, "dp_microclip": dp_microclip.__version__,
        "commit": git_commit(), "python": sys.version.split()[0],
    }


# -------------------------------------------------------------------------- one comparison
def run_comparison(work, specs, args, *, label: str) -> tuple[list[Row], dict]:
    """Check, then time (interleaved) every spec on one workload. Returns rows and run info."""
    if args.wait_idle > 0:
        wait_for_quiet(args.wait_idle, log=log)
    t0 = time.perf_counter()
    load_start = machine_load()
    busy_start = cpu_busy_fraction(0.5)
    cache = ReferenceCache(work, args.max_grad_norm)
    plain = make_runner(MethodSpec("plain"), work, args.max_grad_norm)
    rows = {MethodSpec("plain").key: Row(MethodSpec("plain"))}
    runners = {}
    for spec in specs:
        row = rows[spec.key] = Row(spec)
        try:
            runner = make_runner(spec, work, args.max_grad_norm)
        except SetupError as err:
            row.status, row.reason = "failed", str(err)
            log(f"  [{label}] {spec.label} b={spec.b}: failed: {err}")
            continue
        row.note = runner.note
        if spec.kind in ("engine", "opacus"):
            try:
                err, name, raw, raw_name = check_against_reference(runner, cache)
            except Exception as exc:  # a crash in the step is a result too
                row.status, row.reason = "failed", f"step raised {type(exc).__name__}: {str(exc)[:200]}"
                log(f"  [{label}] {spec.label} b={spec.b}: step failed: {exc}")
                runner.close()
                continue
            row.check_err, row.check_param = err, name
            if raw > 10 * max(err, 1e-12) and raw >= CHECK_TOLERANCE:
                row.note = "; ".join(x for x in (row.note, f"raw rel. err {raw:.1e} on {raw_name}, whose "
                                                 "gradient is ~0 (see check rule)") if x)
            row.strategies = runner.strategies()
            if hasattr(runner, "fraction_clipped"):
                row.clipped = runner.fraction_clipped()
            runner.release()
            if not err < CHECK_TOLERANCE:
                row.status = "wrong"
                log(f"  [{label}] {spec.label} b={spec.b}: WRONG, rel err {err:.2e} on {name}; not timed")
                runner.close()
                continue
        runners[spec.key] = runner
    log(f"  [{label}] checks done in {time.perf_counter() - t0:.0f} s; timing {len(runners)} methods "
        f"x {args.rounds} rounds")

    def progress(done, total):
        log(f"  [{label}] round {done}/{total} ({time.perf_counter() - t0:.0f} s)")

    plain_t, timings = interleaved(
        plain, runners, rounds=args.rounds, warmup=args.warmup, slow_ms=args.slow_ms,
        slow_rounds=min(args.slow_rounds, args.rounds), seed=args.seed, progress=progress, mode=args.timing,
    )
    rows[MethodSpec("plain").key].timing = plain_t
    plain_t.ratios = [1.0] * len(plain_t.ms)
    for key, timing in timings.items():
        rows[key].timing = timing
    for runner in runners.values():
        strategies = runner.strategies()  # after the timed steps: what auto really picked
        if strategies:
            rows[runner.spec.key].strategies = strategies
        runner.close()
    plain.close()
    info = {"seconds": round(time.perf_counter() - t0, 1), "load_start": load_start, "load_end": machine_load(),
            "cpu_busy_start": _pct(busy_start), "cpu_busy_end": _pct(cpu_busy_fraction(0.5))}
    return list(rows.values()), info


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def measure_memory(work, rows: list[Row], args, label: str) -> None:
    t0 = time.perf_counter()
    for row in sorted(rows, key=Row.sort_key):
        if row.status != "ok":
            continue
        mb, how = peak_memory_mb(work.model, work.batch_size, work.seq_len, work.device, row.spec,
                                 args.max_grad_norm, args.threads)
        row.mem_mb = mb
        row.mem_note = how
    log(f"  [{label}] memory done in {time.perf_counter() - t0:.0f} s")


# -------------------------------------------------------------------------- the main run
def run_models(args, device, env, out_dir, tag) -> list[str]:
    written = []
    for model in args.models:
        work = make_workload(model, device, args.batch_size, args.seq_len, seed=args.seed)
        specs = default_specs(work.batch_size, quick=args.quick, bs=args.b, modes=args.modes,
                              opacus=not args.no_opacus)
        log(f"[{model}] {work.tag}: {len(specs) + 1} methods")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows, info = run_comparison(work, specs, args, label=model)
        if args.memory:
            measure_memory(work, rows, args, model)
        base = os.path.join(out_dir, f"{tag}-{model}")
        title = f"{work.tag} on {env['device']}, {env['torch_threads']} threads"
        plotted = report.plot_ratios(base + ".png", model, rows, work.batch_size, title)
        md = render_model_markdown(work, rows, info, env, args, plotted, os.path.basename(base))
        with open(base + ".md", "w") as fh:
            fh.write(md)
        report.write_json(base + ".json", {
            "model": model, "batch_size": work.batch_size, "seq_len": work.seq_len, "env": env, "run": info,
            "settings": _settings(args), "rows": [r.to_json() for r in sorted(rows, key=Row.sort_key)],
        })
        written += [base + ".md", base + ".json"] + ([base + ".png"] if plotted else [])
        print(f"\n## {work.tag}\n\n" + report.main_table(rows, work.batch_size) + "\n\n"
              + report.targets_section(model, rows) + "\n", flush=True)
    return written


def _settings(args) -> dict:
    return {"rounds": args.rounds, "warmup": args.warmup, "max_grad_norm": args.max_grad_norm,
            "threads": args.threads, "slow_ms": args.slow_ms, "slow_rounds": args.slow_rounds,
            "memory": args.memory, "quick": args.quick, "seed": args.seed, "timing": args.timing}


def render_model_markdown(work, rows, info, env, args, plotted, stem) -> str:
    lines = [
        f"# dp-microclip benchmark: {work.tag}",
        "",
        f"{env['date']}; device {env['device']}, {env['cpu_count']} CPUs, torch threads {env['torch_threads']}; "
        f"torch {env['torch']}, Opacus {env['opacus']}, dp_microclip {env['dp_microclip']} "
        f"(commit {env['commit']}).",
        f"Settings: {args.rounds} interleaved rounds after {args.warmup} warm-up step(s); clipping bound "
        f"C={args.max_grad_norm}; SGD lr={1e-3}; methods slower than {args.slow_ms:.0f} ms/step timed in "
        f"{min(args.slow_rounds, args.rounds)} rounds only. Run took {info['seconds']} s; load average "
        f"{info['load_start']} at start, {info['load_end']} at end; CPUs busy just before timing "
        f"{info['cpu_busy_start']}, just after {info['cpu_busy_end']} (other processes inflate absolute "
        "times; paired ratios are more robust, not immune).",
        "",
        timing_sentence(args.timing) + " `ratio to plain` is the median of "
        "paired ratios (each step timed right after a plain step, in shuffled round-robin order); `n` is the "
        "number of pairs. `peak MB over setup` is the peak memory of two steps in a fresh process minus the "
        "memory after building model, batch and method (CPU: peak RSS; CUDA: max_memory_allocated). "
        "Every clipping method's first step is compared with the naive loop "
        f"(`dp_microclip.reference`, float32) before timing; above {CHECK_TOLERANCE:g} it is marked wrong "
        "and not timed. Opacus runs with noise multiplier 0 and no Poisson sampling (per-example clipping "
        "of this batch). Path = the engine's `last_strategies` after the timed steps.",
        "",
        report.main_table(rows, work.batch_size),
        "",
        report.targets_section(work.model, rows),
        "",
    ]
    if plotted:
        lines += [f"![ratio to plain vs b]({stem}.png)", ""]
    lines += ["Raw step times and ratios: " + f"`{stem}.json`.", ""]
    return "\n".join(lines)


def timing_sentence(mode: str) -> str:
    """What the timed region is, for the tables' headers."""
    if mode == "isolated":
        return ("Timed: one step = zero_grad, forward, loss, backward, clipping, SGD step, with `gc.collect()` "
                "before each timed pair and the gradients freed after each step outside the clock (the earlier "
                "tables' method, `--timing isolated`).")
    return ("Timed: the user's whole step, `opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); "
            "opt.step()` (clipping runs inside backward and the step), with Python's garbage collector on and "
            "never called by the harness, and nothing freed outside the clock: the previous step's gradients "
            "are freed by the timed `zero_grad()`, for plain and every method alike (`--timing user`).")


# -------------------------------------------------------------------------- scaling
SCALING_MLP_BATCHES = (32, 128, 512)
SCALING_SEQS = (16, 64, 256)
SCALING_BS = (1, 8, 64)


def run_scaling(args, device, env, out_dir, tag) -> list[str]:
    scenarios = [("mlp", B, None) for B in SCALING_MLP_BATCHES]
    scenarios += [("transformer", DEFAULT_BATCH["transformer"], T) for T in SCALING_SEQS]
    sections, payload = [], []
    t_all = time.perf_counter()
    for model, batch, seq in scenarios:
        work = make_workload(model, device, batch, seq, seed=args.seed)
        bs = [b for b in SCALING_BS if b <= batch and batch % b == 0]
        specs = [MethodSpec("engine", b, m) for b in bs for m in ENGINE_MODES] + [MethodSpec("naive", b) for b in bs]
        label = f"scaling {work.tag}"
        log(f"[{label}] {len(specs) + 1} methods")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows, info = run_comparison(work, specs, args, label=label)
        payload.append({"model": model, "batch_size": batch, "seq_len": seq, "run": info,
                        "rows": [r.to_json() for r in sorted(rows, key=Row.sort_key)]})
        sections.append((model, work, bs, rows))
    md = render_scaling_markdown(sections, env, args, time.perf_counter() - t_all)
    base = os.path.join(out_dir, f"{tag}-scaling")
    with open(base + ".md", "w") as fh:
        fh.write(md)
    report.write_json(base + ".json", {"env": env, "settings": _settings(args), "scenarios": payload})
    print("\n" + md, flush=True)
    return [base + ".md", base + ".json"]


def _scaling_cell(row: Row | None) -> str:
    if row is None:
        return "—"
    if row.status == "wrong":
        return f"WRONG ({row.check_err:.0e})"
    if row.status == "failed":
        return "failed"
    return report.fmt_ratio(row.timing.ratio if row.timing else None)


def render_scaling_markdown(sections, env, args, seconds) -> str:
    lines = [
        "# dp-microclip scaling: where each strategy wins",
        "",
        f"{env['date']}; device {env['device']}, torch threads {env['torch_threads']}; torch {env['torch']}; "
        f"commit {env['commit']}. {args.rounds} interleaved rounds per scenario, {args.warmup} warm-up; "
        f"C={args.max_grad_norm}. Total {seconds:.0f} s. " + timing_sentence(args.timing),
        "",
        "Cells: step time / plain step (median of paired ratios, same process). Every engine cell passed "
        f"the naive-loop gradient check (< {CHECK_TOLERANCE:g}) unless marked WRONG. `auto picks`: the "
        "engine's per-layer strategies under grad_mode=auto.",
        "",
    ]
    for model, title, key in (("mlp", "MLP 784-512-512-10: batch size B", "B"),
                              ("transformer", "Transformer (B=32): sequence length T", "T")):
        lines += [f"## {title}", "",
                  f"| {key} | b | plain ms | auto | bookkeeping | materialize | naive loop | fastest | auto picks |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, work, bs, rows in sections:
            if m != model:
                continue
            plain = next(r for r in rows if r.spec.kind == "plain")
            for b in bs:
                cells = {mode: report._find(rows, "engine", mode, b) for mode in ENGINE_MODES}
                naive = report._find(rows, "naive", None, b)
                timed = {name: r.timing.ratio for name, r in [*cells.items(), ("naive loop", naive)]
                         if r is not None and r.status == "ok" and r.timing and r.timing.ratios}
                fastest = min(timed, key=timed.get) if timed else "—"
                auto = cells["auto"]
                picks = auto.strategies if auto is not None else ""
                value = work.batch_size if model == "mlp" else work.seq_len
                lines.append(
                    f"| {value} | {b}{' (=B)' if b == work.batch_size else ''} | {plain.timing.median_ms:.1f} | "
                    + " | ".join(_scaling_cell(cells[m]) for m in ENGINE_MODES)
                    + f" | {_scaling_cell(naive)} | {fastest} | {picks} |"
                )
        lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------- CLI
def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Time one training step of dp_microclip vs plain PyTorch, Opacus and the naive loop.",
    )
    p.add_argument("--models", default=",".join(MAIN_MODELS),
                   help=f"comma-separated, from {', '.join(MAIN_MODELS + EXTRA_MODELS)} (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 7; quick 2; scaling 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per method (default 1 after the check step)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke run: b in {1, 8}, auto only, Opacus ghost, 2 rounds (< 60 s)")
    p.add_argument("--scaling", action="store_true", help="the scaling table (MLP: B; transformer: T) instead of the main run")
    p.add_argument("--profile", action="store_true", help="profile the engine step against plain (MLP, CNN, transformer; b=1 or --b) instead")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="peak memory per method in its own process (default: on, off with --quick)")
    p.add_argument("--b", default=None, help="comma-separated micro-batch sizes (default 1,2,4,8,16,32 and B)")
    p.add_argument("--modes", default=None, help="comma-separated engine grad_modes (default auto,bookkeeping,materialize,func)")
    p.add_argument("--batch-size", type=int, default=None, help="override the model's default batch size")
    p.add_argument("--seq-len", type=int, default=None, help="transformer sequence length (default 64)")
    p.add_argument("--no-opacus", action="store_true", help="skip the Opacus rows")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C (default %(default)s)")
    p.add_argument("--timing", choices=TIMING_MODES, default="user",
                   help="user: time the whole user step, GC on, nothing freed outside the clock (default); "
                        "isolated: gc.collect() before each pair and gradients freed outside the clock "
                        "(the earlier tables' method)")
    p.add_argument("--slow-ms", type=float, default=1500.0,
                   help="methods slower than this per step are timed in --slow-rounds rounds only (default %(default)s)")
    p.add_argument("--slow-rounds", type=int, default=3, help="rounds for the slow methods (default %(default)s)")
    p.add_argument("--out", default=None, help=f"output folder (default {os.path.relpath(DEFAULT_OUT)}; quick: <out>/quick)")
    p.add_argument("--machine", default=None, help="machine tag in file names (default from the device)")
    p.add_argument("--seed", type=int, default=0, help="seed of models and data (default %(default)s)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each model, wait up to SECONDS until other processes use < 20%% of the CPUs")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MAIN_MODELS + EXTRA_MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MAIN_MODELS + EXTRA_MODELS)}")
    try:
        args.b = [int(x) for x in args.b.split(",")] if args.b else None
    except ValueError:
        p.error(f"--b takes comma-separated integers, e.g. 1,8. Found {args.b!r}.")
    if args.b and min(args.b) < 1:
        p.error(f"--b: every micro-batch size must be >= 1. Found {args.b}.")
    args.modes = [x.strip() for x in args.modes.split(",")] if args.modes else None
    if args.rounds is None:
        args.rounds = 2 if args.quick else (3 if args.scaling else 7)
    if args.warmup is None:
        args.warmup = 1
    if args.memory is None:
        args.memory = not (args.quick or args.scaling or args.profile)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu.")
        return 2
    torch.set_num_threads(args.threads)
    env = environment(args, device)
    out_dir = args.out or DEFAULT_OUT
    if args.quick:
        out_dir = os.path.join(out_dir, "quick")
    os.makedirs(out_dir, exist_ok=True)
    tag = args.machine or machine_tag(device, args.threads)
    t0 = time.perf_counter()
    if args.profile:
        from .profile_step import run_profile

        written = run_profile(args, device, env, out_dir, tag)
    elif args.scaling:
        written = run_scaling(args, device, env, out_dir, tag)
    else:
        written = run_models(args, device, env, out_dir, tag)
    log(f"done in {time.perf_counter() - t0:.0f} s; wrote:\n  " + "\n  ".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
