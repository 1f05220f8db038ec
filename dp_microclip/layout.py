"""Where the batch is in every hooked layer's input and output: learned, never guessed from a size.

Guessing the batch dimension as "the dimension whose size equals B" is wrong
whenever a sequence length, a bucket count or a weight dimension happens to
equal B, and Poisson batches make that happen. Instead, the first time the
model sees an input signature (its inputs' shapes with the batch dimension left
out), the engine runs a *probe*: one forward pass without gradients on the same
batch with one example fewer (or one duplicated, when B = 1), recording the
shapes each hooked layer sees. In the real forward, a layer input's batch
dimension is then the one dimension whose size moved from B to B' between the
two passes. A tensor whose shape did not move is shared by the whole batch:

* with size 1 at the layer's declared batch dimension (HuggingFace position ids
  ``(1, T)``) it is *broadcast*: the engine expands the layer's output to the
  batch, so that every example gets its own output gradient and its exact share
  of the parameter gradient;
* otherwise (T5's ``(q, k)`` relative-position buckets, a parametrization's
  weight) it has no batch dimension and the engine refuses that layer by name.

The probe runs under ``torch.no_grad()``, restores torch's RNG state and every
buffer it changed (BatchNorm running statistics), and costs one forward pass per
new signature (Poisson batches change only B, which the signature leaves out).
Modules that declare their layout (``batch_first`` of ``nn.MultiheadAttention``,
RNNs and transformer layers; ``(N, C, ...)`` of convolutions and channel norms)
use it where no probe record exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import BatchError
from .layers.traits import CHANNELS_FIRST

BROADCAST = "broadcast"  # size 1 at the declared batch dimension: one value shared by every example



def declared_batch_first(module: nn.Module) -> bool | None:
    """The batch layout a module declares, if any (MHA, RNNs, transformer layers)."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return declared_batch_first(module.layers[0])
    if isinstance(getattr(module, "batch_first", None), bool):
        return module.batch_first
    return None


def declared_batch_dim(model: nn.Module, path: str, root_dim: int) -> int:
    """The batch dimension a module at ``path`` works in: its type's convention, its own or its
    nearest ancestor's ``batch_first``, else the model input's (``root_dim``)."""
    module = model.get_submodule(path) if path else model
    if isinstance(module, CHANNELS_FIRST):
        return 0  # torch's convention for these layers: (N, C, ...)
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        declared = declared_batch_first(model.get_submodule(".".join(parts[:depth])))
        if declared is not None:
            return 0 if declared else 1
    return root_dim


@dataclass(frozen=True)
class CallLayout:
    """Where the batch is in one call of one layer.

    Attributes:
        inputs: per positional argument: the batch dimension (int), ``BROADCAST``, or None
            (not a tensor, or a tensor without a batch dimension).
        output: the output's batch dimension, or ``BROADCAST`` (expanded to the batch by the engine);
            for a layer that returns several tensors, a tuple with one entry per tensor (None: no batch).
    """

    inputs: tuple
    output: int | str | tuple


@dataclass
class ProbeRecord:
    """Shapes one layer call saw during the probe: per positional argument, and of its output."""

    inputs: tuple
    output: tuple | None


@dataclass
class Signature:
    """What is known about one input signature of the model: the probe's shapes and the learned layouts."""

    probe_batch: int | None  # B' of the probe; None when no probe ran
    probe: dict = field(default_factory=dict)  # (path, call index) -> ProbeRecord
    learned: dict = field(default_factory=dict)  # (path, call index) -> CallLayout


def _shape(x) -> tuple | None:
    return tuple(x.shape) if torch.is_tensor(x) else None


def output_tensors(output) -> list:
    """The tensors of a layer's output, in order: the output itself, or those inside a tuple/list/dict
    (an RNN returns ``(out, h_n)`` or ``(out, (h_n, c_n))``)."""
    if torch.is_tensor(output):
        return [output]
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    return [x for x in leaves if torch.is_tensor(x)]


def probe_record(args: tuple, output) -> ProbeRecord:
    """What the probe keeps of one layer call."""
    outputs = output_tensors(output)
    shape = _shape(output) if torch.is_tensor(output) else tuple(_shape(t) for t in outputs)
    return ProbeRecord(tuple(_shape(a) for a in args), shape)


