"""``torch.compile`` of a model with the engine attached: graph breaks, where they come from, and step times.

For each model: plain and engine (b=1, ``grad_mode="bookkeeping"``), eager and ``torch.compile(model)``;
``torch._dynamo.explain`` of the forward + loss gives the graph count and the break reasons (grouped by
reason and the user frame they point at); the step time is the median of ``--steps`` user steps after
``--warmup`` (compilation happens there); the compiled engine's gradients are checked against the eager
engine's on the same batch (max relative difference).

Run: ``python -m benchmarks.compiled [--models mlp transformer] [--steps 20]``. CPU timings are noisy on a
shared machine; the graph counts and break reasons are deterministic.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import dp_microclip

from .models import loss_fn, make_workload


def _setup(workload, engine: bool):
    model = workload.fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    eng = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0, grad_mode="bookkeeping",
                              verify_steps=0) if engine else None
    return model, opt, eng


def explain(workload, engine: bool) -> tuple[int, int, list[str]]:
    """(graphs, breaks, ["count x file:line: reason"]) of the forward + loss."""
    import torch._dynamo as dynamo

    model, opt, eng = _setup(workload, engine)
    loss_fn(model(workload.inputs), workload.targets).backward()  # the engine's layout probe runs eagerly first
    opt.step()
    dynamo.reset()
    out = dynamo.explain(lambda x, y: loss_fn(model(x), y))(workload.inputs, workload.targets)
    reasons: dict[str, int] = {}
    for brk in out.break_reasons:
        frame = brk.user_stack[-1] if brk.user_stack else None
        where = f"{frame.filename.split('/')[-1]}:{frame.lineno}" if frame else "?"
        key = f"{where}: {brk.reason.splitlines()[0][:120]}"
        reasons[key] = reasons.get(key, 0) + 1
    if eng is not None:
        eng.detach()
    return out.graph_count, out.graph_break_count, [f"{n}x {k}" for k, n in sorted(reasons.items(), key=lambda kv: -kv[1])]


def time_steps(workload, engine: bool, compiled: bool, steps: int, warmup: int) -> tuple[float, dict]:
    """Median step ms and the last step's gradients."""
    import torch._dynamo as dynamo

    dynamo.reset()
    model, opt, eng = _setup(workload, engine)
    run = torch.compile(model) if compiled else model
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(run(workload.inputs), workload.targets).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if eng is not None:
        eng.detach()
    return 1e3 * statistics.median(times), grads


def main(argv=None) -> int:
    """Print, per model, the graph breaks and the four step times as markdown."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in args.models:
        work = make_workload(name, "cpu")
        print(f"## {name}\n")
        for engine in (False, True):
            graphs, breaks, reasons = explain(work, engine)
            print(f"- {'engine b=1' if engine else 'plain'}: {graphs} graph(s), {breaks} break(s)")
            for line in reasons:
                print(f"  - {line}")
        print("\n| method | eager ms | compiled ms | compiled / eager |\n|---|---|---|---|")
        grads = {}
        for engine in (False, True):
            eager, g_eager = time_steps(work, engine, False, args.steps, args.warmup)
            comp, g_comp = time_steps(work, engine, True, args.steps, args.warmup)
            grads[engine] = (g_eager, g_comp)
            print(f"| {'engine b=1' if engine else 'plain'} | {eager:.2f} | {comp:.2f} | {comp / eager:.2f}x |")
        g_eager, g_comp = grads[True]
        diff = max(float((g_comp[n] - g).norm() / g.norm().clamp(min=1e-30)) for n, g in g_eager.items())
        print(f"\nCompiled engine vs eager engine gradients: max relative difference {diff:.1e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
