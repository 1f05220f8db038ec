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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import BatchError
from .layers.traits import CHANNELS_FIRST
from .tensors import output_tensors

BROADCAST = "broadcast"  # size 1 at the declared batch dimension: one value shared by every example



def declared_batch_first(module: nn.Module) -> bool | None:
    """The batch layout a module declares, if any (MHA, RNNs, transformer layers)."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return declared_batch_first(module.layers[0])
    batch_first = getattr(module, "batch_first", None)
    if isinstance(batch_first, bool):
        return batch_first
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
    rows_checked: bool = False  # DP mode: contract.rows_mixed ran for this signature


def _shape(x) -> tuple | None:
    return tuple(x.shape) if torch.is_tensor(x) else None


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


class LayoutLearner:
    """Learns, once per input signature, where the batch is in every hooked layer call (the probe).

    The hooks ask :meth:`signature` when the attached model is called (probing a new
    signature with one extra forward pass) and :meth:`layout` for each layer call;
    during the probe ``probing`` is the signature being filled, and the layer hooks
    only record shapes (:meth:`record_probe_call`).

    Args:
        root_batch_dim: the batch dimension of the model's own input.
        probe_failure_is_error: DP mode: a failed probe raises instead of falling back to
            each layer's declared batch dimension.
        warn: ``(key, message) -> None``, warns once per key.
    """

    def __init__(self, root_batch_dim: int, probe_failure_is_error: bool, warn: Callable[[str, str], None]):
        self.root_batch_dim = root_batch_dim
        self.probe_failure_is_error = probe_failure_is_error
        self._warn = warn
        self.signatures: dict[tuple, Signature] = {}
        self.probing: Signature | None = None
        self._probe_calls: dict[str, int] = {}

    def record_probe_call(self, path: str, args: tuple, output) -> None:
        """During the probe: keep the shapes one call of the unit at ``path`` saw."""
        assert self.probing is not None
        index = self._probe_calls.get(path, 0)
        self._probe_calls[path] = index + 1
        self.probing.probe[(path, index)] = probe_record(args, output)

    def signature(self, root: nn.Module, args, kwargs, batch_size: int) -> Signature:
        """What is known about this input signature: probed once (one extra forward pass) the first time."""
        if batch_size == 0:
            return Signature(None)  # an empty Poisson batch: nothing to learn from, nothing to split
        key = signature_key(args, kwargs, self.root_batch_dim, batch_size)
        known = self.signatures.get(key)
        if known is None:
            known = self.signatures[key] = self._probe(root, args, kwargs, batch_size)
        return known

    def _probe(self, root: nn.Module, args, kwargs, batch_size: int) -> Signature:
        """One forward pass without gradients on a batch of B' examples, recording every unit call's shapes."""
        probe_size = probe_size_for(batch_size)
        signature = Signature(probe_size)
        p_args = shrink_batch(args, self.root_batch_dim, batch_size, probe_size)
        p_kwargs = shrink_batch(kwargs, self.root_batch_dim, batch_size, probe_size)
        saved = {name: b.clone() for name, b in root.named_buffers()}  # BatchNorm statistics and the like
        devices = sorted({t.device.index for t in saved.values() if t.device.type == "cuda"} |
                         {p.device.index for p in root.parameters() if p.device.type == "cuda"})
        self.probing, self._probe_calls = signature, {}
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                root(*p_args, **p_kwargs)
        except Exception as err:  # noqa: BLE001 - any failure of the user's forward on a smaller batch
            if self.probe_failure_is_error:
                raise BatchError(
                    f"dp_microclip learns where the batch is in every layer by running the model once without "
                    f"gradients on {probe_size} examples instead of {batch_size}; that forward failed "
                    f"({type(err).__name__}: {err}). Make the model accept any batch size along dimension "
                    f"{self.root_batch_dim} of its inputs, or set attach(..., batch_first=...) if the batch is "
                    "elsewhere."
                ) from err
            self._warn(
                "probe",
                f"The layout probe (a forward pass on {probe_size} examples instead of {batch_size}) failed "
                f"({type(err).__name__}: {err}); each layer's declared batch dimension is used instead.",
            )
            signature = Signature(None)
        finally:
            self.probing = None
            with torch.no_grad():
                for name, b in root.named_buffers():
                    if name in saved and b.shape == saved[name].shape:
                        b.copy_(saved[name])
        return signature

    def layout(self, unit, ctx, index: int, args: tuple, output) -> CallLayout:
        """Where the batch is in this call's inputs and output (learned once per signature and call)."""
        signature = ctx.signature
        key = (unit.path, index)
        if signature is not None and key in signature.learned:
            return signature.learned[key]
        where = f"{unit.path or '<root module>'} ({type(unit.module).__name__})"
        record = signature.probe.get(key) if signature is not None else None
        batch, declared = ctx.batch_size, unit.batch_dim

        def dim_of(x, probed, what):
            if record is None:
                return batch_dim_declared(tuple(x.shape), batch, declared, f"{where}, {what}")
            return batch_dim_from_probe(tuple(x.shape), probed, batch, signature.probe_batch, declared,
                                        f"{where}, {what}")

        inputs: list[int | str | None] = []
        for i, a in enumerate(args):
            if not torch.is_tensor(a):
                inputs.append(None)
                continue
            probed = record.inputs[i] if record is not None and i < len(record.inputs) else None
            inputs.append(dim_of(a, probed, f"input {i}"))
        if not torch.is_tensor(output):
            outputs = output_tensors(output)
            probed = record.output if record is not None else None
            dims: list[int | str | None] = []
            for i, t in enumerate(outputs):
                shape = probed[i] if probed is not None and i < len(probed) else None
                try:
                    dims.append(dim_of(t, shape, f"output {i}"))
                except BatchError:
                    dims.append(None)  # no gradient may flow through it; the first-step check catches it if one does
            out_dims = tuple(None if d == BROADCAST else d for d in dims)
            layout = CallLayout(tuple(inputs), out_dims)
            if signature is not None and signature.probe_batch is not None:
                signature.learned[key] = layout
            return layout
        # None: the output is the same for every example (relative-position tables); shared_outputs.py
        # follows it to where it meets the batch, or the hooks refuse the layer.
        out_dim = dim_of(output, record.output if record is not None else None, "output")
        layout = CallLayout(tuple(inputs), out_dim)
        if signature is not None and signature.probe_batch is not None:
            signature.learned[key] = layout
        return layout
