"""A module without a rule whose inputs carry no batch and whose output has none: gradients by its own VJP.

BEiT's ``BeitRelativePositionBias`` resamples its table with ``F.interpolate``,
gathers it with a fixed index and returns ``(1, heads, N, N)``: whatever it
computes, it computes a function ``f(theta)`` of its parameters alone (its
inputs, if any, are the same for every example). Its output is the same for
every example, so ``shared_outputs.py`` follows it to where it meets the batch
and reads there each example's output gradient ``G_i`` (``(B, *output.shape)``).
Example ``i``'s gradient of ``theta`` is then the vector-Jacobian product
``J_f(theta)^T G_i``, and a group's gradient is that of the group's summed
``G``, by linearity. So one batch-free replay of the module's own forward
(``torch.func.vjp`` through ``functional_call``, under the engine's replay
guard so that its hooks capture nothing) and one product per group, vmapped
(a loop where an operation has no batching rule), give every group's gradient
exactly, whatever operations the module uses. No replay per micro-batch, as the
generic path would do.

The same product with respect to an input gives a parameter read as a tensor
outside its module its per-example gradients, when it is the input of a layer
whose output is the same for every example (DeBERTa-v2 normalises
``rel_embeddings.weight`` with a LayerNorm and never calls the Embedding):
:func:`input_gradients` pulls each example's output gradient back through the
layer's forward to that input, and a :class:`Direct` record hands it to the
parameter's own module as it is (:data:`DIRECT_RULE`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, NamedTuple

import weakref

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from ..errors import UnsupportedModuleError
from ..grouping import Groups
from ..tensors import output_tensors
from .registry import LayerRule


class BatchFree(NamedTuple):
    """One call of a module whose inputs and output carry no batch: what its replay needs.

    Attributes:
        module: the module (run again with its parameters as explicit values).
        params: its trainable parameters, by local name.
        args, kwargs: the call's arguments (tensors detached; none of them carries the batch).
        guard: the engine's replay guard (its hooks capture nothing while the module runs again).
        where: the module's path and class, for errors.
        output: what the forward returned (detached), which the replay must give again: a forward that draws
            random numbers (dropout in training mode) would not, and its gradients would be another function's.
    """

    module: nn.Module
    params: dict
    args: tuple
    kwargs: dict
    guard: Callable[[], AbstractContextManager]
    where: str
    output: torch.Tensor | None = None


def batch_free_group_grads(layer: BatchFree, inputs: tuple, out_grad: torch.Tensor, groups: Groups) -> dict:
    """``{name: (M, *param.shape)}``: the VJP of the module's forward with each group's summed output gradient."""
    summed = groups.sum(out_grad)  # (M, *output.shape)
    values = {name: p.detach() for name, p in layer.params.items()}

    def forward(params: dict) -> torch.Tensor:
        return output_tensors(functional_call(layer.module, params, layer.args, layer.kwargs))[0]

    with layer.guard(), torch.enable_grad():
        try:
            out, pullback = vjp(forward, values)[:2]
            _check_same_output(layer, out)
            cotangents = summed.reshape(summed.shape[0], *out.shape).to(out.dtype)
            try:
                (grads,) = vmap(pullback)(cotangents)
            except RuntimeError:  # an operation without a batching rule: one product per group
                parts = [pullback(g)[0] for g in cotangents]
                grads = {name: torch.stack([part[name] for part in parts]) for name in values}
        except RuntimeError as err:
            raise UnsupportedModuleError(
                f"{layer.where}: its output is the same for every example, and replaying its forward to get its "
                f"parameters' per-example gradients failed ({err}). Register a rule with "
                "dp_microclip.register_rule(...), or freeze its parameters (requires_grad=False)."
            ) from err
    return {name: g.detach() for name, g in grads.items()}


#: Modules whose replay was compared with their forward, and in which mode (train / eval). A random forward
#: draws anew at every call, so one comparison per module and mode finds it, and later steps read nothing
#: back to the host for it (on an accelerator such a read waits for every queued kernel).
_CHECKED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _check_same_output(layer: BatchFree, out: torch.Tensor) -> None:
    expected = layer.output
    modes = _CHECKED.setdefault(layer.module, set())
    if expected is None or out.shape != expected.shape or layer.module.training in modes:
        return
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    if not torch.allclose(out.detach(), expected.to(out.dtype), rtol=1e-4, atol=1e-6 * max(scale, 1e-30)):
        raise UnsupportedModuleError(
            f"{layer.where}: its output is the same for every example, and its parameters' per-example gradients "
            "come from running its forward again, but the second run gave another output: the forward is random "
            "(dropout or another random draw in training mode) or depends on state it changes. Move the random "
            "part out of this module (apply the dropout to its output in the caller), register a rule with "
            "dp_microclip.register_rule(...), or freeze its parameters (requires_grad=False)."
        )
    modes.add(layer.module.training)


#: The rule of :class:`BatchFree` calls (materialised group gradients: they have the parameters' size).
BATCH_FREE_RULE = LayerRule(group_grads=batch_free_group_grads)


class Direct(NamedTuple):
    """A parameter read as a tensor outside its module, as the input of a call whose output is the same for
    every example (DeBERTa-v2 normalises ``rel_embeddings.weight`` with a LayerNorm; the Embedding module is
    never called): its per-example gradients are that call's input gradients, given as they are."""

    name: str  # the parameter's local name in its module


def _direct_group_grads(layer: Direct, inputs: tuple, out_grad: torch.Tensor, groups: Groups) -> dict:
    return {layer.name: groups.sum(out_grad)}


#: The rule of :class:`Direct` records: ``out_grad`` holds each example's gradient of the parameter itself.
DIRECT_RULE = LayerRule(group_grads=_direct_group_grads)


def input_gradients(module: nn.Module, args: tuple, kwargs: dict, position: int, rows: torch.Tensor,
                    guard: Callable[[], AbstractContextManager]) -> torch.Tensor:
    """``(B, *args[position].shape)``: per example, the gradient of input ``position`` of ``module(*args)``
    given that example's output gradient (a row of ``rows``), by the VJP of the module's own forward."""
    point = args[position].detach()

    def forward(x: torch.Tensor) -> torch.Tensor:
        call = list(args)
        call[position] = x
        return output_tensors(module(*call, **kwargs))[0]

    with guard(), torch.enable_grad():
        out, pullback = vjp(forward, point)[:2]
        cotangents = rows.reshape(rows.shape[0], *out.shape).to(out.dtype)
        try:
            (grads,) = vmap(pullback)(cotangents)
        except RuntimeError:  # an operation without a batching rule: one product per example
            grads = torch.stack([pullback(g)[0] for g in cotangents])
    return grads.detach()
