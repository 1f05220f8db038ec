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

from typing import Any

import torch
from torch import nn

from . import contract
from .capture import CaptureSink
from .errors import BatchError, PrivacyError, UnsupportedModuleError
from .layout import BROADCAST, CallLayout, LayoutLearner
from .mode_hooks import install_attention, install_rnn
from .layers.batch_free import BATCH_FREE_RULE, BatchFree
from .layers.traits import CHANNELS_FIRST
from .rows import batch_first
from .records import ForwardContext, Record, Unit
from .shared_outputs import SharedTables, no_batch_error
from .traced import TracedCapture, batched_inputs
from .tensors import RequireGrad, expand_at, first_tensor, output_tensors
from .usage import UsageCapture


def in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (e.g. checkpoint recomputation).

    A forward dynamo traces is never a recomputation (compiled checkpointing replays the graph, not the hooks)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


class HookSet:
    """Installs and owns every hook of one engine; everything captured goes to ``sink``.

    Args:
        sink: the engine's :class:`~dp_microclip.capture.CaptureSink` (the hooks' only seam).
        root_batch_dim: the declared batch dimension of the model's first input (None: learned by the probe);
            ``self.root_batch_dim`` is the one of the forward in progress.
        probe_failure_is_error: DP mode: a failed layout probe raises (see ``layout.LayoutLearner``), and
            the per-example contract is verified (``contract.py``).
    """

    def __init__(self, sink: CaptureSink, root_batch_dim: int | None, probe_failure_is_error: bool):
        self.sink = sink
        self.dp = probe_failure_is_error
        self.handles: list = []
        self.root_batch_dim = root_batch_dim if root_batch_dim is not None else 0
        self.anchor = torch.zeros((), requires_grad=True)  # makes RequireGrad's output need a gradient
        self.layouts = LayoutLearner(root_batch_dim, probe_failure_is_error, sink.warn_once)
        self.no_grad_in_forward: set[str] = set()  # units seen under no_grad inside a forward (checkpointing)
        self.loss_checks_left = 1  # DP mode: the first backward pass's logits gradient is checked (contract.py)
        self.batch_dims: dict[str, int] = {}  # unit path -> the batch dimension it works in
        self.owners: dict[int, tuple] = {}  # id(parameter) -> (unit, local name, parameter)
        self.shared = SharedTables(self.layouts, sink, self.anchor, self._batch_dim_of,  # shared_outputs.py
                                   self._owner_of)
        self.traced = TracedCapture(sink, self.layouts, self.anchor)  # the capture under torch.compile

    # ------------------------------------------------------------------ install
    def install_root(self, root: nn.Module) -> None:
        """Hook the attached model itself: its pre-hook finds B, probes new signatures and opens the pass's context."""
        def pre(module, args, kwargs):
            if self.layouts.probing is not None or not self.sink.active:
                return None
            if not torch.is_grad_enabled() or in_backward():
                return None  # evaluation passes take no micro-batch and no sampled batch
            signature, batch_size = self.layouts.signature(root, args, kwargs)
            self.root_batch_dim = signature.input_dims[0]  # the sampled-rows check reads the first input's
            if self.dp and batch_size >= 3 and signature.probe_batch is not None and not signature.rows_checked:
                signature.rows_checked = True  # once per input signature, on its first batch of 3 or more
                with self.sink.replay():
                    mixed = contract.rows_mixed(root, args, kwargs, signature.output_dims, batch_size,
                                                lambda kept: signature.shrink(args, kwargs, kept))
                if mixed is not None:
                    signature.rows_checked = False
                    raise PrivacyError(contract.mixing_error(mixed))
            self.shared.begin(root, args, kwargs, signature, batch_size)  # shared_outputs.py
            x = first_tensor((args, kwargs))
            assert x is not None  # signature() refuses a call without a tensor
            self.sink.open_context(batch_size, x.device, signature, (args, kwargs))
            return None

        def post(module, args, kwargs, output):
            self.shared.end()
            if self.layouts.probing is None:
                self.sink.close_context()
                problem = contract.model_loss_problem(output) if self.dp and self.sink.active else None
                if problem is not None and torch.is_grad_enabled():
                    raise PrivacyError(problem)
                if self.dp and self.loss_checks_left and self.sink.active and torch.is_tensor(output) \
                        and output.requires_grad and torch.is_grad_enabled():
                    self._check_loss(output)
            return None

        # Installed after the units: the pre-hook goes first (prepend) and the post-hook last, so a
        # root that is itself a hooked layer still sees an open context.
        # Both run eagerly under torch.compile (one graph break before and one after the model's graph).
        self.handles.append(root.register_forward_pre_hook(torch.compiler.disable(pre), with_kwargs=True,
                                                           prepend=True))
        self.handles.append(root.register_forward_hook(torch.compiler.disable(post), with_kwargs=True,
                                                       always_call=True))
        self.root = root

    def _check_loss(self, logits: torch.Tensor) -> None:
        """On the first DP backward pass, read the per-example loss weights off the logits' gradient."""
        self.loss_checks_left -= 1

        def on_grad(grad: torch.Tensor):
            problem = contract.normalised_loss_problem(logits, grad) if self.sink.active else None
            if problem is not None:
                self.sink.report(problem)

        logits.register_hook(on_grad)

    def _batch_dim_of(self, path: str) -> int:
        """The batch dimension the unit at ``path`` (or whose usage-route call is at ``path[...]``) works in."""
        return self.batch_dims.get(path.split("[", 1)[0], self.root_batch_dim)

    def _owner_of(self, t: torch.Tensor) -> tuple | None:
        """``(unit, local name, parameter)`` when ``t`` is a trainable parameter a unit owns, else None."""
        hit = self.owners.get(id(t))
        return hit if hit is not None and hit[2] is t else None

    def install_unit(self, unit: Unit) -> None:
        """Hook one unit: its forward hook captures inputs and watches the output's gradient."""
        self.batch_dims[unit.path] = unit.batch_dim
        self.owners.update({id(p): (unit, name, p) for name, p in unit.params.items()})
        if unit.kind in ("attention", "rnn") or isinstance(unit.module, CHANNELS_FIRST):
            self.layouts.declared[unit.path] = unit.batch_dim  # the probe checks it against what it finds
        if unit.kind == "attention":
            install_attention(self, unit)
        elif unit.kind == "rnn":
            install_rnn(self, unit)
        elif unit.kind == "functional":  # usage.py; the generic capture takes the calls it cannot
            usage = UsageCapture(unit, self.sink, self.layouts, lambda out: RequireGrad.apply(self.anchor, out),
                                 self.shared, lambda *call: self._batch_free_call(unit, *call))
            self.handles.extend(usage.install())
            self._install_layer(unit, usage.generic_params)
        else:
            self._install_layer(unit)

    def remove(self) -> None:
        """Remove every hook this set installed (``Engine.detach``)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.traced.remove()

    # ------------------------------------------------------------------ helpers
    def _note_checkpointing(self, unit: Unit) -> None:
        """Reentrant gradient checkpointing runs a segment under no_grad in the forward and again, with
        gradients, inside the backward: the engine sees neither run with a usable output gradient, so those
        layers would silently get no gradient. Recognise the pair and refuse with the fix."""
        if not self.sink.active:
            return
        if not torch.is_grad_enabled() and self.sink.context is not None:
            self.no_grad_in_forward.add(unit.path)
        elif in_backward() and torch.is_grad_enabled() and unit.path in self.no_grad_in_forward:
            self.sink.report(
                f"{unit.path} ({type(unit.module).__name__}) ran under torch.no_grad() inside the model's forward and "
                "again, with gradients, during the backward pass: gradient checkpointing with use_reentrant=True, "
                "whose recomputed gradients the engine cannot see per example. Use non-reentrant checkpointing: "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or in HuggingFace "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})."
            )

    def capturing(self) -> ForwardContext | None:
        """The forward pass to capture into, or None (not capturing: detached, no grad, a recomputation)."""
        if not self.sink.active or not torch.is_grad_enabled() or in_backward():
            return None
        ctx = self.sink.context
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
        sink = self.sink
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
            if sink.active:
                g = batch_first(grad.reshape(shape), bd, ctx.batch_size).detach()
                sink.emit(Record(unit, name, rule, layer, params, inputs, kwargs, g, ctx, bd, input_dims,
                                    kw_names=kw_names))
            return None

        target.register_hook(on_grad)
        return replacement

    # ------------------------------------------------------------------ layers
    def _batch_free_call(self, unit: Unit, module, args, kwargs, output) -> bool:
        """Whether this call of a module without a rule has no batch in its inputs nor in its output (its
        usage route's problems do not matter then: ``_shared_output`` takes it by its own VJP)."""
        ctx = self.sink.context
        if ctx is None or self.shared.tracker is None or not torch.is_tensor(output):
            return False
        presented = _call_tensors(unit, module, args, kwargs)[0]
        try:
            layout = self.layouts.layout(unit, ctx, ctx.calls.get(unit.path, 0), presented, output)
        except BatchError:
            return False
        return _batch_free(layout)

    def _install_layer(self, unit: Unit, generic_params=None) -> None:
        def call_tensors(module, args, kwargs) -> tuple[tuple, tuple]:
            return _call_tensors(unit, module, args, kwargs)

        key = self.traced.key_for("complete", unit) if unit.kind == "rule" else None

        def post(module, args, kwargs, output):
            if torch.compiler.is_compiling() and key is not None and self.layouts.probing is None \
                    and self.shared.tracker is None and self.sink.active and torch.is_grad_enabled() \
                    and self.traced.takes(unit, args, kwargs, output):
                return self.traced.tap(key, args, output)  # traced.py: no graph break
            with self.shared.quiet():  # the engine's copies of a shared output are not the model's operations
                return capture(module, args, kwargs, output)

        def capture(module, args, kwargs, output):
            if self.layouts.probing is not None:
                self.layouts.record_probe_call(unit.path, call_tensors(module, args, kwargs)[0], output)
                return None
            self._note_checkpointing(unit)
            ctx = self.capturing()
            if ctx is None:
                return None
            params = unit.params if generic_params is None else generic_params()
            if not params:  # the usage route took it (or nothing to replay); call indices still match the probe's
                ctx.next_call(unit.path)
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
            presented, kw_names = call_tensors(module, args, kwargs)
            if kw_names and unit.kind == "rule":
                raise UnsupportedModuleError(
                    f"{unit.path} ({type(module).__name__}) was called with tensor keyword argument(s) "
                    f"{list(kw_names)}, which its rule does not read. Pass them positionally, or register a rule "
                    "for this module type that takes them."
                )
            call = (args, kwargs)  # as the module was called (a batch-free replay runs it again)
            # Tensor keyword arguments (generic path) are laid out and split like positional ones, after them.
            args, kwargs = presented, {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
            index = ctx.next_call(unit.path)
            layout = self.layouts.layout(unit, ctx, index, args, output)
            if torch.is_tensor(output) and (layout.output is None or (
                    _batch_free(layout) and self.shared.tracker is not None)):
                return self._shared_output(unit, module, params, args, kwargs, ctx, output, layout, call)
            batch = ctx.batch_size
            inputs, input_dims = batched_inputs(unit, module, args, layout, batch)
            if not torch.is_tensor(output):
                return self._watch_outputs(unit, module, params, inputs, dict(kwargs), ctx, output, layout,
                                           input_dims, (ctx.id, unit.path, index), kw_names)
            replaced = None
            out_dim = layout.output
            if out_dim == BROADCAST:
                # One value shared by the batch, not followed (no meeting probe ran: an empty batch): expanded
                # to the batch so that each example's output gradient, and so its share of the gradient, exists.
                output = replaced = expand_at(output, unit.batch_dim, batch)
                out_dim = unit.batch_dim
            if not output.requires_grad:
                # The engine switched the weights' own requires_grad off (autograd would compute an
                # unclipped weight gradient and throw it away). With an input that needs no gradient
                # either (the first layer, an embedding), the output would need none and no output
                # gradient would arrive: tie the output to the engine's anchor so it does.
                output = replaced = RequireGrad.apply(self.anchor, output)
            cloned = self._watch_output(
                unit, unit.path, unit.rule, module, params, inputs, dict(kwargs), ctx, output, out_dim,
                input_dims, kw_names,
            )
            return cloned if cloned is not None else replaced

        self.handles.append(unit.module.register_forward_hook(post, with_kwargs=True))

    def _shared_output(self, unit: Unit, module, params, args, kwargs, ctx, output, layout: CallLayout,
                       call: tuple):
        """A layer whose output is the same for every example (no batch dimension, or size 1 there, with no
        batch in its inputs): followed to where it meets the batch, its values and shapes untouched. A layer
        with a rule gets its rule; a module without one, the VJP of its own forward (``layers/batch_free.py``)."""
        where = f"{unit.path or '<root module>'} ({type(module).__name__})"
        if not _batch_free(layout) or unit.kind not in ("rule", "functional", "generic"):
            raise no_batch_error(where, tuple(output.shape))
        rule, layer = unit.rule, module
        if unit.kind != "rule":
            call_args, call_kwargs = torch.utils._pytree.tree_map(
                lambda x: x.detach() if torch.is_tensor(x) else x, call)
            rule, layer = BATCH_FREE_RULE, BatchFree(module, params, call_args, call_kwargs, self.sink.replay,
                                                     where, output.detach())
        return self.shared.share(unit, unit.path, rule, layer, params, args, kwargs, ctx, output, where)

    def _watch_outputs(self, unit: Unit, module, params, inputs, kwargs, ctx, output, layout: CallLayout,
                       input_dims, call, kw_names: tuple = ()) -> Any:
        """Several output tensors (RNNs): one partial record per output gradient; the engine joins them.

        An output whose gradient never arrives (h_n unused by the loss) counts as a zero gradient.
        """
        leaves, spec = torch.utils._pytree.tree_flatten(output)
        positions = [i for i, x in enumerate(leaves) if torch.is_tensor(x)]
        dims = layout.output
        assert isinstance(dims, tuple)  # a multi-output call's layout has one entry per output tensor
        shapes = tuple(
            tuple(leaves[p].movedim(d, 0).shape) if d is not None else None for p, d in zip(positions, dims))
        sink = self.sink
        for slot, (p, d) in enumerate(zip(positions, dims)):
            t = leaves[p]
            if d is None or not t.is_floating_point():
                continue
            if not t.requires_grad:
                t = leaves[p] = RequireGrad.apply(self.anchor, t)
            elif t._base is not None:
                t = leaves[p] = t.clone()

            def on_grad(grad, slot=slot, d=d, shape=t.shape):
                if sink.active:
                    g = grad.reshape(shape)
                    g = (g.movedim(d, 0) if d != 0 else g).detach()
                    sink.emit(Record(unit, unit.path, None, module, params, inputs, kwargs, g, ctx, dims,
                                        input_dims, call, slot, shapes, kw_names))
                return None

            t.register_hook(on_grad)
        return torch.utils._pytree.tree_unflatten(leaves, spec)


def _batch_free(layout: CallLayout) -> bool:
    """A call whose output has no batch dimension (or size 1 there) and whose inputs carry no batch either."""
    return layout.output in (None, BROADCAST) and all(d is None or d == BROADCAST for d in layout.inputs)


def _call_tensors(unit: Unit, module, args, kwargs) -> tuple[tuple, tuple]:
    """(the call's inputs as the layout and the rule see them, tensor keyword names): tensor keyword arguments
    after the positional ones, or the rule's own form of the call (``LayerRule.present``)."""
    present = unit.rule.present if unit.kind == "rule" and unit.rule is not None else None
    if present is not None:
        return tuple(present(module, tuple(args), kwargs)), ()
    kw_names = tuple(sorted(k for k, v in kwargs.items() if torch.is_tensor(v)))
    return tuple(args) + tuple(kwargs[k] for k in kw_names), kw_names