def signature_key(args, kwargs, batch_dim: int, batch_size: int) -> tuple:
    """The model's input signature: every tensor's shape with the batch dimension left out, and its dtype."""
    key: list = []
    _visit_signature(args, "args", key, batch_dim, batch_size)
    _visit_signature(kwargs, "kwargs", key, batch_dim, batch_size)
    return tuple(key)


def _visit_signature(obj, name: str, key: list, batch_dim: int, batch_size: int) -> None:
    # A module-level function, not a closure: a recursive closure is a reference cycle that only the
    # garbage collector frees, once per forward.
    if torch.is_tensor(obj):
        shape = list(obj.shape)
        if obj.dim() > batch_dim and shape[batch_dim] == batch_size:
            shape[batch_dim] = -1
        key.append((name, tuple(shape), obj.dtype, obj.device.type))
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _visit_signature(item, f"{name}.{i}", key, batch_dim, batch_size)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _visit_signature(v, f"{name}.{k}", key, batch_dim, batch_size)


def shrink_batch(obj, batch_dim: int, batch_size: int, probe_size: int):
    """The same inputs with ``probe_size`` examples: tensors whose ``batch_dim`` has the batch size are
    cut (``probe_size < batch_size``) or get row 0 repeated (``probe_size > batch_size``)."""
    if torch.is_tensor(obj):
        if obj.dim() > batch_dim and obj.shape[batch_dim] == batch_size:
            if probe_size < batch_size:
                return obj.narrow(batch_dim, 0, probe_size)
            extra = obj.narrow(batch_dim, 0, 1).expand(
                *[probe_size - batch_size if d == batch_dim else -1 for d in range(obj.dim())])
            return torch.cat([obj, extra], dim=batch_dim)
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(shrink_batch(o, batch_dim, batch_size, probe_size) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(shrink_batch(o, batch_dim, batch_size, probe_size) for o in obj)
    if isinstance(obj, dict):
        return type(obj)((k, shrink_batch(v, batch_dim, batch_size, probe_size)) for k, v in obj.items())
    return obj


def probe_size_for(batch_size: int) -> int:
    """B' of the probe: one example fewer, or two when the batch has one."""
    return batch_size - 1 if batch_size > 1 else 2


def batch_dim_from_probe(real: tuple, probed: tuple | None, batch_size: int, probe_size: int,
                         declared: int, where: str) -> int | str | None:
    """The batch dimension of one tensor, from its shape in the real pass and in the probe.

    Returns an int (batched along it), ``BROADCAST`` (shared, size 1 at ``declared``), or None
    (shared, no batch dimension at all).

    Raises:
        BatchError: when the shape moves with the batch in any other way.
    """
    if probed is None or len(probed) != len(real):
        raise BatchError(
            f"{where}: its shape {real} does not follow the batch in a way dp_microclip can split per example "
            f"(with {probe_size} examples instead of {batch_size} it was {probed}). Keep one batch dimension in "
            "this layer's input, or register a rule for this module type."
        )
    moved = [d for d in range(len(real)) if real[d] != probed[d]]
    if not moved:
        if batch_size == 1:
            return declared if len(real) > declared and real[declared] == 1 else None
        return BROADCAST if len(real) > declared and real[declared] == 1 else None
    if len(moved) == 1 and real[moved[0]] == batch_size and probed[moved[0]] == probe_size:
        return moved[0]
    raise BatchError(
        f"{where}: its shape {real} changes with the batch along dimensions {moved} (with {probe_size} examples "
        f"instead of {batch_size} it was {probed}), not along one batch dimension. Rows of several examples are "
        "mixed or flattened together; dp_microclip cannot split this layer's gradient per example. Keep the batch "
        "as its own dimension in this layer's input."
    )


def batch_dim_declared(real: tuple, batch_size: int, declared: int, where: str) -> int | str | None:
    """Without a probe record: the declared dimension, checked (size B: batched; size 1: broadcast)."""
    if len(real) > declared and real[declared] == batch_size:
        return declared
    if len(real) > declared and real[declared] == 1:
        return BROADCAST
    raise BatchError(
        f"{where}: its shape {real} has neither the batch size {batch_size} nor 1 along its batch dimension "
        f"{declared}. Set the layout with attach(..., batch_first=...), or keep one batch dimension in this "
        "layer's input."
    )
