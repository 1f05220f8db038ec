"""The layer-rule registry: how to get per-group gradients of a layer type.

A rule works on what the engine's hooks captured for one call of a layer: its
inputs and the gradient of the loss with respect to its output, both moved so
the batch is dimension 0. "Per-group gradient" always means the *sum* over the
group's rows of the captured (unscaled) per-row contributions; the engine
applies the loss-reduction scale and the group mean.

A rule has one required and three optional functions (a NamedTuple, no classes
to subclass):

* ``group_grads(layer, inputs, out_grad, groups) -> {name: (M, *param.shape)}``:
  materialised group gradients. Always exact; memory ``M x params``.
* ``group_sq_norms(layer, inputs, out_grad, groups) -> {name: (M,)}``: squared
  norms without materialising group gradients (book-keeping / ghost norms).
* ``weighted_sum(layer, inputs, out_grad, row_weight) -> {name: param-shaped}``:
  ``sum_i w_i * grad_i`` with one weight per example (``row_weight[name]``, ``(B,)``),
  i.e. the clipped sum as one weighted matmul.
* ``group_grad_elements(layer, inputs, out_grad, groups) -> int``: how many
  elements ``group_grads`` would allocate for these shapes. ``grad_mode="auto"``
  checks it against its memory budget before it even times a route that builds
  group gradients, then times the routes that fit (see
  ``aggregate.choose_strategy``). Without it the rule always takes the ghost
  route under ``auto``.

The signature follows Opacus' grad samplers (``opacus/grad_sample/linear.py``:
``(layer, activations, backprops)``), extended from examples to groups. The
registry is one module-level dict, filled at import, keyed by exact type: a
subclass may change ``forward``, so it takes the generic path unless registered.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from ..grouping import Groups

GradDict = dict[str, torch.Tensor]


class LayerRule(NamedTuple):
    group_grads: Callable[[nn.Module, tuple, torch.Tensor, Groups], GradDict]
    group_sq_norms: Callable[[nn.Module, tuple, torch.Tensor, Groups], GradDict] | None = None
    weighted_sum: Callable[[nn.Module, tuple, torch.Tensor, GradDict], GradDict] | None = None
    group_grad_elements: Callable[[nn.Module, tuple, torch.Tensor, Groups], int] | None = None

    @property
    def has_ghost(self) -> bool:
        return self.group_sq_norms is not None and self.weighted_sum is not None


_RULES: dict[type, LayerRule] = {}


def register_rule(layer_type: type, rule: LayerRule, *, replace: bool = False) -> None:
    """Register ``rule`` for modules whose exact type is ``layer_type``.

    Raises:
        ValueError: if a rule is already registered and ``replace`` is False.
    """
    if layer_type in _RULES and not replace:
        raise ValueError(
            f"A rule for {layer_type.__name__} is already registered. "
            "Pass replace=True to register_rule(...) to override it."
        )
    _RULES[layer_type] = rule


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for this module's exact type, or None."""
    return _RULES.get(type(module))


def rule_for_type(layer_type: type) -> LayerRule | None:
    """The rule registered for exactly ``layer_type``, or None."""
    return _RULES.get(layer_type)


def registered_types() -> list[type]:
    return list(_RULES)
