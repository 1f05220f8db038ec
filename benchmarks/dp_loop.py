"""``python -m benchmarks.dp_loop``: the DP tutorial's whole training run, each run in a fresh process.

The setting of ``tutorials/dp_digits.py``: scikit-learn's digits (1437 training
images, 8x8), the small GroupNorm CNN, SGD (lr 1.0, momentum 0.5), clipping
bound C = 1, expected batch size 256 (q = 256/1437), target epsilon 8 at
delta 1e-5, a few epochs. Methods, each run start to finish in its own
``python`` subprocess, so the cold start (interpreter, imports, data set,
calibration of the noise, the autotuner's first steps) is part of the result:

* ``engine``: ``dp_microclip.attach(..., privacy=DP(target_epsilon=8, ...))`` with
  ``micro_batch_size`` b (``--b``, default 1 and 8) and batches from
  ``engine.data_loader`` (Poisson sampling);
  the loss is ``engine.loss(F.cross_entropy, model(x), y, reduction="none")`` (the verified
  per-example loss, which DP mode requires by default: its check runs on the first step only);
* ``engine_loss`` (only when named in ``--methods``): the same as ``engine`` now that DP mode
  requires ``engine.loss`` (kept so that older result files keep their name);
* ``plain``: the same model trained without clipping or noise on the SAME
  Poisson batches (the loader of a noise-free engine with the same seed, which is
  then detached: the model trains as plain PyTorch);
* ``opacus``: Opacus ``make_private_with_epsilon`` (Poisson sampling, the same
  target, C, optimizer and epochs), ``grad_sample_mode`` ``hooks`` (Opacus'
  default) and ``ghost``. Opacus sets q = 1/len(loader) = 1/6 here (expected
  batch 239.5 instead of 256) and draws its own batches.

Per run: wall time from the parent's spawn to the child's exit, the phases
inside the child (interpreter + imports, set-up, training loop, evaluation),
every training iteration's time (fetching the batch included: what the user's
loop costs), test accuracy and the epsilon spent. Runs are repeated
(``--repeats``) in shuffled order. Outputs: ``<out>/<machine>-dp-loop.md`` and
``.json`` (``--quick``: ``<out>/quick/``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dp_microclip import DP

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TAG = "DPLOOP_RESULT "
METHODS = ("engine", "plain", "opacus_hooks", "opacus_ghost")
OPTIONAL_METHODS = ("engine_loss",)  # run only when named in --methods


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the child
def run_child(cfg: dict) -> dict:
    """One whole training run (called in a fresh process). Returns the result dict."""
    t0 = cfg["t0"]  # the parent's time.time() just before it spawned this process
    out: dict = {"config": cfg, "phases": {}}
    out["phases"]["interpreter_s"] = time.time() - t0
    import torch
    import torch.nn.functional as F

    if cfg["method"].startswith("opacus"):  # each run imports what its user would, nothing more
        import opacus  # noqa: F401
    else:
        import dp_microclip
    out["phases"]["imports_done_s"] = time.time() - t0
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])

    from tutorials.data import digits
    from tutorials.demo_digits import accuracy
    from tutorials.dp_digits import small_cnn_groupnorm

    torch.manual_seed(cfg["seed"])
    train_set, test_set, _ = digits(seed=cfg["seed"])
    model = small_cnn_groupnorm().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.5)
    q = cfg["batch_size"] / len(train_set)
    method = cfg["method"]
    engine = None
    criterion = F.cross_entropy
    if method in ("engine", "engine_loss"):
        engine = dp_microclip.attach(
            model, optimizer, micro_batch_size=cfg["b"], max_grad_norm=cfg["max_grad_norm"],
            privacy=DP(target_epsilon=cfg["target_epsilon"], delta=cfg["delta"], epochs=cfg["epochs"], sample_rate=q),
            seed=cfg["seed"],
        )
        loader = engine.data_loader(train_set)
        out["noise_multiplier"] = engine.noise_multiplier
    elif method == "plain":
        # The same Poisson batches as the engine runs: a noise-free engine with the same seed draws
        # them; detaching it leaves plain PyTorch (the loader keeps sampling from its generator).
        sampler_engine = dp_microclip.attach(model, optimizer, micro_batch_size=1,
                                             max_grad_norm=cfg["max_grad_norm"], seed=cfg["seed"])
        loader = sampler_engine.data_loader(train_set, batch_size=cfg["batch_size"])
        sampler_engine.detach()
        out["noise_multiplier"] = None
    else:
        from opacus import PrivacyEngine

        mode = method.split("_", 1)[1]
        privacy_engine = PrivacyEngine(accountant="prv")
        base_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch_size"])
        made = privacy_engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=base_loader, target_epsilon=cfg["target_epsilon"],
            target_delta=cfg["delta"], epochs=cfg["epochs"], max_grad_norm=cfg["max_grad_norm"],
            poisson_sampling=True, grad_sample_mode=mode, criterion=torch.nn.CrossEntropyLoss(),
        )
        if len(made) == 4:
            model, optimizer, criterion, loader = made
        else:
            model, optimizer, loader = made
        out["noise_multiplier"] = optimizer.noise_multiplier
        out["opacus_sample_rate"] = 1 / len(base_loader)
    out["phases"]["setup_done_s"] = time.time() - t0

    step_ms, batch_sizes, checksum = [], [], 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_train = time.perf_counter()
    for _epoch in range(cfg["epochs"]):
        it = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            if method == "plain" and len(y) == 0:
                pass  # an empty Poisson batch: plain training has nothing to do
            else:
                if engine is not None:  # both engine methods: DP mode requires the verified loss
                    loss = engine.loss(F.cross_entropy, model(x), y, reduction="none")
                else:
                    loss = criterion(model(x), y)
                loss.backward()
                optimizer.step()
            sync()
            step_ms.append((time.perf_counter() - start) * 1e3)
            batch_sizes.append(int(len(y)))
            checksum = (checksum * 1000003 + int(y.sum()) * 7 + len(y)) % (1 << 61)
    out["train_s"] = time.perf_counter() - t_train
    out["phases"]["train_done_s"] = time.time() - t0
    eval_model = getattr(model, "_module", model)  # Opacus wraps the model
    out["accuracy"] = accuracy(eval_model.cpu() if device.type == "cuda" else eval_model, test_set)
    if engine is not None:
        out["epsilon"] = engine.epsilon()
        out["strategies"] = dict(engine.last_strategies)
    elif method.startswith("opacus"):
        out["epsilon"] = privacy_engine.get_epsilon(cfg["delta"])
    else:
        out["epsilon"] = None
    out["phases"]["eval_done_s"] = time.time() - t0
    out["step_ms"] = step_ms
    out["batch_sizes"] = batch_sizes
    out["batches_checksum"] = str(checksum)
    out["torch"] = torch.__version__
    if engine is not None:
        engine.detach()
    return out


# ------------------------------------------------------------------------------ the parent
def configs(args) -> list[dict]:
    base = {"epochs": args.epochs, "batch_size": args.batch_size, "target_epsilon": args.target_epsilon,
            "delta": args.delta, "max_grad_norm": args.max_grad_norm, "lr": args.lr, "seed": args.seed,
            "threads": args.threads, "device": args.device}
    out = []
    for method in args.methods:
        if method in ("engine", "engine_loss"):
            out += [dict(base, method=method, b=b) for b in args.b]
        else:
            out.append(dict(base, method=method, b=1 if method.startswith("opacus") else None))
    return out


def label(cfg: dict) -> str:
    m = cfg["method"]
    if m in ("engine", "engine_loss"):
        return f"dp_microclip b={cfg['b']}" + (", engine.loss" if m == "engine_loss" else "")
    if m == "plain":
        return "plain PyTorch (same Poisson batches, no clipping, no noise)"
    return f"Opacus {m.split('_', 1)[1]} (b=1)"


def spawn(cfg: dict, timeout_s: float) -> dict:
    """Run one configuration in a fresh ``python`` process; return its result (or the error)."""
    cfg = dict(cfg, t0=time.time())
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.dp_loop", "--child", json.dumps(cfg)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"config": cfg, "error": f"timeout after {timeout_s:.0f} s", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["wall_s"] = wall
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"config": cfg, "error": f"exit code {proc.returncode}: " + " | ".join(tail)[-400:], "wall_s": wall}


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarise(cfg: dict, runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    errors = sorted({r["error"] for r in runs if "error" in r})
    s = {"label": label(cfg), "method": cfg["method"], "b": cfg["b"], "runs": len(runs), "ok_runs": len(ok),
         "errors": errors}
    if not ok:
        return s
    s["wall_s"] = _med([r["wall_s"] for r in ok])
    s["wall_s_range"] = [min(r["wall_s"] for r in ok), max(r["wall_s"] for r in ok)]
    s["startup_s"] = _med([r["phases"]["setup_done_s"] for r in ok])  # interpreter + imports + data + set-up
    s["imports_s"] = _med([r["phases"]["imports_done_s"] for r in ok])
    s["train_s"] = _med([r["train_s"] for r in ok])
    s["step_ms_median"] = _med([statistics.median(r["step_ms"]) for r in ok if r["step_ms"]])
    s["first_step_ms"] = _med([r["step_ms"][0] for r in ok if r["step_ms"]])
    s["steps"] = _med([len(r["step_ms"]) for r in ok])
    s["mean_batch"] = _med([statistics.fmean(r["batch_sizes"]) for r in ok if r["batch_sizes"]])
    s["accuracy"] = _med([r["accuracy"] for r in ok])
    s["accuracies"] = [r["accuracy"] for r in ok]
    s["epsilon"] = _med([r["epsilon"] for r in ok])
    s["noise_multiplier"] = ok[0].get("noise_multiplier")
    s["checksums"] = sorted({r["batches_checksum"] for r in ok})
    s["strategies"] = ok[-1].get("strategies")
    return s


def _f(x, fmt):
    return "—" if x is None else format(x, fmt)


def render_markdown(summaries, env, args, seconds) -> str:
    plain = next((s for s in summaries if s["method"] == "plain" and s.get("wall_s")), None)
    engine_sums = {s["checksums"][0] for s in summaries if s["method"] in ("engine", "engine_loss", "plain")
                   and s.get("checksums") and len(s["checksums"]) == 1}
    lines = [
        "# dp-microclip: the DP tutorial's whole run, one fresh process per run",
        "",
        f"{env['date']}; device {args.device}, {env['cpu_count']} CPUs, torch threads {args.threads}; "
        f"torch {env['torch']}, Opacus {env['opacus']}, dp_microclip {env['dp_microclip']} (commit {env['commit']}); "
        f"Python {env['python']}. Load average {env['load_start']} at start, {env['load_end']} at end. "
        f"{args.repeats} run(s) per method in shuffled order; total {seconds:.0f} s.",
        "",
        f"Task (`tutorials/dp_digits.py`): scikit-learn digits (1437 training, 360 test images), the GroupNorm CNN, "
        f"SGD lr {args.lr} momentum 0.5, C = {args.max_grad_norm}, expected batch {args.batch_size} (q = "
        f"{args.batch_size}/1437), target epsilon {args.target_epsilon} at delta {args.delta:g}, "
        f"{args.epochs} epoch(s), seed {args.seed}. The engine and plain PyTorch train on the same Poisson "
        "batches (plain: the loader of a noise-free engine with the same seed, detached before training); "
        "Opacus uses `make_private_with_epsilon` with its own Poisson sampler at q = 1/len(loader) = 1/6.",
        "",
        "`wall s`: from spawning `python` to its exit (interpreter, imports, data, set-up incl. noise "
        "calibration, training, evaluation, epsilon); median over runs (min-max). `start-up s`: spawn to the "
        "first training step. `step ms`: median over the run's training iterations (fetching the batch, "
        "`zero_grad`, forward, backward, `step`), median over runs; `first step ms` includes the autotuner's "
        "timing on the engine. Ratios are to plain PyTorch.",
        "",
        "| method | wall s | wall / plain | start-up s (imports) | train s | step ms | step / plain | first step ms "
        "| steps (mean batch) | test accuracy | epsilon | z | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        if not s.get("wall_s"):
            lines.append(f"| {s['label']} | failed | | | | | | | | | | | {'; '.join(s['errors'])[:300]} |")
            continue
        wall_ratio = s["wall_s"] / plain["wall_s"] if plain else None
        step_ratio = s["step_ms_median"] / plain["step_ms_median"] if plain and plain.get("step_ms_median") else None
        notes = []
        if s["errors"]:
            notes.append(f"{s['runs'] - s['ok_runs']} run(s) failed: " + "; ".join(s["errors"])[:200])
        if s["method"] in ("engine", "engine_loss", "plain"):
            same = len(s["checksums"]) == 1 and len(engine_sums) == 1
            notes.append("same batches as the other engine/plain runs" if same else "batches DIFFER between runs")
        if s.get("strategies"):
            counts: dict[str, int] = {}
            for v in s["strategies"].values():
                counts[v] = counts.get(v, 0) + 1
            notes.append(", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
        acc = ", ".join(f"{a:.3f}" for a in s["accuracies"])
        lines.append(
            f"| {s['label']} | {s['wall_s']:.2f} ({s['wall_s_range'][0]:.2f}-{s['wall_s_range'][1]:.2f}) | "
            f"{_f(wall_ratio, '.2f')}x | {s['startup_s']:.2f} ({s['imports_s']:.2f}) | {s['train_s']:.2f} | "
            f"{_f(s['step_ms_median'], '.2f')} | {_f(step_ratio, '.2f')}x | {_f(s['first_step_ms'], '.1f')} | "
            f"{s['steps']:.0f} ({s['mean_batch']:.0f}) | {s['accuracy']:.3f} ({acc}) | {_f(s['epsilon'], '.2f')} | "
            f"{_f(s['noise_multiplier'], '.3f')} | {'; '.join(notes)} |"
        )
    lines += ["", "Raw per-run results (every step time): the `.json` file beside this one.", ""]
    return "\n".join(lines)


def environment(args) -> dict:
    """Versions and load, read in this (parent) process: its own start-up is not timed."""
    from .bench import git_commit
    from .measure import machine_load

    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0], "load_start": machine_load(), "commit": git_commit()}
    for mod in ("torch", "opacus", "dp_microclip"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001 (the table says so)
            info[mod] = f"not importable ({type(err).__name__})"
    return info


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.dp_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated from %(default)s")
    p.add_argument("--b", default="1,8", help="engine micro-batch sizes (default %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 5; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="fresh-process runs per method (default 3; quick 1)")
    p.add_argument("--batch-size", type=int, default=256, help="expected batch size q N (default %(default)s)")
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads in each run (default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run before it is killed")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 1 repeat, results in <out>/quick")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results; quick: <out>/quick)")
    p.add_argument("--machine", default=None, help="machine tag in file names (default cpu<cores>-t<threads>)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS + OPTIONAL_METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS + OPTIONAL_METHODS)}")
    args.b = [int(x) for x in args.b.split(",") if x.strip()]
    if args.epochs is None:
        args.epochs = 1 if args.quick else 5
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child is not None:
        import warnings

        warnings.simplefilter("ignore")
        result = run_child(json.loads(args.child))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    out_dir = args.out or DEFAULT_OUT
    if args.quick:
        out_dir = os.path.join(out_dir, "quick")
    os.makedirs(out_dir, exist_ok=True)
    if args.device.startswith("cuda"):
        tag = args.machine or "cuda"
    else:
        tag = args.machine or f"cpu{os.cpu_count()}-t{args.threads}"
    t0 = time.perf_counter()
    env = environment(args)
    cfgs = configs(args)
    results: dict[int, list[dict]] = {i: [] for i in range(len(cfgs))}
    rng = random.Random(args.seed)
    for rep in range(args.repeats):
        order = list(range(len(cfgs)))
        rng.shuffle(order)
        for i in order:
            res = spawn(cfgs[i], args.timeout)
            results[i].append(res)
            what = res.get("error") or (f"{res['wall_s']:.2f} s wall, step median "
                                        f"{statistics.median(res['step_ms']):.2f} ms, acc {res['accuracy']:.3f}")
            log(f"[dp_loop] run {rep + 1}/{args.repeats} {label(cfgs[i])}: {what}")
    env["load_end"] = __import__("benchmarks.measure", fromlist=["machine_load"]).machine_load()
    summaries = [summarise(cfg, results[i]) for i, cfg in enumerate(cfgs)]
    seconds = time.perf_counter() - t0
    md = render_markdown(summaries, env, args, seconds)
    base = os.path.join(out_dir, f"{tag}-dp-loop")
    with open(base + ".md", "w") as fh:
        fh.write(md)
    with open(base + ".json", "w") as fh:
        json.dump({"env": env, "settings": {k: v for k, v in vars(args).items() if k != "child"},
                   "summaries": summaries, "runs": [results[i] for i in range(len(cfgs))]}, fh, indent=1,
                  default=str)
    print(md, flush=True)
    log(f"done in {seconds:.0f} s; wrote:\n  {base}.md\n  {base}.json")
    failed = [s["label"] for s in summaries if not s.get("wall_s")]
    return 1 if failed and len(failed) == len(summaries) else 0


if __name__ == "__main__":
    raise SystemExit(main())
