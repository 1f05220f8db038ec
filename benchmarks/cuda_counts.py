"""CUDA kernel launches and host synchronisations per training step, counted by the profiler on a GPU.

``benchmarks.launches`` counts aten ops on the CPU, a deterministic stand-in for kernel launches (a few aten
ops are several kernels, a few none). On a GPU the profiler sees the real thing: every call of the CUDA
runtime or driver that launches a kernel, and every call that makes the host wait for the device. The GPU
run (``benchmarks/gpu.py``, bench section) puts both beside each method's step time, so the CPU count can be
checked against the device it stands in for.

Counted, per step (the profiled steps come after warm-up steps, and the mean is taken over them):

* kernels: calls of :data:`KERNEL_LAUNCHES` (``cudaLaunchKernel`` and its variants, ``cuLaunchKernel``);
* syncs: calls of :data:`SYNCS` (a stream, device or event synchronisation: what ``.item()``, ``.cpu()``
  or ``bool(tensor)`` wait in);
* copies: ``cudaMemcpy*`` calls (host-device copies; a device-to-host one comes with a sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel", "cuLaunchKernel",
                   "cuLaunchKernelEx")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
         "cuCtxSynchronize")
COPIES = ("cudaMemcpy", "cudaMemcpyAsync", "cudaMemcpy2DAsync", "cuMemcpyDtoHAsync", "cuMemcpyHtoDAsync")


@dataclass(frozen=True)
class StepCounts:
    """Mean CUDA runtime calls per step: kernel launches, host synchronisations, host-device copies."""

    kernels: float
    syncs: float
    copies: float


STEP_MARK = "dp_microclip.count_step"  # the record_function range around each counted step


def classify(names: Iterable[str], steps: int) -> StepCounts:
    """Per-step counts from the names of the host-side events inside ``steps`` counted steps."""
    kernels = syncs = copies = 0
    for name in names:
        if name.startswith(KERNEL_LAUNCHES):
            kernels += 1
        elif name.startswith(SYNCS):
            syncs += 1
        elif name.startswith(COPIES):
            copies += 1
    return StepCounts(kernels / steps, syncs / steps, copies / steps)


def count_step(step: Callable[[], None], device: torch.device, steps: int = 3, warmup: int = 2) -> StepCounts:
    """Run ``step`` ``warmup`` times, then profile ``steps`` steps on ``device`` (CUDA) and count their calls.

    The device is synchronised before the profile starts and after it stops, outside the counted region.
    """
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        raise ValueError(f"counting CUDA runtime calls needs a CUDA device, not {device}")
    for _ in range(warmup):
        step()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            with torch.profiler.record_function(STEP_MARK):
                step()
    torch.cuda.synchronize(device)
    events = list(prof.events())
    return classify(inside_steps(events), steps)


def inside_steps(events: list) -> list[str]:
    """The names of the events that start inside a :data:`STEP_MARK` range (so the profiler's own
    synchronisation when it stops is not counted)."""
    ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == STEP_MARK]
    return [e.name for e in events if e.name != STEP_MARK
            and any(start <= e.time_range.start <= end for start, end in ranges)]
