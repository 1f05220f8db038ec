"""Seconds per DP-SGD step of a Fashion-MNIST Table 1 model, engine or Opacus, on random inputs of the row's shape.

    python -m experiments.fmnist_speed scatcnn engine [--steps 5]
    python -m experiments.fmnist_speed scatcnn opacus

Why: the per-epoch times of the 40-epoch runs (``experiments.fmnist``) mostly measure the shared
machine's load; comparing implementations needs them timed back to back, in one shell loop, at
one load. This times the steady state only (the median of ``--steps`` steps after 3 warm-up
steps: the engine's first step times its routes and checks itself against autograd) of one
batch of 2048 at b=1, one thread, and prints the engine's routes. To time an older engine, run
the same command from a checkout of that commit.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from .fmnist import COMMON, ROWS, scatter_cnn, tanh_cnn

SHAPES = {"scatcnn": (81, 7, 7), "cnn": (1, 28, 28)}


def step_seconds(row: str, method: str, steps: int = 5, batch: int = 2048) -> tuple[float, float, dict]:
    """``(first step s, median steady step s, engine routes)`` of ``row`` (``scatcnn`` or ``cnn``) with ``method``."""
    torch.manual_seed(0)
    x = torch.randn(2 * batch, *SHAPES[row])
    y = torch.randint(0, 10, (2 * batch,))
    model = scatter_cnn() if row == "scatcnn" else tanh_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=ROWS[row]["lr"], momentum=COMMON["momentum"])
    net, engine = model, None
    if method == "engine":
        import dp_microclip

        engine = dp_microclip.attach(
            model, opt, micro_batch_size=1, max_grad_norm=COMMON["max_grad_norm"], seed=0,
            privacy=dp_microclip.DP(noise_multiplier=ROWS[row]["noise_multiplier"], delta=COMMON["delta"],
                                    sample_rate=batch / 60000, expected_batch_size=batch, sampling="poisson"))
    else:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        net = GradSampleModule(model)
        opt = DPOptimizer(opt, noise_multiplier=ROWS[row]["noise_multiplier"], max_grad_norm=COMMON["max_grad_norm"],
                          expected_batch_size=batch)
    times = []
    for i in range(steps + 3):
        xb, yb = x[(i % 2) * batch:(i % 2 + 1) * batch], y[(i % 2) * batch:(i % 2 + 1) * batch]
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    steady = sorted(times[3:])
    return times[0], steady[len(steady) // 2], dict(engine.last_strategies) if engine is not None else {}


def main(argv=None) -> None:
    """Command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("row", choices=list(SHAPES))
    p.add_argument("method", choices=["engine", "opacus"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    first, steady, routes = step_seconds(args.row, args.method, args.steps)
    print(f"{args.row} {args.method}: first step {first:.1f} s, steady median {steady:.3f} s/step {routes}")


if __name__ == "__main__":
    main()
