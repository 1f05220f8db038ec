"""The capture inside ``torch.compile``: one traceable tap per layer call, completed when its gradient arrives.

The eager capture (``hooks.py``) registers a tensor hook on each layer's output whose body appends a
``Record`` to the engine: dynamo cannot trace a hook that changes Python state, so every hooked layer
broke the compiled graph in two. While dynamo traces a forward, a rule layer's forward hook does only
this instead:

    out = Tap.apply(key, anchor, token, out, *inputs)

``Tap`` is the identity on ``out`` that keeps the layer's inputs for its backward; its backward calls
the custom op ``dp_microclip::emit``, which the compiler keeps opaque and ordered (an effectful op: never
removed, never reordered), so the whole forward and backward trace as one graph each. At run time the
op's body is ordinary eager Python: it finds the forward pass by ``token`` (a CPU scalar holding the
``ForwardContext`` id, an input of the graph, so no recompilation per step), learns or reuses the
call's layout exactly as the eager hook does, and hands the same ``Record`` to the sink. Everything the
engine does afterwards (norms, clipping, sums, noise) is unchanged, so a compiled step equals the eager
one.

What the tap does not take (attention, RNNs, usage routes, tensor keyword arguments, a layer output
shared by the batch) keeps the eager hooks, which still work under ``torch.compile`` at the price of a
graph break.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch._library.effects import EffectType

from .errors import BatchError
from .layout import BROADCAST, CallLayout
from .records import Record, Shared, Unit
from .rows import batch_first
from .tensors import expand_at

#: key -> (weak reference to the owning TracedCapture, its method name, leading arguments): one key per tap.
#: Weak, so that a model and engine dropped without ``detach()`` are still freed (their keys with them).
_TAPS: dict[int, tuple[weakref.ref, str, tuple]] = {}
_keys = itertools.count()


def _forget(keys: list[int]) -> None:
    for key in keys:
        _TAPS.pop(key, None)


@torch.library.custom_op("dp_microclip::emit", mutates_args=())
def emit(grad: torch.Tensor, inputs: list[torch.Tensor], token: torch.Tensor, key: int) -> None:
    """Run in the backward pass of a compiled graph: complete the record of the tapped call ``key``."""
    ref, method, args = _TAPS.get(key, (None, "", ()))
    owner = ref() if ref is not None else None
    if owner is not None:  # None: the engine was detached (or freed) since the graph was traced
        # Copies: the compiled backward owns these buffers and may write into them once this op returns (its
        # memory planning reuses a buffer after its last use it knows of), but the record is read at the end of
        # the pass. Measured: without the copies the saved inputs were overwritten (wrong gradients).
        getattr(owner, method)(*args, grad.clone(), [t.clone() for t in inputs], int(token))


@emit.register_fake
def _emit_fake(grad, inputs, token, key):
    return None


torch.library._register_effectful_op("dp_microclip::emit", EffectType.ORDERED)


class Tap(torch.autograd.Function):
    """``out`` unchanged, requiring grad through ``anchor``; its gradient and ``inputs`` go to ``emit``."""

    @staticmethod
    def forward(ctx, key, anchor, token, out, *inputs):
        ctx.key = key
        ctx.save_for_backward(token, *inputs)
        return out.clone()  # a copy (as tensors.RequireGrad): an in-place op may follow; the compiler fuses it

    @staticmethod
    def backward(ctx, grad):
        token, *inputs = ctx.saved_tensors
        torch.ops.dp_microclip.emit(grad, inputs, token, ctx.key)
        return (None, None, None, grad) + (None,) * len(inputs)


def batched_inputs(unit: Unit, module, args: tuple, layout: CallLayout, batch: int) -> tuple[tuple, tuple]:
    """(batch-first inputs, input_dims) of one call as a record keeps them: an input without a batch
    dimension is kept as :class:`~dp_microclip.records.Shared`, one shared by the batch is expanded."""
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
            inputs.append(expand_at(a.detach(), unit.batch_dim, batch).movedim(unit.batch_dim, 0))
        else:
            inputs.append(batch_first(a.detach(), dim, batch))
    input_dims = tuple(None if d is None else (unit.batch_dim if d == BROADCAST else d) for d in layout.inputs)
    return tuple(inputs), input_dims


class TracedCapture:
    """The taps of one engine's hooks (``hooks.HookSet`` owns it): traced in the forward, completed in the backward.

    Args:
        sink: the engine's capture sink (records go there; its ``token`` names the forward in progress).
        layouts: the hooks' ``layout.LayoutLearner`` (the same layouts as the eager capture).
        anchor: the hooks' anchor, so that a tapped output needs a gradient even when nothing before it does.
    """

    def __init__(self, sink, layouts, anchor: torch.Tensor):
        self.sink = sink
        self.layouts = layouts
        self.anchor = anchor
        self.keys: list[int] = []
        weakref.finalize(self, _forget, self.keys)

    def key_for(self, method: str, *args) -> int:
        """A new tap key (a constant of the traced graph) whose gradient goes to ``self.<method>(*args, grad,
        inputs, ctx_id)`` (:meth:`complete` or :meth:`complete_projection`); removed with :meth:`remove`."""
        key = next(_keys)
        _TAPS[key] = (weakref.ref(self), method, args)
        self.keys.append(key)
        return key

    def tapping(self) -> bool:
        """Whether a layer traced now should be tapped: capturing, with gradients, inside the attached model's
        forward (outside it the eager hook raises its error)."""
        return self.sink.active and torch.is_grad_enabled() and self.sink.token is not None

    def _context(self, where: str, ctx_id: int):
        ctx = self.sink.context_by_id(ctx_id) if self.sink.active else None
        if ctx is None and self.sink.active:
            self.sink.report(f"{where}: under torch.compile, the gradient of a forward pass older than the "
                             "engine keeps track of arrived. Run backward() after each forward, or train eagerly.")
        return ctx

    def takes(self, unit: Unit, args: tuple, kwargs: dict, output) -> bool:
        """Whether this call can be tapped (decided while tracing, so it is fixed per compiled graph)."""
        return (unit.kind == "rule" and torch.is_tensor(output) and output.is_floating_point() and not kwargs
                and all(torch.is_tensor(a) for a in args) and self.tapping())

    def tap(self, key: int, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """The output to return from the forward hook: ``output`` through :class:`Tap`."""
        return Tap.apply(key, self.anchor, self.sink.token, output, *(a.detach() for a in args))

    def complete(self, unit: Unit, grad: torch.Tensor, inputs: list[torch.Tensor], ctx_id: int) -> None:
        """The backward half: the record the eager hook would have made, handed to the sink."""
        sink = self.sink
        where = f"{unit.path} ({type(unit.module).__name__})"
        ctx = self._context(where, ctx_id)
        if ctx is None:
            return
        args = tuple(inputs)
        index = ctx.next_call(unit.path)
        layout = self.layouts.layout(unit, ctx, index, args, grad)
        if index and layout != self.layouts.layout(unit, ctx, 0, args, grad):
            sink.report(f"{where} runs several times per forward with different layouts; under torch.compile "
                        "the engine cannot tell its calls apart. Train this model eagerly.")
            return
        out_dim = layout.output
        if out_dim is None or out_dim == BROADCAST:
            sink.report(f"{where}: its output is shared by the batch, which the engine follows only in eager "
                        "mode. Train this model without torch.compile, or expand the shared input to the batch.")
            return
        batch = ctx.batch_size
        batched, input_dims = batched_inputs(unit, unit.module, args, layout, batch)
        g = batch_first(grad, out_dim, batch).detach()
        sink.emit(Record(unit, unit.path, unit.rule, unit.module, unit.params, batched, {}, g, ctx, out_dim,
                         input_dims))

    def complete_projection(self, unit: Unit, name: str, rule, parts, params: dict, grad: torch.Tensor,
                            inputs: list[torch.Tensor], ctx_id: int) -> None:
        """The backward half of an attention projection (``layers/attention.py``): rows are T-major there
        (``row = t * B + b``), read as ``(B, T, E)`` for the Linear rule, as the eager capture does."""
        ctx = self._context(name, ctx_id)
        if ctx is None:
            return
        batch, x = ctx.batch_size, inputs[0]
        x3 = x.reshape(-1, batch, x.shape[-1]).transpose(0, 1)
        g3 = grad.reshape(-1, batch, grad.shape[-1]).transpose(0, 1)
        self.sink.emit(Record(unit, name, rule, parts, params, (x3,), {}, g3, ctx, 0))

    def remove(self) -> None:
        """Forget this engine's taps: a graph traced before ``detach()`` emits nothing afterwards."""
        _forget(self.keys)
        self.keys.clear()
