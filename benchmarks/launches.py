"""Kernel launches and host synchronisations per training step: plain, the engine at b=1 and b=8, and DP mode.

On a GPU a small model's step time is set by how many kernels it launches and
how often the host waits for the device, not by the arithmetic. This counts
both on the CPU, where they are deterministic:

* launches: every aten op dispatched during one steady-state step (forward,
  backward, ``optimizer.step()``), counted with a ``TorchDispatchMode``;
  view-only ops (``view``, ``reshape`` aliases, ``transpose``, ``expand``,
  ``t``, ``permute``, ``as_strided``, ``detach``, ``alias``, ...) are left
  out, as they launch no kernel;
* host synchronisations: ops that copy a device value to the host
  (``aten::item``, ``aten::_local_scalar_dense``, ``aten::is_nonzero``,
  ``aten::nonzero``, ``aten::equal``, ``aten::allclose``) or whose output size
  depends on the values (``unique``, ``masked_select``); on a GPU each one
  stalls the launch queue.

Run: ``python -m benchmarks.launches`` (``--models mlp cnn transformer``,
``--json PATH``). The counts do not depend on the machine's load.

``--nonfinite ROUNDS`` compares the two ways to keep a NaN/inf micro-batch out of the sums: on the
device (its rows zeroed with ``masked_fill`` in every tensor the sums read, no host read: what an
accelerator does, and what the counts above show), against one host read per pass (``bad.any()``
read back; masking only when it is true: the CPU default, ``tensors.DEVICE_PATHS_ON_CPU``). Same engine,
the two switched step by step (interleaved), ``ROUNDS`` steps each: launches, syncs and the median
step time. On a CPU a host read waits for no device, so the times show only what the masking costs.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dp_microclip

from .models import MAIN_MODELS, loss_fn, make_workload

VIEW_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "transpose", "t", "expand", "permute", "as_strided", "detach", "alias",
    "unsqueeze", "squeeze", "slice", "select", "unbind", "split", "split_with_sizes", "chunk", "narrow",
    "movedim", "flatten", "unflatten", "view_as", "expand_as", "_reshape_alias", "lift_fresh", "numpy_T",
    "diagonal", "unfold",
})
#: Ops that read a device value on the host: a copy to a Python value, or an output whose size depends on the
#: values (``unique`` must know how many there are before it can allocate its result).
SYNC_OPS = frozenset({"item", "_local_scalar_dense", "is_nonzero", "nonzero", "equal", "allclose",
                      "_unique", "_unique2", "unique_dim", "unique_consecutive", "masked_select"})


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops (kernel launches) and host synchronisations dispatched while active."""

    def __init__(self, sources: bool = False):
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        #: with ``sources=True``: (op, the innermost ``dp_microclip`` file:line that dispatched it, or "torch/user")
        self.sources: Counter | None = Counter() if sources else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs[name] += 1
        if name not in VIEW_OPS:
            self.ops[name] += 1
            if self.sources is not None:
                self.sources[(name, _engine_line())] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> int:
        """Kernel launches counted (view-only ops excluded)."""
        return sum(self.ops.values())


def _engine_line() -> str:
    """The innermost frame in the library that led to the current op (``file.py:line``), else "torch/user"."""
    import sys

    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "/dp_microclip/" in path:
            return f"{path.split('/dp_microclip/')[1]}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "torch/user"


def _setup(workload, method: str):
    model = workload.fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    engine = None
    if method.startswith("b="):  # "b=8" (the ghost route everywhere) or "b=8 materialize"
        b, _, mode = method[2:].partition(" ")
        engine = dp_microclip.attach(model, opt, micro_batch_size=int(b), max_grad_norm=1.0,
                                     grad_mode=mode or "bookkeeping", verify_steps=0)
    elif method == "dp b=1":
        engine = dp_microclip.attach(
            model, opt, micro_batch_size=1, max_grad_norm=1.0, grad_mode="bookkeeping", verify_steps=0,
            privacy=dp_microclip.DP(noise_multiplier=1.0, sample_rate=0.01, expected_batch_size=workload.batch_size,
                                    sampling="poisson", delta=1e-5, accountant="rdp",
                                    require_verified_loss=False))  # the same loss line as plain, for the count
    return model, opt, engine


def _stepper(model_name: str, method: str):
    """(one training step of ``method`` on the model's CPU workload, the engine or None): what both counters time."""
    workload = make_workload(model_name, "cpu")
    model, opt, engine = _setup(workload, method)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(workload.inputs), workload.targets).backward()
        opt.step()

    return step, engine


