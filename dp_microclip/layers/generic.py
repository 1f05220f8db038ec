"""The generic path: per-group gradients with ``torch.func`` for modules without a rule.

For a module ``f`` with parameters ``theta``, captured inputs ``X`` and output
gradient ``G``, the gradient of group ``j`` is ``grad_theta <f(theta, X_j), G_j>``.
It is computed for all groups at once with ``vmap(grad(...))`` over the groups,
padded to equal size (padding rows get a zero output gradient, so they add
nothing; their inputs are copies of a real row so the forward stays finite).
A tensor whose rows the layout probe found flattened with another axis
(``(B*T, d)``, a row map ``rows.Fold``) arrives as ``(B, T, d)``; each group's
``(R, T, d)`` is flattened back into the module's own layout for the replay,
and its output regrouped the same way.

Exact only for modules that treat examples independently (no BatchNorm, no
cross-example attention, no randomness inside). The engine says so once per
module, lists them in ``engine.summary()``, and in DP mode uses this path only
when the user allowed it with ``fallback="generic"``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Protocol

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import UnsupportedModuleError
from ..grouping import Groups
from ..tensors import output_tensors


def generic_group_grads(
    module: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: tuple,
    kwargs: dict,
    out_grad: torch.Tensor | tuple,
    groups: Groups,
    batch_dim: int | tuple,
    replay_guard: Callable[[], AbstractContextManager],
    path: str,
    input_dims: tuple = (),
    kw_names: tuple = (),
) -> dict[str, torch.Tensor]:
    """Materialised group gradients ``{name: (M, *param.shape)}`` of ``module``'s own parameters.

    ``inputs`` are batch-first tensors (their own layout's batch dimension in
    ``input_dims``, default ``batch_dim``), or ``Shared`` wrappers around tensors
    without a batch dimension, passed to every group unchanged. ``batch_dim`` is
    the output's batch dimension. ``replay_guard`` switches the engine's hooks off
    while the module is re-run.
    """
    names = list(params)
    values = {n: params[n].detach() for n in names}
    tensor_pos = [i for i, x in enumerate(inputs) if torch.is_tensor(x)]
    padded = tuple(groups.pad_like_first(inputs[i]) for i in tensor_pos)  # each (M, R, ...)
    multi = isinstance(out_grad, tuple)  # several output tensors (an RNN's output and hidden states)
    out_dims = batch_dim if multi else (batch_dim,)
    grads_in = out_grad if multi else (out_grad,)
    padded_grad = tuple(None if g is None else groups.pad(g) for g in grads_in)  # each (M, R, ...)

    def group_loss(param_values, group_inputs, group_grad):
        args = list(inputs)
        for i, arg in enumerate(args):
            if isinstance(arg, tuple) and hasattr(arg, "_fields") and arg._fields == ("value",):
                args[i] = arg.value  # a Shared input: the same for every group
        for i, x in zip(tensor_pos, group_inputs):
            dim = input_dims[i] if i < len(input_dims) and input_dims[i] is not None else (
                0 if isinstance(batch_dim, tuple) else batch_dim)
            args[i] = own_layout(x, dim)  # back to the module's own layout
        call_kwargs = dict(kwargs)
        if kw_names:  # tensor keyword arguments travel as the last inputs
            for name, value in zip(kw_names, args[len(args) - len(kw_names):]):
                call_kwargs[name] = value
            args = args[:len(args) - len(kw_names)]
        out = functional_call(module, param_values, tuple(args), call_kwargs)
        outs = [out] if torch.is_tensor(out) else output_tensors(out)
        total = 0.0
        for o, g, d in zip(outs, group_grad, out_dims):
            if g is not None and d is not None:
                total = total + (batch_leading(o, d, g.shape[0]) * g).sum()  # <output, its gradient>
        return total

    if isinstance(module, nn.RNNBase) and module.training and module.dropout > 0:
        raise UnsupportedModuleError(
            f"{path or 'the model'} ({type(module).__name__}) has dropout={module.dropout} between its layers: "
            "replaying it per micro-batch would draw other dropout masks than the forward did, so its per-example "
            "gradients would not be exact. Create it with dropout=0 (apply nn.Dropout to its output instead)."
        )
    try:
        with replay_guard():
            grads = vmap(grad(group_loss), in_dims=(None, 0, tuple(None if g is None else 0 for g in padded_grad)))(
                values, padded, padded_grad)
    except RuntimeError as err:  # e.g. randomness or in-place buffer updates under vmap
        if isinstance(module, nn.RNNBase):
            # torch's fused RNN kernels have no batching rule on every backend: one small backward per group.
            with replay_guard(), torch.enable_grad():
                return _group_loop(group_loss, values, padded, padded_grad, groups.num_groups)
        raise UnsupportedModuleError(
            f"{path or 'the model'} ({type(module).__name__}) has no rule and could not be "
            f"replayed per micro-batch with torch.func ({err}). Register a rule with "
            "dp_microclip.register_rule(...), or move its parameters into supported layers."
        ) from err
    return dict(grads)


class Folded(Protocol):
    """A row map of a dimension that holds ``k`` rows per example (``rows.Fold``, learned by the layout probe):
    ``dim`` is the flattened dimension, ``example_major`` whether row ``r`` belongs to example ``r // k``
    (``(B, k)`` flattened) or to ``r % B`` (``(k, B)`` flattened, torch's sequence-first order)."""

    dim: int
    example_major: bool


def own_layout(x: torch.Tensor, dim: int | Folded) -> torch.Tensor:
    """A group's batch-first tensor ``x`` back in the module's own layout: the batch moved to ``dim``, or,
    for a folded dimension, its ``(rows, k)`` (or ``(k, rows)``) flattened again into ``dim``."""
    if isinstance(dim, int):
        return x.movedim(0, dim)
    if dim.example_major:  # x (R, k, ...) with the fold's other axes in place: rows r*k + j
        return x.movedim(0, dim.dim).flatten(dim.dim, dim.dim + 1)
    return x.movedim(0, dim.dim + 1).flatten(dim.dim, dim.dim + 1)  # (k, R) flattened: rows j*R + r


def batch_leading(out: torch.Tensor, dim: int | Folded, rows: int) -> torch.Tensor:
    """The inverse of :func:`own_layout` for a group of ``rows`` examples: the batch (and a fold's ``k``) first."""
    if isinstance(dim, int):
        return out.movedim(dim, 0)
    if dim.example_major:
        return out.unflatten(dim.dim, (rows, -1)).movedim(dim.dim, 0)
    return out.unflatten(dim.dim, (-1, rows)).movedim(dim.dim + 1, 0)


def _group_loop(group_loss, values: dict, padded: tuple, padded_grad: tuple, num_groups: int) -> dict:
    """The same group gradients as the vmap route, one ``torch.autograd.grad`` per group."""
    names = list(values)
    per_group: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for j in range(num_groups):
        leaves = {n: v.detach().requires_grad_() for n, v in values.items()}
        loss = group_loss(leaves, tuple(x[j] for x in padded), tuple(None if g is None else g[j] for g in padded_grad))
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            per_group[n].append(torch.zeros_like(values[n]) if g is None else g)
    return {n: torch.stack(gs) for n, gs in per_group.items()}  # each (M, *param.shape)
