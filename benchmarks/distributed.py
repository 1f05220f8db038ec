"""1 rank vs 2 ranks (gloo, CPU): step time and peak memory of dp_microclip.distributed on a small MLP.

Every configuration runs in its own freshly spawned processes (one per rank, one
thread each), over a file store in a temporary folder. The global batch is fixed
and split evenly between the ranks, so 2 ranks do half the work each plus the
communication. Methods:

* ``plain``: plain PyTorch, wrapped in ``DistributedDataParallel`` when there are 2 ranks
  (the baseline: what data parallelism costs without clipping);
* ``noise-free``: ``dp_microclip.distributed.attach(..., micro_batch_size=8, max_grad_norm=1)``;
* ``dp``: ``micro_batch_size=1``, ``noise_multiplier=1``, the global public M (one noise draw).

Step time: median over the timed steps of rank 0's wall time for ``zero_grad``,
forward, loss, backward and ``optimizer.step()`` (the all-reduce included).
Memory: the largest increase of a rank's resident set size over the warm-up and
timed steps (VmHWM, reset after building the model and the batch, minus VmRSS
then): activations, captured inputs, gradients, communication buffers.

Usage: ``python -m benchmarks.distributed [--steps 15] [--batch 256] [--out benchmarks/results/cpu2-distributed.md]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

METHODS = ("plain", "noise-free", "dp")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rank(rank: int, world: int, store: str, method: str, batch: int, steps: int, warmup: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    import dp_microclip
    import dp_microclip.distributed as mcd

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if method == "plain":
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    else:
        kw = dict(micro_batch_size=8, max_grad_norm=1.0, grad_mode="bookkeeping")
        if method == "dp":
            kw = dict(micro_batch_size=1, max_grad_norm=1.0, grad_mode="bookkeeping",
                      privacy=dp_microclip.DP(noise_multiplier=1.0, sample_rate=0.01, expected_batch_size=batch,
                                              sampling="poisson"))
        mcd.attach(model, opt, **kw)
        net = model
    g = torch.Generator().manual_seed(rank)
    local = batch // world
    x, y = torch.randn(local, 784, generator=g), torch.randint(0, 10, (local,), generator=g)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    before = _rss_kb("VmRSS")  # model, optimizer, batch and (2 ranks) the process group built
    exact = _reset_peak()
    for _ in range(warmup):
        step()
    dist.barrier()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _rss_kb("VmHWM") - before if exact else float("nan")
    result = torch.tensor([statistics.median(times) * 1e3, peak / 1024])
    gathered = [torch.zeros(2, dtype=result.dtype) for _ in range(world)]
    dist.all_gather(gathered, result)
    if rank == 0:
        torch.save(torch.stack(gathered), out)
    dist.destroy_process_group()


def run(method: str, world: int, batch: int, steps: int, warmup: int) -> torch.Tensor:
    """(world, 2): per rank, median ms/step and peak RSS increase (MB)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.start_processes(_rank, args=(world, os.path.join(tmp, "store"), method, batch, steps, warmup, out),
                           nprocs=world, start_method="spawn", join=True)
        return torch.load(out)


def main(argv=None) -> None:
    """Run every method on 1 and 2 ranks and write a markdown table (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="global batch size (split between the ranks)")
    parser.add_argument("--out", default="benchmarks/results/cpu2-distributed.md")
    args = parser.parse_args(argv)
    rows = []
    load_before = os.getloadavg()[0]
    for method in METHODS:
        ms = {}
        for world in (1, 2):
            res = run(method, world, args.batch, args.steps, args.warmup)
            ms[world] = float(res[0, 0])
            mem = ", ".join(f"{float(v):.1f}" for v in res[:, 1])
            rows.append(f"| {method} | {world} | {args.batch // world} | {ms[world]:.1f} | "
                        f"{ms[1] / ms[world]:.2f}x | {mem} |")
            print(rows[-1], flush=True)
    load_after = os.getloadavg()[0]
    text = "\n".join([
        "# dp_microclip.distributed: 1 vs 2 ranks (gloo, CPU)",
        "",
        f"MLP 784-256-256-10, global batch {args.batch} split evenly, SGD; one thread per rank; "
        f"{args.warmup} warm-up and {args.steps} timed steps; torch {torch.__version__}; "
        f"made by `python -m benchmarks.distributed` on {datetime.date.today()}.",
        "",
        f"**Loaded machine**: {os.cpu_count()} CPU cores shared with other jobs (1-minute load average "
        f"{load_before:.1f} before, {load_after:.1f} after), so the numbers are indicative only; repeated "
        "runs move them by tens of percent.",
        "",
        "| method | ranks | rows per rank | ms/step (rank 0, median) | speed-up vs 1 rank "
        "| peak RSS increase per rank (MB) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "`plain` is plain PyTorch (DistributedDataParallel on 2 ranks); `noise-free` is b = 8, C = 1; `dp` is "
        "b = 1, z = 1 with the global public M (grad_mode=\"bookkeeping\" for both).",
        "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
