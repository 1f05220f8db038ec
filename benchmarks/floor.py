"""``python -m benchmarks.floor``: how close the engine's step is to what clipping must cost at least.

The bench MLP (784-512-512-10, B=256) is clipped three ways in one process, steps interleaved so that all
three see the same load:

* ``plain``: plain PyTorch, no clipping;
* ``floor``: micro-batch clipping written by hand for this one model, with nothing a general tool needs:
  no hooks, no layout probe, no records, no non-finite handling, no route choice. The forward keeps each
  Linear's input, ``torch.autograd.grad`` gives the output gradients, the group norms come from
  ``||a|| ||g||`` (b=1) or Gram matrices (b>1), and each weight's clipped sum is one matmul of the
  row-weighted output gradient, as the engine computes them;
* ``engine``: ``dp_microclip.attach(model, opt, micro_batch_size=b)`` on an unchanged copy.

Printed: the median over rounds of each one's step, the ratios floor / plain and engine / plain, and the
engine's time over the floor in milliseconds: the cost of the engine's generality (hooks, bookkeeping,
non-finite handling), which on a small model is a fixed cost per step and on a large one vanishes
against the matmuls. The floor is checked against the naive loop before anything is timed.

Run: ``python -m benchmarks.floor --threads 1 --rounds 40`` (also ``--b 1,8``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import dp_microclip
from dp_microclip.reference import naive_microbatch_grads

from .models import loss_fn, make_workload

C = 1.0


class HandWritten:
    """Micro-batch clipping of the bench MLP by hand (the floor): the same arithmetic as the engine, no engine."""

    def __init__(self, model, b: int):
        self.model, self.b = model, b
        self.linears = [m for m in model if isinstance(m, torch.nn.Linear)]
        for p in model.parameters():
            p.requires_grad_(False)  # autograd computes input gradients only, as with the engine
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def grads(self, x, y) -> None:
        """Write the clipped, averaged gradient into ``.grad`` (mean loss, bound C)."""
        h, acts, outs = x.flatten(1), [], []
        for i, layer in enumerate(self.linears):
            acts.append(h)
            o = F.linear(h, layer.weight, layer.bias)
            if i == 0:
                o.requires_grad_(True)
            outs.append(o)
            h = torch.relu(o) if i < len(self.linears) - 1 else o
        batch = x.shape[0]
        grads = torch.autograd.grad(loss_fn(h, y), outs)  # dL/d(output) of each Linear, mean loss: 1/B each
        m, b = batch // self.b, self.b
        if b == 1:
            sq = sum((a.square().sum(1) + 1) * g.square().sum(1) for a, g in zip(acts, grads))  # (B,)
        else:
            sq = 0
            for a, g in zip(acts, grads):
                a3, g3 = a.reshape(m, b, -1), g.reshape(m, b, -1)
                gram_g = torch.bmm(g3, g3.transpose(1, 2))
                sq = sq + (torch.bmm(a3, a3.transpose(1, 2)) * gram_g).sum((1, 2)) + gram_g.sum((1, 2))
        mean_norm = sq.sqrt() * (batch / b)  # the group mean's gradient norm
        weight = (1.0 / torch.clamp(mean_norm / C, min=1.0)) * (batch / b) / m  # clip, then average over groups
        rows = weight if b == 1 else weight.repeat_interleave(b)
        for a, g, layer in zip(acts, grads, self.linears):
            gw = g * rows[:, None]
            layer.weight.grad = gw.t() @ a
            layer.bias.grad = gw.sum(0)

    def step(self, x, y) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.grads(x, y)
        self.opt.step()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--b", default="1,8", help="comma-separated micro-batch sizes (default %(default)s)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    work = make_workload("mlp", "cpu")
    x, y = work.inputs, work.targets
    print(f"bench MLP, B={x.shape[0]}, {args.threads} thread(s), {args.rounds} rounds, torch {torch.__version__}")
    for b in (int(v) for v in args.b.split(",")):
        floor = HandWritten(work.fresh_model(), b)
        floor.grads(x, y)
        want = naive_microbatch_grads(work.fresh_model(), loss_fn, x, y, micro_batch_size=b, max_grad_norm=C)
        for name, param in floor.model.named_parameters():
            err = float((param.grad - want[name]).norm() / want[name].norm())
            if err > 1e-4:
                print(f"the hand-written floor is wrong at b={b}: {name} relative error {err:.1e}")
                return 1
        plain_model, engine_model = work.fresh_model(), work.fresh_model()
        plain_opt = torch.optim.SGD(plain_model.parameters(), lr=1e-3)
        engine_opt = torch.optim.SGD(engine_model.parameters(), lr=1e-3)
        dp_microclip.attach(engine_model, engine_opt, micro_batch_size=b, max_grad_norm=C)

        def plain_step():
            plain_opt.zero_grad(set_to_none=True)
            loss_fn(plain_model(x), y).backward()
            plain_opt.step()

        def engine_step():
            engine_opt.zero_grad(set_to_none=True)
            loss_fn(engine_model(x), y).backward()
            engine_opt.step()

        steps = {"plain": plain_step, "floor": lambda: floor.step(x, y), "engine": engine_step}
        for step in steps.values():
            for _ in range(5):
                step()
        times: dict = {name: [] for name in steps}
        ratios: dict = {"floor": [], "engine": []}
        for r in range(args.rounds):
            order = list(steps) if r % 2 == 0 else list(reversed(steps))
            this = {}
            for name in order:
                start = time.perf_counter()
                steps[name]()
                this[name] = time.perf_counter() - start
            for name, t in this.items():
                times[name].append(t)
            for name in ratios:
                ratios[name].append(this[name] / this["plain"])
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        print(f"b={b}: plain {med['plain']:.2f} ms, floor {med['floor']:.2f} ms "
              f"({statistics.median(ratios['floor']):.3f}x), engine {med['engine']:.2f} ms "
              f"({statistics.median(ratios['engine']):.3f}x); engine - floor {med['engine'] - med['floor']:+.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
