"""Module hooks: capture each layer call's inputs and output gradient as a ``Record``.

Data flow (one forward + backward):

* the root module's forward pre-hook finds the batch size, makes sure the
  model's input signature has been probed (``layout.py``: where the batch is in
  every layer, learned rather than guessed), and opens a ``ForwardContext``
  (batch size, groups of this batch); its forward hook closes it;
* each hooked unit's forward hook keeps its (detached, batch-first) inputs and
  registers a tensor hook on its output; when the output gradient arrives, the
  tensor hook emits a complete ``Record`` to the engine;
* the first record of a backward pass queues an end-of-backward callback on the
  autograd engine, where the engine turns the pass's records into clipped sums.

Forward hooks that fire *during* a backward pass (the recomputation of gradient
checkpointing) capture nothing: the original forward already registered the
output hooks, and its autograd graph is the one the gradients flow through.

Nothing is stored on the user's modules or parameters: the records live in the
engine, and a record that never gets its gradient dies with the autograd graph.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import BatchError, UnsupportedModuleError
from .grouping import Groups
from .layers.attention import AttentionCapture, LinearParts
from .layers.registry import LayerRule, rule_for_type
from .layout import (
    BROADCAST, CallLayout, Signature, batch_dim_declared, batch_dim_from_probe, output_tensors, probe_record,
    probe_size_for, shrink_batch, signature_key,
)

_context_ids = itertools.count()


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (e.g. checkpoint recomputation)."""
    return torch._C._current_graph_task_id() != -1


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
    kind: str  # "rule" | "attention" | "generic"
    rule: LayerRule | None
    params: dict[str, nn.Parameter]
    batch_dim: int  # the dimension the module works in (its convention, a declared layout, or the model's)
    parametrized: dict = field(default_factory=dict)  # tensor name -> its ParametrizationList (weight norm, ...)


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
    out_grad: torch.Tensor | None
    ctx: ForwardContext
    batch_dim: int | tuple  # where the batch was in the layer's own output layout (tensors here are batch-first)
    input_dims: tuple = ()  # per input: where the batch was in the layer's own layout (None: not batched)
    call: tuple = ()  # (context id, unit path, call index): the parts of a multi-output call share it
    slot: int = 0  # which output tensor this record's out_grad belongs to (multi-output calls)
    out_shapes: tuple = ()  # batch-first shapes of every output tensor (multi-output calls), for missing ones
    kw_names: tuple = ()  # the last len(kw_names) inputs are these tensor keyword arguments (generic path)


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


