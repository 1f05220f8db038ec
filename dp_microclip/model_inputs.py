"""The model's inputs as the layout probe sees them: every tensor leaf, each cut along its own batch dimension.

``layout.py`` learns where the batch is in each input; this file holds what it does with the inputs
themselves: list their tensor leaves in a fixed order, build the key of an input signature (shapes with the
batch dimension left out), cut the inputs to other examples, and list the dimensions that may hold the batch.
"""

from __future__ import annotations

import torch

from .tensors import map_tensors


def tensor_leaves(args, kwargs) -> list[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in the model's ``(args, kwargs)``, in a fixed order."""
    found: list[tuple[str, torch.Tensor]] = []
    _visit(args, "args", found)
    _visit(kwargs, "kwargs", found)
    return found


def _visit(obj, name: str, found: list) -> None:
    # A module-level function, not a closure: a recursive closure is a reference cycle that only the
    # garbage collector frees, once per forward.
    if torch.is_tensor(obj):
        found.append((name, obj))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _visit(item, f"{name}.{i}", found)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _visit(v, f"{name}.{k}", found)


def select_all(args, kwargs, input_dims: tuple, order: list[int]) -> tuple:
    """The inputs holding the examples ``order`` (in that order), each cut along its own batch dimension."""
    names = [n for n, _ in tensor_leaves(args, kwargs)]
    dims = dict(zip(names, input_dims))
    index = torch.tensor(order)

    def cut(path: str, t: torch.Tensor) -> torch.Tensor:
        dim = dims.get(path)
        return t if dim is None else t.index_select(dim, index.to(t.device))

    return map_tensors(args, cut, "args"), map_tensors(kwargs, cut, "kwargs")


def structure(leaves) -> tuple:
    """The inputs' structure without their shapes: which leaves, their ranks, dtypes and devices (the key
    under which their learned batch dimensions are kept)."""
    return tuple((n, t.dim(), t.dtype, t.device.type) for n, t in leaves)


def shapes_key(leaves, dims: tuple, batch: int) -> tuple:
    """An input signature: every leaf's shape with its batch dimension left out (Poisson batches change
    only B, so they share one probe)."""
    # B = 1 gets its own probe: with one example, a row map cannot be told from an example's own rows.
    return (batch == 1,) + tuple(
        (n, tuple(-1 if d == dim else s for d, s in enumerate(t.shape)), t.dtype, t.device.type)
        for (n, t), dim in zip(leaves, dims))


def describe(leaves, dims) -> str:
    """The inputs and a candidate batch dimension of each, for error messages."""
    return ", ".join(f"{n} {tuple(t.shape)}: {'none' if d is None else d}" for (n, t), d in zip(leaves, dims))


def candidates(t: torch.Tensor, batch: int, d0: int) -> list:
    """The dimensions of a model input that may hold the batch, the first input's first; None when none can."""
    dims = [d for d in range(t.dim()) if t.shape[d] == batch]
    if not dims:
        return [None]
    # Several dimensions of the batch size ((T, T) causal masks, (B, T) masks with T = B): maybe none is the batch.
    return sorted(dims, key=lambda d: (d != d0, d)) + ([None] if len(dims) > 1 else [])
