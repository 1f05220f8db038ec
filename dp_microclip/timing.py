"""Timing candidates against each other: the measurement behind every "pick the fastest" in the engine.

Used by the autotuner (``aggregate.Autotuner``: which route per layer) and by
the conv rule (``layers/conv.py``: which layout per shape). Each candidate runs
once to warm up, then all run in interleaved repeats and each keeps its best
time, so that a burst of load from elsewhere hits every candidate alike.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(candidates: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Best wall-clock seconds of each candidate over ``repeats`` interleaved runs (after one warm-up each)."""
    for run in candidates.values():
        run()
    best = {name: math.inf for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best
