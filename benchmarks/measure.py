"""Timing (interleaved, paired with plain steps) and peak memory (one fresh process per method).

Timing: every method, plain included, gets its warm-up steps first. Then, for
each round, the methods run in a fresh random order; each method's step is
timed right after a plain step, and the ratio of the two is one sample. The
reported ratio is the median of those paired ratios, so slow drifts of the
machine's load (other processes, thermal limits) cancel; ms/step is the median
of the method's own step times.

What is timed (``mode``):

* ``"user"`` (default): the user's whole step, ``opt.zero_grad(); loss = ...;
  loss.backward(); opt.step()``, exactly as a training loop runs it. Python's
  garbage collector stays on and is never called by the harness, and nothing is
  freed outside the clock: the previous step's gradients are dropped by the
  ``zero_grad()`` at the start of the timed step (for plain and every method
  alike), so whatever a method leaves behind is paid for inside its own step.
* ``"isolated"`` (the method of the earlier tables): ``gc.collect()`` before each
  timed pair and the gradients freed after each step, outside the clock. Kept
  to explain differences with older numbers (``--timing isolated``).

Memory: each method runs in its own process, forked from a forkserver that has
imported torch, Opacus and dp_microclip, so one method's allocator state never
leaks into another's number. On CPU the number is the peak resident set size
(VmHWM, reset through /proc/self/clear_refs where the kernel allows it) during
two steps, minus the resident size after building the model, batch and method;
on CUDA it is ``torch.cuda.max_memory_allocated`` minus the allocated memory
before the steps.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import statistics
import time
import traceback
from dataclasses import dataclass, field

import torch

from .methods import MethodSpec, Runner, _sync, make_runner
from .models import make_workload


@dataclass
class Timing:
    ms: list = field(default_factory=list)  # this method's step times (ms)
    ratios: list = field(default_factory=list)  # paired ratios to the plain step just before

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms) if self.ms else float("nan")

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")

    @property
    def ratio_iqr(self) -> tuple[float, float]:
        if len(self.ratios) < 2:
            return (self.ratio, self.ratio)
        q = statistics.quantiles(self.ratios, n=4, method="inclusive")
        return (q[0], q[2])


TIMING_MODES = ("user", "isolated")


def timed_step(runner: Runner, mode: str = "user") -> float:
    """One step of ``runner`` in ms (device-synchronised before and after).

    ``mode="user"``: the step alone; what it leaves (gradients, garbage) is freed
    by the next step's own ``zero_grad()`` and by the collector, inside the clock.
    ``mode="isolated"``: the gradients are freed after the clock stops.
    """
    device = runner.work.device
    _sync(device)
    start = time.perf_counter()
    runner.step()
    _sync(device)
    elapsed = time.perf_counter() - start
    if mode == "isolated":
        runner.release()
    return elapsed * 1e3


def interleaved(
    plain: Runner, runners: dict[str, Runner], *, rounds: int, warmup: int, slow_ms: float,
    slow_rounds: int, seed: int = 0, progress=None, mode: str = "user",
) -> tuple[Timing, dict[str, Timing]]:
    """Time ``runners`` round-robin, each step paired with a plain step. Returns (plain, {key: Timing}).

    ``mode``: ``"user"`` (the whole user step, collector on, nothing freed outside
    the clock) or ``"isolated"`` (``gc.collect()`` before each pair, gradients freed
    outside the clock); see the module docstring.

    A method whose warm-up step takes more than ``slow_ms`` is timed in the first
    ``slow_rounds`` rounds only (still interleaved with the others), so one very
    slow method does not eat the time budget.
    """
    if mode not in TIMING_MODES:
        raise ValueError(f"timing mode {mode!r} is not one of {TIMING_MODES}")
    warm_ms: dict[str, float] = {}
    for _ in range(warmup):
        timed_step(plain, mode)
    for key, runner in runners.items():
        for _ in range(warmup):
            warm_ms[key] = timed_step(runner, mode)
    plain_t = Timing()
    out = {key: Timing() for key in runners}
    rng = random.Random(seed)
    for r in range(rounds):
        order = list(runners)
        rng.shuffle(order)
        for key in order:
            if warm_ms.get(key, 0.0) > slow_ms and r >= slow_rounds:
                continue
            if mode == "isolated":
                gc.collect()
            tp = timed_step(plain, mode)
            tm = timed_step(runners[key], mode)
            plain_t.ms.append(tp)
            out[key].ms.append(tm)
            out[key].ratios.append(tm / tp)
        if progress:
            progress(r + 1, rounds)
    return plain_t, out


# ------------------------------------------------------------------------------ memory
_KB = 1024.0


def _proc_status_kb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _current_rss_mb() -> float:
    rss = _proc_status_kb("VmRSS")
    if rss is not None:
        return rss / _KB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _KB  # best effort (no /proc)


def _peak_rss_mb() -> float:
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm / _KB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / _KB


def _memory_child(conn, model, batch_size, seq_len, device, spec, max_grad_norm, threads, steps):
    try:
        torch.set_num_threads(threads)
        work = make_workload(model, device, batch_size, seq_len)
        runner = make_runner(spec, work, max_grad_norm)
        dev = work.device
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        else:
            exact = _reset_peak_rss()
            base = _current_rss_mb()
        for _ in range(steps):
            runner.step()
            runner.release()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            extra = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
            how = "cuda max_memory_allocated"
        else:
            extra = _peak_rss_mb() - base
            how = "peak RSS (VmHWM)" if exact else "peak RSS (ru_maxrss, not reset: upper bound)"
        conn.send(("ok", extra, how))
    except BaseException as err:  # report, never hang the parent
        conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc(limit=3)))
    finally:
        conn.close()


_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        methods = mp.get_all_start_methods()
        if "forkserver" in methods:
            _CONTEXT = mp.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(["torch", "opacus", "dp_microclip", "benchmarks.methods", "benchmarks.measure"])
        else:
            _CONTEXT = mp.get_context("spawn")
    return _CONTEXT


def peak_memory_mb(model: str, batch_size: int, seq_len, device, spec: MethodSpec, max_grad_norm: float,
                   threads: int, steps: int = 2, timeout_s: float = 180.0) -> tuple[float | None, str]:
    """Extra peak memory (MB) of ``steps`` training steps of ``spec``, measured in a fresh process."""
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_memory_child,
        args=(child, model, batch_size, seq_len, str(device), spec, max_grad_norm, threads, steps),
        daemon=True,
    )
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            proc.kill()
            proc.join()
            return None, f"timeout after {timeout_s:.0f} s"
        status, value, detail = parent.recv()
    except EOFError:
        proc.join()
        return None, f"process died (exit code {proc.exitcode}; out of memory?)"
    finally:
        parent.close()
    proc.join(timeout=10)
    if status != "ok":
        return None, value
    return float(value), detail


def machine_load() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"{one:.2f} (1 min), {five:.2f} (5 min)"
    except OSError:
        return "n/a"


def _cpu_times() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as fh:
            fields = [float(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields), idle


def cpu_busy_fraction(window_s: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``window_s`` (Linux /proc/stat; None elsewhere)."""
    a = _cpu_times()
    time.sleep(window_s)
    b = _cpu_times()
    if a is None or b is None or b[0] <= a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def wait_for_quiet(max_wait_s: float, threshold: float = 0.2, log=print) -> float | None:
    """Wait until other processes keep less than ``threshold`` of the CPUs busy, for at most ``max_wait_s``.

    Timings on a shared machine are only comparable when nothing else runs: with
    2 cores and 2 torch threads, one other busy process slows OpenMP regions by
    an order of magnitude. Returns the last busy fraction seen.
    """
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy_fraction()
    while busy is not None and busy > threshold and time.monotonic() < deadline:
        log(f"  machine busy ({busy:.0%} of CPUs used by other processes); waiting...")
        time.sleep(4.0)
        busy = cpu_busy_fraction()
    return busy