def _count(model_name: str, method: str, sources: bool = False) -> LaunchCounter:
    step, engine = _stepper(model_name, method)

    for _ in range(2):  # warm up: the layout probe, route choice and first-step work are not steady state
        step()
    counter = LaunchCounter(sources)
    with counter:
        step()
    if engine is not None:
        engine.detach()
    return counter


def count(model_name: str, method: str, sources: bool = False) -> tuple[int, int, Counter]:
    """(launches, host syncs, op counts) of one steady-state step of ``method`` on ``model_name``, on the path
    an accelerator takes (``tensors.DEVICE_PATHS_ON_CPU``: non-finite groups masked on the device, keys summed
    without ``unique``: no host read).
    With ``sources=True`` the op counts are keyed by (op, the library line that dispatched it)."""
    from dp_microclip import tensors

    previous, tensors.DEVICE_PATHS_ON_CPU = tensors.DEVICE_PATHS_ON_CPU, True
    try:
        counter = _count(model_name, method, sources)
    finally:
        tensors.DEVICE_PATHS_ON_CPU = previous
    return counter.launches, sum(counter.syncs.values()), counter.sources if sources else counter.ops


METHODS = ("plain", "b=1", "b=8", "dp b=1")
#: The same micro-batch sizes on the other route: every layer's group gradients materialised. ``auto`` (the
#: default) picks a route per layer by timing it, so its count is not deterministic; these two rows bound it
#: (``grad_mode="bookkeeping"``, the rows above, takes the ghost norms wherever a rule has them).
MATERIALIZED = ("b=1 materialize", "b=8 materialize")


def nonfinite_tradeoff(model_name: str, method: str, rounds: int) -> dict:
    """Launches, syncs and median step ms of device-side zeroing vs one host read, interleaved on one engine."""
    import statistics
    import time

    from dp_microclip import tensors

    variants = {"device": True, "host read": False}  # tensors.DEVICE_PATHS_ON_CPU
    step, engine = _stepper(model_name, method)

    out: dict = {}
    previous = tensors.DEVICE_PATHS_ON_CPU
    try:
        for name, mask in variants.items():
            tensors.DEVICE_PATHS_ON_CPU = mask
            for _ in range(2):
                step()
            counter = LaunchCounter()
            with counter:
                step()
            out[name] = {"launches": counter.launches, "syncs": sum(counter.syncs.values()), "times": []}
        for _ in range(rounds):
            for name, mask in variants.items():
                tensors.DEVICE_PATHS_ON_CPU = mask
                start = time.perf_counter()
                step()
                out[name]["times"].append(time.perf_counter() - start)
    finally:
        tensors.DEVICE_PATHS_ON_CPU = previous
        if engine is not None:
            engine.detach()
    for row in out.values():
        row["ms"] = 1e3 * statistics.median(row.pop("times"))
    return out


def main(argv=None) -> int:
    """Print a markdown table of launches and syncs per step (and write JSON with ``--json``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.launches", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MAIN_MODELS), help="bench models (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the counts to this JSON file")
    parser.add_argument("--top", type=int, default=0, help="print the N most frequent ops of each engine row")
    parser.add_argument("--sources", action="store_true",
                        help="print every engine row's ops with the library line that dispatched each")
    parser.add_argument("--nonfinite", type=int, default=0, metavar="ROUNDS",
                        help="only compare device-side non-finite zeroing with one host read, ROUNDS steps each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.nonfinite:
        import os

        print(f"load average {os.getloadavg()[0]:.1f}\n")
        print("| model | method | zeroing | launches | host syncs | median step ms |\n|---|---|---|---|---|---|")
        for name in args.models:
            for method in ("b=1", "b=8", "dp b=1"):
                for variant, row in nonfinite_tradeoff(name, method, args.nonfinite).items():
                    print(f"| {name} | {method} | {variant} | {row['launches']} | {row['syncs']} | {row['ms']:.2f} |")
        print(f"\nload average {os.getloadavg()[0]:.1f}")
        return 0
    rows = {}
    print("| model | method | launches | x plain | host syncs |")
    print("|---|---|---|---|---|")
    for name in args.models:
        plain = None
        for method in METHODS + MATERIALIZED:
            launches, syncs, ops = count(name, method)
            plain = plain or launches
            rows[f"{name} {method}"] = {"launches": launches, "syncs": syncs, "ratio": launches / plain}
            print(f"| {name} | {method} | {launches} | {launches / plain:.2f}x | {syncs} |")
            if args.top and method != "plain":
                print("    " + ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))
            if args.sources and method != "plain":
                for (op, line), n in sorted(count(name, method, sources=True)[2].items(), key=lambda kv: kv[0][1]):
                    print(f"    {n:3d} {op:28s} {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