def _expand_at(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    return x.expand(*[size if d == dim else -1 for d in range(x.dim())])


class HookSet:
    """Installs and owns every hook of one engine. ``engine`` provides:

    ``_hooks_active()`` (hooks do nothing when False), ``_open_context(batch_size, device, signature)``,
    ``_close_context()``, ``_current_context()`` and ``_emit(record)``.
    """

    def __init__(self, engine, root_batch_dim: int, probe_failure_is_error: bool):
        self.engine = engine
        self.handles: list = []
        self.root_batch_dim = root_batch_dim
        self.probe_failure_is_error = probe_failure_is_error
        self.anchor = torch.zeros((), requires_grad=True)  # makes RequireGrad's output need a gradient
        self.signatures: dict[tuple, Signature] = {}
        self.probing: Signature | None = None
        self.no_grad_in_forward: set[str] = set()  # units seen under no_grad inside a forward (checkpointing)
        self._probe_calls: dict[str, int] = {}

    # ------------------------------------------------------------------ install
    def install_root(self, root: nn.Module) -> None:
        """Hook the attached model itself: its pre-hook finds B, probes new signatures and opens the pass's context."""
        batch_dim = self.root_batch_dim

        def pre(module, args, kwargs):
            if self.probing is not None or not self.engine._hooks_active():
                return None
            if not torch.is_grad_enabled() or in_backward():
                return None  # evaluation passes take no micro-batch and no sampled batch
            x = first_tensor((args, kwargs))
            if x is None:
                raise BatchError("The model was called without a tensor argument: cannot find the batch size.")
            if x.dim() <= batch_dim:
                raise BatchError(
                    f"The model's first input has shape {tuple(x.shape)}, with no batch dimension {batch_dim}. "
                    "Pass batched inputs, or set attach(..., batch_first=...) to name the batch dimension."
                )
            batch_size = int(x.shape[batch_dim])
            signature = self._signature(root, args, kwargs, batch_size)
            self.engine._open_context(batch_size, x.device, signature)
            return None

        def post(module, args, kwargs, output):
            if self.probing is None:
                self.engine._close_context()
            return None

        # Installed after the units: the pre-hook goes first (prepend) and the post-hook last, so a
        # root that is itself a hooked layer still sees an open context.
        self.handles.append(root.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        self.handles.append(root.register_forward_hook(post, with_kwargs=True, always_call=True))
        self.root = root

    def install_unit(self, unit: Unit) -> None:
        """Hook one unit: its forward hook captures inputs and watches the output's gradient."""
        if unit.kind == "attention":
            self._install_attention(unit)
        else:
            self._install_layer(unit)

    def remove(self) -> None:
        """Remove every hook this set installed (``Engine.detach``)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # ------------------------------------------------------------------ the probe
    def _signature(self, root: nn.Module, args, kwargs, batch_size: int) -> Signature:
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
            self.engine._warn_once(
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

    def _layout(self, unit: Unit, ctx: ForwardContext, index: int, args: tuple, output) -> CallLayout:
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

        inputs = []
        for i, a in enumerate(args):
            if not torch.is_tensor(a):
                inputs.append(None)
                continue
            probed = record.inputs[i] if record is not None and i < len(record.inputs) else None
            inputs.append(dim_of(a, probed, f"input {i}"))
        if not torch.is_tensor(output):
            outputs = output_tensors(output)
            probed = record.output if record is not None else None
            dims = []
            for i, t in enumerate(outputs):
                shape = probed[i] if probed is not None and i < len(probed) else None
                try:
                    dims.append(dim_of(t, shape, f"output {i}"))
                except BatchError:
                    dims.append(None)  # no gradient may flow through it; the first-step check catches it if one does
            dims = tuple(None if d == BROADCAST else d for d in dims)
            layout = CallLayout(tuple(inputs), dims)
            if signature is not None and signature.probe_batch is not None:
                signature.learned[key] = layout
            return layout
        out_dim = dim_of(output, record.output if record is not None else None, "output")
        if out_dim is None:
            raise BatchError(
                f"{where}: its output of shape {tuple(output.shape)} has no batch dimension (it is the same for "
                "every example), so its parameters' gradient cannot be split per example. This happens with "
                "tensors that do not derive from the batch (relative-position buckets, a parametrization's "
                "weight). Compute such a table once outside a module with trainable parameters, or freeze "
                "those parameters (requires_grad=False) before attach()."
            )
        layout = CallLayout(tuple(inputs), out_dim)
        if signature is not None and signature.probe_batch is not None:
            signature.learned[key] = layout
        return layout

    # ------------------------------------------------------------------ helpers
    def _note_checkpointing(self, unit: Unit) -> None:
        """Reentrant gradient checkpointing runs a segment under no_grad in the forward and again, with
        gradients, inside the backward: the engine sees neither run with a usable output gradient, so those
        layers would silently get no gradient. Recognise the pair and refuse with the fix."""
        if not self.engine._hooks_active():
            return
        if not torch.is_grad_enabled() and self.engine._current_context() is not None:
            self.no_grad_in_forward.add(unit.path)
        elif in_backward() and torch.is_grad_enabled() and unit.path in self.no_grad_in_forward:
            self.engine._problems.append(
                f"{unit.path} ({type(unit.module).__name__}) ran under torch.no_grad() inside the model's forward and "
                "again, with gradients, during the backward pass: gradient checkpointing with use_reentrant=True, "
                "whose recomputed gradients the engine cannot see per example. Use non-reentrant checkpointing: "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or in HuggingFace "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
            )

    def _capturing(self) -> ForwardContext | None:
        if not self.engine._hooks_active() or not torch.is_grad_enabled() or in_backward():
            return None
        ctx = self.engine._current_context()
        if ctx is None:
            raise BatchError(
                "A hooked layer ran outside a forward call of the attached model (e.g. a submodule "
                "called directly). Call the model passed to attach(), or attach the engine to the "
                "module you call."
            )
        return ctx

    def _watch_output(self, unit: Unit, name, rule, layer, params, inputs, kwargs, ctx, output, bd: int,
                      input_dims: tuple = (), kw_names: tuple = ()):
        """Register the tensor hook that completes a record when ``output``'s gradient arrives.

        Returns a replacement output when one is needed, else None.

        A tensor hook stays with the autograd node that made the tensor, so it
        still sees the gradient of the layer's own output when a later in-place
        op (``ReLU(inplace=True)``) rewrites the tensor's history. That fails for
        a *view* modified in place (``F.linear`` on 3-D input returns a view of a
        2-D product): its history is rebased and the hook never fires. Then the
        hook goes on the view's base (same elements, internal to the layer), or,
        if the view is not a plain reshape of a rule layer's own result, the
        output is cloned.
        """
        engine = self.engine
        shape = output.shape
        target, replacement = output, None
        base = output._base
        if base is not None:
            plain_reshape = base.numel() == output.numel() and base.is_contiguous() and output.is_contiguous()
            if unit.kind == "rule" and plain_reshape:
                target = base
            else:
                target = replacement = output.clone()

        def on_grad(grad: torch.Tensor):
            if engine._hooks_active():
                g = grad.reshape(shape)
                g = (g.movedim(bd, 0) if bd != 0 else g).detach()
                engine._emit(Record(unit, name, rule, layer, params, inputs, kwargs, g, ctx, bd, input_dims,
                                    kw_names=kw_names))
            return None

        target.register_hook(on_grad)
        return replacement

    # ------------------------------------------------------------------ layers
    def _install_layer(self, unit: Unit) -> None:
        def post(module, args, kwargs, output):
            if self.probing is not None:
                index = self._probe_calls.get(unit.path, 0)
                self._probe_calls[unit.path] = index + 1
                kw_names = tuple(sorted(k for k, v in kwargs.items() if torch.is_tensor(v)))
                self.probing.probe[(unit.path, index)] = probe_record(
                    tuple(args) + tuple(kwargs[k] for k in kw_names), output)
                return None
            self._note_checkpointing(unit)
            ctx = self._capturing()
            if ctx is None:
                return None
            if not torch.is_tensor(output) and unit.kind == "rule":
                raise UnsupportedModuleError(
                    f"{unit.path} ({type(module).__name__}) returned {type(output).__name__}; its rule needs "
                    "one tensor. Register a rule for this type that matches its output, or restructure the module."
                )
            for i, a in enumerate(args):
                if not torch.is_tensor(a) and output_tensors(a):
                    raise UnsupportedModuleError(
                        f"{unit.path} ({type(module).__name__}): input {i} is a {type(a).__name__} holding tensors "
                        "(e.g. a PackedSequence), which cannot be split per example. Pass padded tensors instead "
                        "(torch.nn.utils.rnn.pad_packed_sequence), masking padded steps in the loss."
                    )
            kw_names = tuple(sorted(k for k, v in kwargs.items() if torch.is_tensor(v)))
            if kw_names and unit.kind == "rule":
                raise UnsupportedModuleError(
                    f"{unit.path} ({type(module).__name__}) was called with tensor keyword argument(s) "
                    f"{list(kw_names)}, which its rule does not read. Pass them positionally, or register a rule "
                    "for this module type that takes them."
                )
            # Tensor keyword arguments (generic path) are laid out and split like positional ones, after them.
            args = tuple(args) + tuple(kwargs[k] for k in kw_names)
            kwargs = {k: v for k, v in kwargs.items() if k not in kw_names}
            index = ctx.next_call(unit.path)
            layout = self._layout(unit, ctx, index, args, output)
            batch = ctx.batch_size
            inputs = []
            for i, (a, dim) in enumerate(zip(args, layout.inputs)):
                if not torch.is_tensor(a):
                    inputs.append(a)
                elif dim is None:
                    if unit.kind == "rule" and i == 0:
                        raise BatchError(
                            f"{unit.path} ({type(module).__name__}): its input of shape {tuple(a.shape)} has no "
                            "batch dimension (the same tensor for every example), so its parameters' gradient "
                            "cannot be split per example. Compute this layer outside the trained part, or freeze "
                            "its parameters (requires_grad=False) before attach()."
                        )
                    inputs.append(Shared(a.detach()))
                elif dim == BROADCAST:
                    inputs.append(_expand_at(a.detach(), unit.batch_dim, batch).movedim(unit.batch_dim, 0))
                else:
                    inputs.append(a.detach().movedim(dim, 0) if dim != 0 else a.detach())
            input_dims = tuple(
                None if d is None else (unit.batch_dim if d == BROADCAST else d) for d in layout.inputs
            )
            if not torch.is_tensor(output):
                return self._watch_outputs(unit, module, tuple(inputs), dict(kwargs), ctx, output, layout,
                                           input_dims, (ctx.id, unit.path, index), kw_names)
            replaced = None
            out_dim = layout.output
            if out_dim == BROADCAST:
                # One value shared by the batch (position embeddings of (1, T) ids): expanded to the batch so
                # that each example's output gradient, and so its share of the weight gradient, exists.
                output = replaced = _expand_at(output, unit.batch_dim, batch)
                out_dim = unit.batch_dim
            if not output.requires_grad:
                # The engine switched the weights' own requires_grad off (autograd would compute an
                # unclipped weight gradient and throw it away). With an input that needs no gradient
                # either (the first layer, an embedding), the output would need none and no output
                # gradient would arrive: tie the output to the engine's anchor so it does.
                output = replaced = RequireGrad.apply(self.anchor, output)
            cloned = self._watch_output(
                unit, unit.path, unit.rule, module, unit.params, tuple(inputs), dict(kwargs), ctx, output, out_dim,
                input_dims, kw_names,
            )
            return cloned if cloned is not None else replaced

        self.handles.append(unit.module.register_forward_hook(post, with_kwargs=True))

    def _watch_outputs(self, unit: Unit, module, inputs, kwargs, ctx, output, layout: CallLayout,
                       input_dims, call, kw_names: tuple = ()) -> Any:
        """Several output tensors (RNNs): one partial record per output gradient; the engine joins them.

        An output whose gradient never arrives (h_n unused by the loss) counts as a zero gradient.
        """
        leaves, spec = torch.utils._pytree.tree_flatten(output)
        positions = [i for i, x in enumerate(leaves) if torch.is_tensor(x)]
        dims = layout.output
        shapes = tuple(
            tuple(leaves[p].movedim(d, 0).shape) if d is not None else None for p, d in zip(positions, dims))
        engine = self.engine
        for slot, (p, d) in enumerate(zip(positions, dims)):
            t = leaves[p]
            if d is None or not t.is_floating_point():
                continue
            if not t.requires_grad:
                t = leaves[p] = RequireGrad.apply(self.anchor, t)
            elif t._base is not None:
                t = leaves[p] = t.clone()

            def on_grad(grad, slot=slot, d=d, shape=t.shape):
                if engine._hooks_active():
                    g = grad.reshape(shape)
                    g = (g.movedim(d, 0) if d != 0 else g).detach()
                    engine._emit(Record(unit, unit.path, None, module, unit.params, inputs, kwargs, g, ctx, dims,
                                        input_dims, call, slot, shapes, kw_names))
                return None

            t.register_hook(on_grad)
        return torch.utils._pytree.tree_unflatten(leaves, spec)

    # --------------------------------------------------------------- attention
    def _install_attention(self, unit: Unit) -> None:
        mha = unit.module
        linear_rule = rule_for_type(nn.Linear)
        modes: list[AttentionCapture] = []
        names = {"in_proj": ("in_proj_weight", "in_proj_bias"), "out_proj": ("out_proj.weight", "out_proj.bias")}

        def pre(module, args, kwargs):
            if self.probing is not None:
                return None
            ctx = self._capturing()
            if ctx is None:
                return None

            def on_linear(part: str, parts: LinearParts, x, y):
                weight_name, bias_name = names[part]
                params = {}
                if weight_name in unit.params:
                    params["weight"] = unit.params[weight_name]
                if bias_name in unit.params:
                    params["bias"] = unit.params[bias_name]
                if not params:
                    return
                # Inside torch's function tensors are (T, B, E), or (T*B, E) before out_proj: rows are
                # T-major there, i.e. row = t * B + b.
                x3 = x.reshape(-1, ctx.batch_size, x.shape[-1]).transpose(0, 1).detach()  # (B, T, E)

                def on_grad(grad):
                    if self.engine._hooks_active():
                        g3 = grad.reshape(-1, ctx.batch_size, grad.shape[-1]).transpose(0, 1).detach()
                        self.engine._emit(
                            Record(unit, f"{unit.path}.{part}", linear_rule, parts, params, (x3,), {}, g3, ctx, 0)
                        )

                y.register_hook(on_grad)

            def on_cross(parts: LinearParts, xs, ys):
                if "in_proj_weight" not in unit.params and "in_proj_bias" not in unit.params:
                    return
                params = {}
                if "in_proj_weight" in unit.params:
                    params["weight"] = unit.params["in_proj_weight"]
                if "in_proj_bias" in unit.params:
                    params["bias"] = unit.params["in_proj_bias"]
                batch = ctx.batch_size
                x_rows = [x.reshape(-1, batch, x.shape[-1]).transpose(0, 1).detach() for x in xs]  # (B, T|S, E)
                x_all = torch.cat(x_rows, dim=1)  # (B, T+2S, E): one Linear over the stacked rows
                grads: dict[int, torch.Tensor] = {}

                def complete():
                    e = ys[0].shape[-1]
                    blocks = []
                    for i in range(3):
                        g = grads[i].reshape(-1, batch, e).transpose(0, 1)  # (B, T|S, E)
                        padded = g.new_zeros((*g.shape[:-1], 3 * e))  # (B, T|S, 3E): zero outside block i
                        padded[..., i * e:(i + 1) * e] = g
                        blocks.append(padded)
                    self.engine._emit(Record(unit, f"{unit.path}.in_proj", linear_rule, parts, params, (x_all,),
                                             {}, torch.cat(blocks, dim=1).detach(), ctx, 0))

                for i, y in enumerate(ys):
                    def on_grad(grad, i=i):
                        if self.engine._hooks_active():
                            grads[i] = grad
                            if len(grads) == 3:
                                complete()

                    y.register_hook(on_grad)

            mode = AttentionCapture(mha, unit.path, on_linear, on_cross)
            mode.__enter__()
            modes.append(mode)
            return None

        def post(module, args, kwargs, output):
            if not modes:
                return None
            mode = modes.pop()
            mode.__exit__(None, None, None)
            if mode.calls != 1 and self.engine._hooks_active() and torch.is_grad_enabled():
                raise UnsupportedModuleError(
                    f"{unit.path}: nn.MultiheadAttention ran without the expected projection call "
                    "(a fast path or a changed torch version?); its parameters would be missed. "
                    "Report this with your torch version."
                )
            return None

        self.handles.append(mha.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(mha.register_forward_hook(post, with_kwargs=True, always_call=True))


def join_multi_output(records: list[Record]) -> list[Record]:
    """One record per call of a layer that returns several tensors (RNNs): their output gradients as a
    tuple, with zeros for outputs no gradient reached."""
    if all(not r.call for r in records):
        return records
    joined, parts = [], {}
    for r in records:
        if not r.call:
            joined.append(r)
            continue
        if r.call not in parts:
            parts[r.call] = {}
            joined.append(r.call)
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
