"""RNN classifiers: one training step, plain PyTorch vs the engine's RNN rule vs the old generic path.

The model: ``x (B, T, d) -> nn.LSTM / nn.GRU (hidden H, batch_first) -> Linear on h_n[-1]``,
cross-entropy loss, SGD. Defaults B=64, T=32, d=64, H=128. Methods:

* ``plain``: plain PyTorch, the floor;
* ``rule b=1``, ``rule b=8``: ``dp_microclip.attach`` (noise-free, ``grad_mode="auto"``): the RNN
  runs step by step and each weight matrix is clipped by the Linear rule (``dp_microclip/layers/rnn.py``);
* ``generic b=1``, ``generic b=8``: the same, with the RNN route switched off while ``attach`` runs
  (``units.is_captured_rnn``), so the RNN takes the ``torch.func`` path it took before (the head keeps
  its Linear rule).

Timing: every method gets its own copy of the model; after warm-up steps (the first step verifies
against autograd and times the routes) the methods run one step each per round, interleaved, so
a burst of load from elsewhere hits all alike. Reported: the median over rounds of each method's
step time and of its per-round ratio to the plain step. One thread (``torch.set_num_threads(1)``)
so that the numbers are steadier on a shared machine.

Run: ``python -m benchmarks.rnn`` (``--models lstm,gru --rounds 15 --out benchmarks/results``).
Before timing, every method's clipped gradient is checked against the naive loop
(``dp_microclip.reference``) on the same batch, in float64 on a smaller copy of the shapes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from dp_microclip import units
from dp_microclip.reference import naive_microbatch_grads

CLASSES = 10


class Classifier(nn.Module):
    """``x (B, T, d)`` -> RNN -> Linear on the last layer's final hidden state."""

    def __init__(self, kind: str, d: int, hidden: int):
        super().__init__()
        self.rnn = getattr(nn, kind)(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        _, h = self.rnn(x)
        h = h[0] if isinstance(h, tuple) else h  # LSTM: (h_n, c_n)
        return self.head(h[-1])


def _attach(model: nn.Module, b: int, generic: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    saved = units.is_captured_rnn
    if generic:  # the RNN falls through to the generic path, as before it had a route of its own
        units.is_captured_rnn = lambda module: False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the generic-path notice
            engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=1.0)
    finally:
        units.is_captured_rnn = saved
    route = "generic torch.func" if generic else "RNN capture + Linear rule"
    assert f"rnn: {type(model.rnn).__name__} -> {route}" in engine.summary(), engine.summary()
    return opt, engine


def _methods(kind: str, d: int, hidden: int, bs: list[int], dtype=torch.float32, seed: int = 0) -> dict:
    """Every method's own copy of one model (copied before any attach: a copy would share the hooks)."""
    torch.manual_seed(seed)
    base = Classifier(kind, d, hidden).to(dtype)
    plain = copy.deepcopy(base)
    methods: dict = {"plain": (plain, (torch.optim.SGD(plain.parameters(), lr=0.01), None)),
                     "reference": (copy.deepcopy(base), (None, None))}
    for b in bs:
        for generic in (False, True):
            model = copy.deepcopy(base)
            methods[f"{'generic' if generic else 'rule'} b={b}"] = (model, _attach(model, b, generic))
    return methods


def _step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def check(kind: str, bs: list[int]) -> dict:
    """Worst relative error of every method's clipped gradient against the naive loop (float64, small shapes)."""
    errors = {}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (8,), generator=g)
    methods = _methods(kind, 5, 7, bs, torch.float64)
    reference = methods.pop("reference")[0]
    for name, (model, (opt, engine)) in methods.items():
        if engine is None:
            continue
        b = int(name.split("b=")[1])
        want = naive_microbatch_grads(reference, F.cross_entropy, x, y, micro_batch_size=b, max_grad_norm=1.0)
        opt.param_groups[0]["lr"] = 0.0  # the step writes the clipped gradient and changes nothing
        _step(model, opt, x, y)
        errors[name] = max(float((p.grad - want[n]).norm() / want[n].norm()) for n, p in model.named_parameters())
    return errors


def run(kind: str, B: int, T: int, d: int, hidden: int, bs: list[int], rounds: int, warmup: int) -> dict:
    """Median step times (ms) and median per-round ratios to plain for every method."""
    methods = _methods(kind, d, hidden, bs)
    del methods["reference"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, d, generator=g)
    y = torch.randint(0, CLASSES, (B,), generator=g)
    for model, (opt, _) in methods.values():
        for _ in range(warmup):
            _step(model, opt, x, y)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, (model, (opt, _)) in methods.items():
            start = time.perf_counter()
            _step(model, opt, x, y)
            times[name].append((time.perf_counter() - start) * 1e3)
    plain = times["plain"]
    return {name: {"ms": statistics.median(ts), "ratio": statistics.median(t / p for t, p in zip(ts, plain)),
                   "times_ms": ts} for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    """Check every method against the naive loop, time them, print a table and write it to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lstm,gru")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--b", default="1,8")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for rnn.md and rnn.json (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bs = [int(b) for b in args.b.split(",")]
    shape = f"B={args.batch_size}, T={args.seq_len}, d={args.features}, H={args.hidden}"
    lines = [f"# RNN classifiers: one training step ({shape}, float32, CPU, 1 thread)", "",
             "Median over interleaved rounds; ratio: median of the per-round ratios to the plain step. "
             "rule: dp_microclip's RNN rule; generic: the torch.func path RNNs took before it. "
             "Error: worst relative error of the clipped gradient against the naive loop (float64, B=8, T=6).", "",
             "| model | method | ms/step | ratio to plain | error vs naive loop |", "|---|---|---|---|---|"]
    data: dict = {"settings": vars(args), "results": {}}
    for kind in args.models.split(","):
        name = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}[kind]
        errors = check(name, bs)
        result = run(name, args.batch_size, args.seq_len, args.features, args.hidden, bs, args.rounds, args.warmup)
        data["results"][kind] = {"errors": errors, "timings": result}
        for method, r in result.items():
            err = f"{errors[method]:.1e}" if method in errors else ""
            lines.append(f"| {name} | {method} | {r['ms']:.1f} | {r['ratio']:.2f} | {err} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "rnn.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "rnn.json"), "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
