"""The data the hooks capture: one ``Record`` per layer call, grouped by ``ForwardContext``.

Data types only (no hooks, no arithmetic). A ``Unit`` is a hooked module with
the trainable parameters it owns; a ``ForwardContext`` is one forward pass of
the attached model (its batch size and groups); a ``Record`` is what one call
of one unit contributed to one backward pass: its batch-first inputs and the
gradient of the loss with respect to its output.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .grouping import Groups
from .layers.registry import LayerRule
from .layout import Signature

_context_ids = itertools.count()


class Shared(NamedTuple):
    """A layer input without a batch dimension (the same tensor for every example), kept as is."""

    value: torch.Tensor


@dataclass
class ForwardContext:
    """One forward pass of the attached model: its batch size, groups and layout knowledge."""

    batch_size: int
    groups: Groups
    drawn_by_engine: bool = False  # its groups came from engine.data_loader (DP: Poisson sampling verified)
    signature: Signature | None = None
    calls: dict = field(default_factory=dict)  # unit path -> calls so far in this pass
    id: int = field(default_factory=lambda: next(_context_ids))

    def next_call(self, path: str) -> int:
        """The index of this call of the unit at ``path`` within the pass (a module may run twice)."""
        index = self.calls.get(path, 0)
        self.calls[path] = index + 1
        return index


@dataclass
class Unit:
    """A hooked module and the trainable parameters it owns (by local name)."""

    path: str
    module: nn.Module
    kind: str  # "rule" | "attention" | "rnn" | "functional" (usage.py, else generic) | "generic"
    rule: LayerRule | None
    params: dict[str, nn.Parameter]
    batch_dim: int  # the dimension the module works in (its convention, a declared layout, or the model's)
    parametrized: dict = field(default_factory=dict)  # tensor name -> its ParametrizationList (weight norm, ...)
    generic_allowed: bool = True  # "functional": whether a call the usage route cannot take may go generic


@dataclass
class Record:
    """What one call of one layer contributed in one backward pass (batch-first tensors)."""

    unit: Unit
    name: str  # unit path, or "path.in_proj" for MHA parts
    rule: LayerRule | None  # None for the generic path
    layer: Any  # the module, or LinearParts for MHA projections
    params: dict[str, nn.Parameter]
    inputs: tuple
    kwargs: dict
    out_grad: torch.Tensor | tuple  # a tuple (None: no gradient reached it) for a joined multi-output call
    ctx: ForwardContext
    batch_dim: int | tuple  # where the batch was in the layer's own output layout (tensors here are batch-first)
    input_dims: tuple = ()  # per input: where the batch was in the layer's own layout (None: not batched)
    call: tuple = ()  # (context id, unit path, call index): the parts of a multi-output call share it
    slot: int = 0  # which output tensor this record's out_grad belongs to (multi-output calls)
    out_shapes: tuple = ()  # batch-first shapes of every output tensor (multi-output calls), for missing ones
    kw_names: tuple = ()  # the last len(kw_names) inputs are these tensor keyword arguments (generic path)
    group_grads: dict | None = None  # lean mode: the group gradients, computed as the record arrived (no tensors kept)


def join_multi_output(records: list[Record]) -> list[Record]:
    """One record per call of a layer that returns several tensors (RNNs): their output gradients as a
    tuple, with zeros for outputs no gradient reached."""
    if all(not r.call for r in records):
        return records
    joined: list[Record | tuple] = []  # records, and the call key of each multi-output call
    parts: dict[tuple, dict[int, torch.Tensor]] = {}
    for r in records:
        if not r.call:
            joined.append(r)
            continue
        if r.call not in parts:
            parts[r.call] = {}
            joined.append(r.call)
        assert isinstance(r.out_grad, torch.Tensor)  # a partial record holds one output tensor's gradient
        parts[r.call][r.slot] = r.out_grad
    out = []
    for item in joined:
        if isinstance(item, Record):
            out.append(item)
            continue
        grads = parts[item]
        first = next(r for r in records if r.call == item)
        template = next(iter(grads.values()))
        out_grad = tuple(
            grads.get(i, None if shape is None else template.new_zeros(shape))
            for i, shape in enumerate(first.out_shapes)
        )
        out.append(Record(first.unit, first.name, None, first.layer, first.params, first.inputs, first.kwargs,
                          out_grad, first.ctx, first.batch_dim, first.input_dims, kw_names=first.kw_names))
    return out


def grad_tensors(record: Record) -> list:
    """The record's output gradient(s) as a list (several for a multi-output layer such as an RNN)."""
    if isinstance(record.out_grad, tuple):
        return [g for g in record.out_grad if g is not None]
    return [record.out_grad]
