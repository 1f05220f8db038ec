"""A ViT-like model whose root holds a bare class token and position table, with ConvNeXt-style layer-scale
gammas in its blocks: one training step, plain PyTorch vs the usage route vs the generic path it took before.

The model: patches from a conv (stride 4 on 32x32 images: 64 tokens), ``cat(cls_token, x) + pos_embed`` on the
root module, ``depth`` pre-norm blocks (MHA-free: LayerNorm, Linear-GELU-Linear MLP, a ``gamma`` layer scale
on a block without a rule), head on the class token. Defaults B=32, d=64, depth=2. Methods:

* ``plain``: plain PyTorch, the floor;
* ``usage b=1``, ``usage b=8``: ``dp_microclip.attach`` (noise-free, ``grad_mode="auto"``): the root's
  ``cls_token`` / ``pos_embed`` and the blocks' ``gamma`` take the usage route (``dp_microclip/usage.py``);
* ``generic b=1``, ``generic b=8``: the same, with the usage route made to recognise nothing while the
  method runs, so those modules take the generic ``torch.func`` path they took before.

Timing as in ``benchmarks/rnn.py``: copies per method, warm-up steps, then interleaved rounds; the median
of each method's step time and of its per-round ratio to plain; one thread. Before timing, each method's
clipped gradient is checked against the naive loop in float64.

Run: ``python -m benchmarks.usage_route`` (``--rounds 15``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip
from dp_microclip.layers import usage_mode
from dp_microclip.reference import naive_microbatch_grads


class LayerScaleBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        return x + self.gamma * self.fc2(F.gelu(self.fc1(self.norm(x))))


class ViTLike(nn.Module):
    def __init__(self, d=64, depth=2, classes=10):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 65, d))
        self.blocks = nn.Sequential(*[LayerScaleBlock(d) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.blocks(x)[:, 0])


@contextlib.contextmanager
def generic_only():
    """The usage route recognises nothing: every module without a rule takes the generic path, as before."""
    original = usage_mode.UsageMode._dispatch

    def refuse(self, func, args, kwargs):
        raise usage_mode.NotRecognised("benchmark: the generic path")

    usage_mode.UsageMode._dispatch = refuse
    try:
        yield
    finally:
        usage_mode.UsageMode._dispatch = original


def _method(model, b, generic):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=1.0) if b else None

    def step(x, y):
        with generic_only() if generic else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    return step, engine


def check(b: int, generic: bool) -> float:
    """Relative error of one method's clipped gradient against the naive loop (float64, B=8)."""
    torch.manual_seed(0)
    model = ViTLike(d=16, depth=1).double()
    pristine = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    step, engine = _method(model, b, generic)
    step(x, y)
    want = naive_microbatch_grads(pristine, F.cross_entropy, (x,), y, micro_batch_size=b, max_grad_norm=1.0)
    err = max(float((p.grad - want[n]).norm() / want[n].norm()) for n, p in model.named_parameters())
    assert engine is not None
    routes = set(engine.last_strategies.values())
    assert ("func" in routes) == generic, routes
    engine.detach()
    return err


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = {"plain": (0, False), "usage b=1": (1, False), "usage b=8": (8, False),
               "generic b=1": (1, True), "generic b=8": (8, True)}
    for name, (b, generic) in methods.items():
        if b:
            print(f"{name}: max rel err vs naive loop {check(b, generic):.1e}")
    torch.manual_seed(0)
    base = ViTLike()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    steps = {name: _method(copy.deepcopy(base), b, generic)[0] for name, (b, generic) in methods.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            step(x, y)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(x, y)
            times[name].append(time.perf_counter() - start)
    print(f"\nViT-like, B={args.batch}, d=64, depth=2, 65 tokens, CPU, 1 thread; median of {args.rounds} rounds")
    print("| method | step (ms) | ratio to plain |\n|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(t / p for t, p in zip(ts, times["plain"]))
        print(f"| {name} | {1000 * statistics.median(ts):.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
