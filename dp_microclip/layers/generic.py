"""The generic path: per-group gradients with ``torch.func`` for modules without a rule.

For a module ``f`` with parameters ``theta``, captured inputs ``X`` and output
gradient ``G``, the gradient of group ``j`` is ``grad_theta <f(theta, X_j), G_j>``.
It is computed for all groups at once with ``vmap(grad(...))`` over the groups,
padded to equal size (padding rows get a zero output gradient, so they add
nothing; their inputs are copies of a real row so the forward stays finite).

Exact only for modules that treat examples independently (no BatchNorm, no
cross-example attention, no randomness inside). The engine says so once per
module, lists them in ``engine.summary()``, and in DP mode uses this path only
when the user allowed it with ``fallback="generic"``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..errors import UnsupportedModuleError
from ..grouping import Groups


def generic_group_grads(
    module: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: tuple,
    kwargs: dict,
    out_grad: torch.Tensor,
    groups: Groups,
    batch_dim: int,
    replay_guard: Callable[[], AbstractContextManager],
    path: str,
    input_dims: tuple = (),
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
    padded_grad = groups.pad(out_grad)  # (M, R, ...)

    def group_loss(param_values, group_inputs, group_grad):
        args = list(inputs)
        for i, arg in enumerate(args):
            if isinstance(arg, tuple) and hasattr(arg, "_fields") and arg._fields == ("value",):
                args[i] = arg.value  # a Shared input: the same for every group
        for i, x in zip(tensor_pos, group_inputs):
            dim = input_dims[i] if i < len(input_dims) and input_dims[i] is not None else batch_dim
            args[i] = x.movedim(0, dim)  # back to the module's own layout
        out = functional_call(module, param_values, tuple(args), kwargs)
        if not torch.is_tensor(out):
            raise UnsupportedModuleError(
                f"{path or 'the model'} ({type(module).__name__}) returns {type(out).__name__}, "
                "not a tensor; the generic path needs one output tensor. Register a rule with "
                "dp_microclip.register_rule(...) for this module type."
            )
        return (out.movedim(batch_dim, 0) * group_grad).sum()

    try:
        with replay_guard():
            grads = vmap(grad(group_loss), in_dims=(None, 0, 0))(values, padded, padded_grad)
    except RuntimeError as err:  # e.g. randomness or in-place buffer updates under vmap
        raise UnsupportedModuleError(
            f"{path or 'the model'} ({type(module).__name__}) has no rule and could not be "
            f"replayed per micro-batch with torch.func ({err}). Register a rule with "
            "dp_microclip.register_rule(...), or move its parameters into supported layers."
        ) from err
    return dict(grads)
