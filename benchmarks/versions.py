"""Two versions of the engine timed in one process: is a change slower on this machine, step for step?

On a shared, loaded CPU two separate runs differ by more than most changes do. This imports both
``dp_microclip`` trees in one process (copied under the names ``dpm_old`` and ``dpm_new``; the package's
own imports are relative), attaches each to its own copy of a bench model and times their steps
alternately (the order flips every round), so that both see the same load. Printed: the median of the
per-round ratios new / old, and each one's median step.

Run: ``python -m benchmarks.versions OLD_TREE NEW_TREE --models mlp,cnn,transformer --rounds 15``, where a
tree is a checkout's root (``git archive <commit> | tar -x -C DIR`` makes one of any commit). Same settings
as ``benchmarks.launches`` (``grad_mode="bookkeeping"``, ``verify_steps=0``, DP: z=1, declared Poisson
sampling), 1 thread.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .models import loss_fn, make_workload


def _stepper(model_name: str, pkg, method: str):
    w = make_workload(model_name, "cpu")
    model = w.fresh_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kw: dict = dict(micro_batch_size=int(method.split("=")[1]), max_grad_norm=1.0, grad_mode="bookkeeping",
                    verify_steps=0)
    if method.startswith("dp"):
        kw["privacy"] = pkg.DP(noise_multiplier=1.0, sample_rate=0.01, expected_batch_size=w.batch_size,
                               sampling="poisson", delta=1e-5, accountant="rdp", require_verified_loss=False)
    pkg.attach(model, opt, **kw)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(w.inputs), w.targets).backward()
        opt.step()

    return step


def main(argv=None) -> int:
    """Print, per model and method, the median new/old step-time ratio of two engine trees."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versions", description=__doc__.split("\n")[0])
    parser.add_argument("old", help="root of the old tree (holds dp_microclip/)")
    parser.add_argument("new", help="root of the new tree")
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--methods", default="b=1,b=8,dp b=1")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    packages = tempfile.mkdtemp()
    for name, root in (("dpm_old", args.old), ("dpm_new", args.new)):
        shutil.copytree(Path(root) / "dp_microclip", Path(packages) / name)
    sys.path.insert(0, packages)
    pkgs = {name: importlib.import_module(f"dpm_{name}") for name in ("old", "new")}
    for model_name in args.models.split(","):
        cells = []
        for method in args.methods.split(","):
            steps = {name: _stepper(model_name, pkg, method) for name, pkg in pkgs.items()}
            for step in steps.values():
                for _ in range(2):
                    step()
            times: dict = {name: [] for name in steps}
            for i in range(args.rounds):
                for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
                    start = time.perf_counter()
                    steps[name]()
                    times[name].append(time.perf_counter() - start)
            ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
            cells.append(f"{method}: new/old {ratio:.3f} (old {1e3 * statistics.median(times['old']):.1f} ms, "
                         f"new {1e3 * statistics.median(times['new']):.1f} ms)")
        print(f"{model_name}: " + " | ".join(cells), flush=True)
    shutil.rmtree(packages, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
