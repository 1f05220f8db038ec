"""Small helpers over nests of tensors and the dtypes the engine accumulates in (no engine state).

Layer rules, the hooks and the step all need the same two facts, so they live
here once: which tensors a nested output holds, and that 16-bit gradients are
accumulated in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

#: The 16-bit floating dtypes. Clipped sums of parameters in these dtypes are kept in float32
#: (rounding a sum of many small clipped terms in 16 bits loses most of them) and cast back at the step.
LOW_PRECISION = (torch.float16, torch.bfloat16)


#: Whether the engine takes its accelerator paths on CPU tensors too. On an accelerator, a value read on the host
#: (``bool(t)``, the output size of ``torch.unique``) waits for every queued kernel, so there the engine spends a
#: few extra kernels instead (masking without asking whether any group is bad; summing per key without
#: ``unique``). A CPU tensor's value is read without waiting for any device, and the form with the read is the
#: cheaper one there. ``benchmarks/launches.py`` sets this to count the accelerator's path on the CPU; the tests
#: set it to check both forms against each other.
DEVICE_PATHS_ON_CPU = False


def avoid_host_reads(device: torch.device) -> bool:
    """Whether work on ``device`` should avoid reading tensor values on the host (see ``DEVICE_PATHS_ON_CPU``)."""
    return DEVICE_PATHS_ON_CPU or device.type != "cpu"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine sums a parameter's clipped gradients in: float32 for 16-bit, else ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def output_tensors(output) -> list[torch.Tensor]:
    """The tensors of a layer's output, in order: the output itself, or those inside a tuple/list/dict
    (an RNN returns ``(out, h_n)`` or ``(out, (h_n, c_n))``)."""
    if torch.is_tensor(output):
        return [output]
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    return [x for x in leaves if torch.is_tensor(x)]


def first_tensor(obj) -> torch.Tensor | None:
    """The first tensor in a nest of tuples, lists and dicts (the model's batch-carrying input)."""
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(obj, dict):
        return first_tensor(list(obj.values()))
    return None


def expand_at(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` (size 1 at ``dim``) expanded to ``size`` there without copying: one value shared by the batch."""
    return x.expand(*[size if d == dim else -1 for d in range(x.dim())])


class RequireGrad(torch.autograd.Function):
    """``y = x`` that requires grad, so a tensor hook on ``y`` receives dL/dy.

    Returns a copy, not ``x`` itself: an input returned as-is becomes a view that a
    later in-place op (``ReLU(inplace=True)``) may not modify. The copy costs one
    pass over the output, far less than the input-gradient product that making the
    layer's input require grad would cost. Nothing flows further back.
    """

    @staticmethod
    def forward(ctx, anchor, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


def map_tensors(obj, fn: Callable[[str, torch.Tensor], torch.Tensor], path: str):
    """``obj`` rebuilt with every tensor ``t`` at ``path`` replaced by ``fn(path, t)``.

    Walks dataclasses (HuggingFace ``ModelOutput`` is a dict and a dataclass: rebuilt from its fields), named
    tuples, tuples, lists and dicts; anything else is kept as is. Paths name items as ``path.i`` / ``path.key``.
    One walker for every "the same inputs, other rows" the engine builds (the layout probe, the loss check).
    """
    if torch.is_tensor(obj):
        return fn(path, obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: map_tensors(getattr(obj, f.name), fn, f"{path}.{f.name}")
                            for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(map_tensors(o, fn, f"{path}.{i}") for i, o in enumerate(obj)))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(o, fn, f"{path}.{i}") for i, o in enumerate(obj))
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn, f"{path}.{k}")) for k, v in obj.items())
    return obj
