"""``torch.compile`` of a model with the engine attached: graphs, graph breaks, and step times against compiled plain.

For each model: ``torch._dynamo.explain`` of the forward + loss (after one eager step, so the engine's
layout probe is done) gives the graph count and the break reasons (grouped by reason and the user frame
they point at), for plain and the engine at b=1. Then six runners, plain and the engine
(``grad_mode="bookkeeping"``) at b=1 and b=8, each eager and ``torch.compile(model)``, are warmed up
(``--warmup`` steps: compilation happens there) and timed **interleaved**, one step of each in turn,
``--steps`` rounds; the table gives each runner's median step. "graphs" counts the graphs dynamo
compiled for that runner in the warm-up and in the timed steps (0 there: no recompilation). The
compiled engine's gradients are compared with the eager engine's on the same batch (max relative
difference over the parameters; the tests compare both with the naive loop).

Run: ``python -m benchmarks.compiled [--models mlp transformer] [--steps 20]``. CPU timings are noisy on a
shared machine (the load average is printed with each table); the graph counts and break reasons are
deterministic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

import dp_microclip

from .models import loss_fn, make_workload

METHODS = ("plain", "engine b=1", "engine b=8")


class UserRoot(torch.nn.Module):
    """A thin root of the user's own class around a model (``--wrap-root``): dynamo resumes in its forward
    after the engine's eager root hook, so an ``nn.Sequential`` compiles to one graph instead of one per layer."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


WRAP_ROOT = False  # set by --wrap-root


def _setup(workload, method: str):
    model = UserRoot(workload.fresh_model()) if WRAP_ROOT else workload.fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    eng = None
    if method != "plain":
        eng = dp_microclip.attach(model, opt, micro_batch_size=int(method.split("=")[1]), max_grad_norm=1.0,
                                  grad_mode="bookkeeping", verify_steps=0)
    return model, opt, eng


def explain(workload, method: str) -> tuple[int, int, list[str]]:
    """(graphs, breaks, ["count x file:line: reason"]) of the forward + loss."""
    import torch._dynamo as dynamo

    model, opt, eng = _setup(workload, method)
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


class Runner:
    """One method, eager or compiled, stepping on the workload's batch; counts the graphs dynamo compiles."""

    def __init__(self, workload, method: str, compiled: bool):
        self.workload, self.method, self.compiled = workload, method, compiled
        self.model, self.opt, self.engine = _setup(workload, method)
        self.graphs = 0
        self.warm_graphs = 0  # graphs compiled during the warm-up steps
        self.times: list[float] = []

        def backend(gm, example_inputs):
            from torch._inductor.compile_fx import compile_fx

            self.graphs += 1
            return compile_fx(gm, example_inputs)

        self.run = torch.compile(self.model, backend=backend) if compiled else self.model

    def step(self, timed: bool) -> None:
        """One user step (zero_grad, forward, loss, backward, optimizer step)."""
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss_fn(self.run(self.workload.inputs), self.workload.targets).backward()
        self.opt.step()
        if timed:
            self.times.append(time.perf_counter() - start)

    def grads(self) -> dict:
        """The last step's gradients."""
        return {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def interleaved(workload, steps: int, warmup: int) -> dict[tuple[str, bool], Runner]:
    """Every (method, compiled) runner warmed up, then timed one step each in turn."""
    import torch._dynamo as dynamo

    dynamo.reset()
    runners = {(m, c): Runner(workload, m, c) for m in METHODS for c in (False, True)}
    for runner in runners.values():
        for _ in range(warmup):
            runner.step(timed=False)
        runner.warm_graphs = runner.graphs
    for _ in range(steps):
        for runner in runners.values():
            runner.step(timed=True)
    return runners


def main(argv=None) -> int:
    """Print, per model, the graph breaks and the interleaved step times as markdown."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--wrap-root", action="store_true",
                        help="attach to and compile a thin user-class root around each model (UserRoot)")
    args = parser.parse_args(argv)
    global WRAP_ROOT
    WRAP_ROOT = args.wrap_root
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name in args.models:
        work = make_workload(name, "cpu")
        print(f"## {name}\n")
        for method in ("plain", "engine b=1"):
            graphs, breaks, reasons = explain(work, method)
            print(f"- {method}: {graphs} graph(s), {breaks} break(s)")
            for line in reasons:
                print(f"  - {line}")
        load_before = os.getloadavg()[0]
        runners = interleaved(work, args.steps, args.warmup)
        load_after = os.getloadavg()[0]
        ms = {k: 1e3 * statistics.median(r.times) for k, r in runners.items()}
        print(f"\nInterleaved, {args.steps} rounds after {args.warmup} warm-up steps; load average "
              f"{load_before:.1f} before, {load_after:.1f} after.\n")
        print("| method | eager ms | compiled ms | compiled / eager | compiled / compiled plain | graphs (warm-up / "
              "timed) |\n|---|---|---|---|---|---|")
        for m in METHODS:
            comp = runners[(m, True)]
            print(f"| {m} | {ms[(m, False)]:.2f} | {ms[(m, True)]:.2f} | {ms[(m, True)] / ms[(m, False)]:.2f}x | "
                  f"{ms[(m, True)] / ms[('plain', True)]:.2f}x | {comp.warm_graphs} / "
                  f"{comp.graphs - comp.warm_graphs} |")
        print()
        for m in METHODS[1:]:
            g_eager, g_comp = runners[(m, False)].grads(), runners[(m, True)].grads()
            diff = max(float((g_comp[n] - g).norm() / g.norm().clamp(min=1e-30)) for n, g in g_eager.items())
            print(f"Compiled vs eager {m} gradients: max relative difference {diff:.1e}")
        print()
        for runner in runners.values():
            if runner.engine is not None:
                runner.engine.detach()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
