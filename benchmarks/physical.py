"""``python -m benchmarks.physical``: a DP step of a large logical batch in physical chunks, time and peak memory.

The bench CNN (``benchmarks.models.CNN``, 28x28 inputs), DP mode (b = 1, C = 1,
z = 1), batches from ``engine.data_loader`` (Poisson) over a synthetic
MNIST-shaped data set of N = 20,480 records, the user's loop unchanged
(``zero_grad; loss.backward(); step`` after every chunk the loader yields).
Settings, each in its own fresh ``python`` process:

* ``2048 in chunks of 256``: q = 0.1 (expected logical batch 2,048),
  ``engine.data_loader(..., max_physical_batch_size=256)``: about 8 forward and
  backward passes per optimizer update, one noise draw, one ledger step;
* ``one chunk of 256``: q = 256/N (expected batch 256), no chunking;
* ``2048 in one pass``: q = 0.1 without chunking (what chunking saves).

Per setting: the median time of one logical step (every chunk's loading,
forward, backward and ``step``, over ``--steps`` logical steps after one
warm-up step that pays the autotuner and the first-step check), and the peak
memory: the process's peak resident set size (``VmHWM`` from
``/proc/self/status``, reset through ``/proc/self/clear_refs`` after the
warm-up) during the timed steps, minus the resident size after building the
model, data set, engine and loader (before the warm-up), as ``benchmarks/measure.py``
does; the absolute peak is reported beside it. Results go to
``<out>/<machine>-physical.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 20480
SETTINGS = {  # name -> (expected logical batch, max_physical_batch_size)
    "2048 in chunks of 256": (2048, 256),
    "one chunk of 256": (256, None),
    "2048 in one pass": (2048, None),
}
TAG = "PHYSICAL_RESULT "


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM := current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def child(name: str, steps: int, threads: int, seed: int) -> dict:
    """One setting, in this (fresh) process."""
    import torch
    import torch.nn.functional as F

    import dp_microclip
    from benchmarks.models import CNN

    torch.set_num_threads(threads)
    batch, chunk = SETTINGS[name]
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(N, 1, 28, 28, generator=g), torch.randint(0, 10, (N,), generator=g)
    data = torch.utils.data.TensorDataset(images, labels)
    torch.manual_seed(seed)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0, seed=seed,
                                 privacy=dp_microclip.DP(noise_multiplier=1.0, sample_rate=batch / N, delta=1e-5))
    loader = iter(engine.data_loader(data, max_physical_batch_size=chunk))
    rss_setup = _status_mb("VmRSS")

    def logical_step() -> tuple[int, int, int]:
        start, examples, passes, largest = engine.steps_taken, 0, 0, 0
        while engine.steps_taken == start:
            x, y = next(loader)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            examples, passes, largest = examples + len(x), passes + 1, max(largest, len(x))
        return examples, passes, largest

    logical_step()  # warm-up: the autotuner's timings and the first-step check against autograd
    rss_before = _status_mb("VmRSS")
    peak_reset = _reset_peak()
    times, examples, passes, largest = [], [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        e, p, big = logical_step()
        times.append(time.perf_counter() - t0)
        examples.append(e)
        passes.append(p)
        largest.append(big)
    peak = _status_mb("VmHWM")
    return {
        "setting": name, "expected_logical_batch": batch, "max_physical_batch_size": chunk,
        "step_s": times, "median_step_s": statistics.median(times), "logical_batch_sizes": examples,
        "passes_per_step": passes, "largest_pass": max(largest), "ledger_steps": engine.steps_taken,
        "rss_setup_mb": rss_setup, "rss_before_mb": rss_before, "peak_rss_mb": peak, "extra_peak_mb": peak - rss_setup,
        "peak_reset": peak_reset, "threads": threads,
    }


def main(argv=None) -> None:
    """Run every setting in its own process, then write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed logical steps per setting (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--machine", default=None, help="file name tag (default cpu<cores>-t<threads>)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print(TAG + json.dumps(child(args.child, args.steps, args.threads, args.seed)), flush=True)
        return

    import torch

    results = []
    for name in SETTINGS:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.physical", "--child", name, "--steps", str(args.steps),
             "--threads", str(args.threads), "--seed", str(args.seed)],
            cwd=ROOT, capture_output=True, text=True, check=False)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(TAG)]
        if proc.returncode or not lines:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len(TAG):]))
        r = results[-1]
        print(f"{name}: {1000 * r['median_step_s']:.0f} ms per logical step, extra peak {r['extra_peak_mb']:.0f} MB",
              file=sys.stderr, flush=True)

    machine = args.machine or f"cpu{os.cpu_count()}-t{args.threads}"
    os.makedirs(args.out, exist_ok=True)
    base = next(r for r in results if r["setting"] == "one chunk of 256")
    load = os.getloadavg()
    lines = [
        "# dp-microclip: a DP step of a large logical batch in physical chunks (bench CNN)", "",
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {args.threads}; torch {torch.__version__}; Python {platform.python_version()}; load average "
        f"{load[0]:.2f} (1 min) at the end. Command: `python -m benchmarks.physical --steps {args.steps}`.", "",
        f"Bench CNN, DP mode (b = 1, C = 1, z = 1), Poisson batches from `engine.data_loader` over N = {N} "
        "synthetic 28x28 records, SGD with momentum; each setting in a fresh process. `ms / logical step`: median "
        f"over {args.steps} logical steps after one warm-up step (every chunk's loading, forward, backward and "
        "`step`). `extra peak MB`: peak resident set size (VmHWM, reset after the warm-up) during the timed steps "
        "minus the resident size after building model, data set (64 MB), engine and loader; `peak RSS MB`: the "
        "absolute peak (CPU RSS, not tracemalloc, which does not see torch's allocator).", "",
        "| setting | logical batch (mean) | passes / step | largest pass | ms / logical step | time / one chunk "
        "| extra peak MB | extra / one chunk | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['setting']} | {statistics.mean(r['logical_batch_sizes']):.0f} | "
            f"{statistics.mean(r['passes_per_step']):.1f} | {r['largest_pass']} | {1000 * r['median_step_s']:.0f} | "
            f"{r['median_step_s'] / base['median_step_s']:.1f}x | {r['extra_peak_mb']:.0f} | "
            f"{r['extra_peak_mb'] / max(base['extra_peak_mb'], 1e-9):.2f}x | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Raw results: the `.json` file beside this one."]
    stem = os.path.join(args.out, f"{machine}-physical")
    with open(stem + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as fh:
        json.dump({"machine": machine, "results": results}, fh, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
