"""Layers whose output is the same for every example: per-example gradients read where it meets the batch.

T5's ``relative_attention_bias`` is an ``nn.Embedding`` looked up with a
``(q, k)`` bucket matrix that does not depend on the batch; its ``(q, k, heads)``
output is permuted, given a size-1 batch dimension, and added to every
example's attention scores. Relative-position tables normalised by a LayerNorm
before use, and position tables projected by a Linear, have the same shape of
problem: the layer's output has no batch dimension, so the gradient autograd
delivers to it is already the sum over the batch, and the layer's rule has no
per-example output gradient to work with. The same holds for an output with
size 1 at the batch dimension when no input carries the batch (DeBERTa-v2's
query map applied to its ``(1, 2k, d)`` positions; BERT's position embeddings
of ``(1, T)`` ids): it is followed the same way, its values and shapes
untouched for the model (expanding it at the layer would change what a model
that reshapes it by its own size computes). A module without a rule whose
call carries no batch in or out (BEiT's bias, which resamples its table with
``F.interpolate``) is followed too; its parameters' gradients are then the
vector-Jacobian product of its own forward (``layers/batch_free.py``).

Each example's share exists, though, at the point where the shared tensor
meets the batch: an operation (``scores + bias``, ``bias + mask``, a matmul)
whose other operand is batched. This module follows the layer's output
through the batch-free operations that derive other tensors from it (a
``TorchFunctionMode`` active during the forward of a model that has such
layers); at a meeting point it replaces the shared operand ``t`` by ``t``
expanded along a new batch dimension of size ``B`` (an operand the model
already broadcast to the batch itself, ``bias.expand(B, ...)``, learned by
content in ``meetings.py``, is cut to one example's rows, checked equal to the
others', and expanded again). The values and the result are unchanged, but
autograd now delivers the gradient of the *expanded* tensor, one slice per
example, before summing it. That slice is pulled back
through the batch-free operations to the layer's output (one batched
vector-Jacobian product, ``is_grads_batched``), accumulated over every meeting
point, and handed to the layer's ordinary rule with the layer's inputs
expanded to the batch: the Embedding rule sees ``B`` identical bucket matrices
and each example's own output gradient.

Nothing is guessed. Where the batch is in a meeting point's result is learned
by content (``meetings.py``): the first time an input signature runs a model
with such layers, three more probe passes (no gradients, the batch, its
examples reordered, as in ``layout.py``, and the batch again) follow the shared
outputs through every operation and print the results that may meet the batch;
an operation whose result's rows
equal the same examples' rows of the whole batch, where the reordering moved
them, is a meeting point, along that dimension (``d``), or along a dimension
that holds ``k`` rows per example (a ``rows.Fold``: window attention's
``(B * windows, heads, N, N)`` scores), and in any layout (sequence-first
models, ``(T, B, D)`` blocks inside batch-first ones). A table axis that
happens to equal ``B`` does not move with the batch, so it is never taken for
it. In the training forward the tracker counts the same operations and
expands the shared operand at the learned dimension; after the last operation
the probe saw on shared tensors it stops following (the rest of the forward
runs without its bookkeeping).

When the layer's summed gradient arrives, it must equal the sum over examples
of what the meeting points delivered; a use of the output that reached the
loss some other way (reduced over an axis, a penalty on the table) leaves a
difference, and the step is refused, naming the layer and the fix (freeze it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import BatchError, UnsupportedModuleError
from .layers.batch_free import DIRECT_RULE, Direct, input_gradients
from .meetings import Meeting, function_name, is_followed_through, learn_meetings
from .records import Record
from .rows import Fold
from .tensors import RequireGrad

def no_batch_error(where: str, shape: tuple) -> BatchError:
    """The refusal for a layer whose output has no batch dimension although one of its inputs has one."""
    return BatchError(
        f"{where}: its output of shape {shape} has no batch dimension (it is the same for every example), so "
        "its parameters' gradient cannot be split per example. Compute such a table once outside a module "
        "with trainable parameters, or freeze those parameters (requires_grad=False) before attach()."
    )


@dataclass(eq=False)  # compared and hashed by identity: one per layer call
class SharedOutput:
    """One call of a layer whose output has no batch dimension, followed to where it meets the batch."""

    where: str
    output: torch.Tensor  # the tensor the model goes on with (requires grad; its hook completes the record)
    batch_size: int
    emit: Callable[[torch.Tensor], None]  # called with the per-example output gradients (B, *output.shape)
    per_example: torch.Tensor | None = None
    meetings: int = field(default=0)
    pulling: bool = False  # a pull-back's own gradient of ``output`` is not the layer's summed gradient

    def add(self, rows: torch.Tensor) -> None:
        """Add per-example output gradients ``(B, *output.shape)`` from one meeting point."""
        self.per_example = rows if self.per_example is None else self.per_example + rows

    def complete(self, total: torch.Tensor) -> None:
        """The layer's summed output gradient arrived: check that the meeting points account for all of it."""
        if self.pulling:
            return
        total = total.detach()
        rows = self.per_example
        if rows is None:
            rows = total.new_zeros((self.batch_size, *total.shape))
        missing = (total - rows.sum(0)).abs().max() if total.numel() else total.new_zeros(())
        scale = total.abs().max() if total.numel() else total.new_zeros(())
        tolerance = (1e-9 if total.dtype == torch.float64 else 1e-4) * float(scale) + 1e-30
        if float(missing) > tolerance:
            raise UnsupportedModuleError(
                f"{self.where}: its output is the same for every example, and part of its gradient reached the "
                "loss other than through an operation with a batched tensor (reduced over an axis, or combined "
                f"with a tensor whose first dimension is not the batch; {self.meetings} meeting point(s) found), "
                "so its parameters' gradient cannot be split per example. Freeze those parameters "
                "(requires_grad=False) before attach(), or compute the table outside the model."
            )
        self.emit(rows)


class SharedOutputTracker(TorchFunctionMode):
    """Follows shared layer outputs through one forward pass (see the module docstring).

    Pushed by the root module's pre-hook for input signatures that have such layers, popped by its post-hook,
    so it sits below every capture mode a module pushes during the forward. A followed tensor may derive
    from several shared outputs (a table normalised by a LayerNorm: the Embedding's and the LayerNorm's);
    each gets its own pull-back at every meeting point. ``meetings`` holds, per operation on a followed
    tensor (other than the rearranging ones), in the order they run, what the meeting probe learned.
    """

    def __init__(self, batch_size: int, key: int, meetings: tuple[Meeting, ...]):
        super().__init__()
        self.batch_size = batch_size
        self.key = key  # the input signature it was pushed for (the hooks stop following when none was found)
        self.meetings = meetings
        self.count = 0  # operations on followed tensors so far
        self.paused = 0  # > 0 while the engine's own hook code runs (its copies and detaches are not the model's)
        self.derived: dict[int, tuple[torch.Tensor, tuple[SharedOutput, ...]]] = {}  # id -> (tensor, sources)
        self.sources: list[SharedOutput] = []

    def follow(self, source: SharedOutput, original: torch.Tensor) -> None:
        """Start following ``source.output`` (a copy of the layer's ``original`` output), and keep following
        the shared outputs ``original`` derived from (a LayerNorm of a table: the table's too)."""
        self.sources.append(source)
        self.derived[id(source.output)] = (source.output, self.sources_of(original) + (source,))

    def sources_of(self, x) -> tuple[SharedOutput, ...]:
        """The shared outputs ``x`` derives from through batch-free operations (empty: none)."""
        if not torch.is_tensor(x):
            return ()
        hit = self.derived.get(id(x))
        return hit[1] if hit is not None and hit[0] is x else ()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.derived or self.paused:
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        shared = [i for i, x in enumerate(flat) if self.sources_of(x)]
        if not shared:
            return func(*args, **kwargs)
        if not is_followed_through(func):
            meeting = self._next(func)
            if meeting.batch is not None:  # a meeting point: the result is batched and not followed further
                for i in shared:
                    flat[i] = self._meet(flat[i], meeting, flat, shared, i)
                args, kwargs = tree_unflatten(flat, spec)
                try:
                    return func(*args, **kwargs)
                except RuntimeError as err:
                    raise UnsupportedModuleError(
                        f"{self._where(flat, shared)}: its output is the same for every example and meets the batch "
                        f"in {meeting.name}, which does not broadcast it along the batch ({err}). Freeze those "
                        "parameters (requires_grad=False) before attach(), or compute the table outside the model."
                    ) from err
                finally:
                    self._stop_if_done()
        out = func(*args, **kwargs)
        sources = tuple(dict.fromkeys(s for i in shared for s in self.sources_of(flat[i])))
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t) and t.is_floating_point() and t.requires_grad:
                self.derived[id(t)] = (t, sources)
        self._stop_if_done()
        return out

    def _stop_if_done(self) -> None:
        """After the last operation the probe saw on shared outputs, stop following (the rest of the forward
        runs at full speed: BERT's positions meet the batch in its embeddings). A use the probe did not see
        would reach the loss past the meeting points, which each source's sum check refuses."""
        if self.count >= len(self.meetings):
            self.derived.clear()

    def _next(self, func) -> Meeting:
        index, self.count = self.count, self.count + 1
        name = function_name(func)
        meeting = self.meetings[index] if index < len(self.meetings) else None
        if meeting is None or meeting.name != name:
            raise BatchError(
                f"An output that is the same for every example went through {name} (operation {index} on it), "
                f"where the layout probe saw {'nothing' if meeting is None else meeting.name}: the forward "
                "takes another path in training than in the probe. Make the model's operations on relative-"
                "position tables independent of the batch, or freeze those parameters (requires_grad=False)."
            )
        if meeting.problem is not None:
            raise BatchError(meeting.problem)
        return meeting

    def _where(self, flat, shared) -> str:
        return ", ".join(dict.fromkeys(s.where for i in shared for s in self.sources_of(flat[i])))

    def _meet(self, t: torch.Tensor, meeting: Meeting, flat: list, shared: list, index: int) -> torch.Tensor:
        """``t`` expanded along the batch dimension of the operation's result; its gradient arrives one slice
        per example (or ``k`` slices per example, summed, where the batch is folded with another axis).

        An operand the model broadcast to the batch itself (``meeting.expanded``, learned by content) already
        holds the batch's rows there: it is cut to one example's rows (checked equal to every other
        example's) and expanded again, so its gradient arrives per example in the same way."""
        rank, spec, batch = meeting.rank, meeting.batch, self.batch_size
        d = spec.dim if isinstance(spec, Fold) else spec
        assert d is not None
        aligned = t.reshape((1,) * (rank - t.dim()) + tuple(t.shape)) if t.dim() < rank else t
        sizes = [x.shape[d - (rank - x.dim())] for i, x in enumerate(flat)
                 if torch.is_tensor(x) and i not in shared and 0 <= d - (rank - x.dim()) < x.dim()]
        rows = max(sizes, default=0)
        by_model = index in meeting.expanded
        if t.dim() > rank or aligned.shape[d] != (rows if by_model else 1) or not rows or rows % batch or (
                not isinstance(spec, Fold) and rows != batch):
            raise BatchError(
                f"{self._where(flat, shared)}: its output is the same for every example and meets the batch "
                f"along dimension {d} of a {meeting.name} result, where it has shape {tuple(t.shape)} (the other "
                f"operands have {rows} rows for {batch} examples), not "
                + ("the broadcast to the batch the layout probe found" if by_model else
                   "a size-1 or missing batch dimension: its rows would be combined with examples by position")
                + ". Freeze those parameters (requires_grad=False) before attach(), or compute the table outside "
                "the model."
            )
        for source in self.sources_of(t):
            source.meetings += 1
        major = spec.example_major if isinstance(spec, Fold) else True
        k = rows // batch
        if by_model:  # (.., B * k, ..) -> (.., B, k, ..) (or (k, B)): one example's rows, expanded again
            split = aligned.unflatten(d, (batch, k) if major else (k, batch))
            at = d if major else d + 1
            base = split.narrow(at, 0, 1)
            if not bool(((split == base) | (split != split)).all()):
                raise BatchError(
                    f"{self._where(flat, shared)}: the layout probe found that the model broadcasts this output, "
                    f"the same for every example, to the batch before {meeting.name}, but in this batch its rows "
                    "along the batch differ: the model's operations on it changed with the data. Keep the "
                    "operations on such tables independent of the batch, or freeze those parameters "
                    "(requires_grad=False) before attach()."
                )
            spread = base.expand(*[batch if i == at else -1 for i in range(split.dim())])
            expanded, hooked, shape = spread.flatten(d, d + 1), spread, tuple(base.shape)
            sum_fold = False
        else:
            expanded = hooked = aligned.expand(*[rows if i == d else -1 for i in range(rank)])
            base, at, shape, sum_fold = t, d, tuple(t.shape), isinstance(spec, Fold)
        sources, every = self.sources_of(t), self.sources

        def on_grad(grad: torch.Tensor):
            if sum_fold:  # t broadcast along the fold's k rows too: an example's k slices are summed
                per = grad.unflatten(d, (batch, -1) if major else (-1, batch))
                grad = per.sum(d + 1) if major else per.sum(d)
            per_example = grad.movedim(at, 0).reshape(batch, *shape)
            for source in sources:
                if base is source.output:
                    source.add(per_example.detach())
                    continue
                for s in every:  # the pull-back's own gradients of shared outputs are not theirs to check
                    s.pulling = True
                try:
                    source.add(_pull_back(base, source.output, per_example))
                finally:
                    for s in every:
                        s.pulling = False
            return None

        hooked.register_hook(on_grad)
        return expanded


class SharedTables:
    """The hooks' side of shared outputs: learns a signature's meetings, pushes one tracker per forward, and
    turns a layer call without a batch dimension into a followed :class:`SharedOutput`.

    Args:
        layouts: the engine's ``LayoutLearner`` (its probe passes).
        sink: the engine's capture sink (records go there).
        anchor: the engine's anchor tensor (an output that needs no gradient is tied to it).
        batch_dim_of: ``path -> the batch dimension the unit there works in``.
        owner_of: ``tensor -> (unit, local name, parameter)`` when the tensor is a trainable parameter a unit
            owns, else None: a layer input that is another unit's parameter, read as a tensor outside its module
            (DeBERTa-v2's ``LayerNorm(rel_embeddings.weight)``), gets its per-example gradients from the layer's
            input gradients (``layers/batch_free.py``, :class:`~dp_microclip.layers.batch_free.Direct`).
    """

    def __init__(self, layouts, sink, anchor: torch.Tensor, batch_dim_of: Callable[[str], int],
                 owner_of: Callable[[torch.Tensor], tuple | None] = lambda t: None):
        self.layouts, self.sink, self.anchor, self.batch_dim_of = layouts, sink, anchor, batch_dim_of
        self.owner_of = owner_of
        self.tracker: SharedOutputTracker | None = None
        self.unshared: set[int] = set()  # signatures (by id) whose forward had no such layer: not followed

    def begin(self, root, args, kwargs, signature, batch_size: int) -> None:
        """At the root's pre-hook: follow this forward's shared outputs if its signature has any."""
        if id(signature) in self.unshared or signature.probe_batch is None:
            return
        if signature.meetings is None:
            signature.meetings = learn_meetings(self.layouts, root, args, kwargs, signature, self.batch_dim_of)
        if signature.meetings is None:
            self.unshared.add(id(signature))  # no layer call without a batch dimension: nothing to follow
            return
        self.tracker = SharedOutputTracker(batch_size, id(signature), signature.meetings)
        self.tracker.__enter__()

    def end(self) -> None:
        """At the root's post-hook: stop following."""
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            tracker.__exit__(None, None, None)
            if not tracker.sources:
                self.unshared.add(tracker.key)

    def quiet(self):
        """A context in which the tracker ignores torch calls (the engine's hooks: not the model's operations)."""
        return _Quiet(self.tracker)

    def share(self, unit, name: str, rule, layer, params: dict, args: tuple, kwargs: dict, ctx, output: torch.Tensor,
              where: str, armed: list | None = None) -> torch.Tensor:
        """Follow ``output`` (no batch dimension, nor in any of ``args``) to where it meets the batch; when its
        per-example gradients are complete, emit one record for ``rule`` with ``args`` expanded to the batch
        (unless ``armed[0]`` was set False: the usage route dropped that forward's records)."""
        if self.tracker is None:
            raise no_batch_error(where, tuple(output.shape))
        with self.quiet():
            inputs = tuple(a.detach().expand(ctx.batch_size, *a.shape) if torch.is_tensor(a) else a for a in args)
            dims = tuple(0 if torch.is_tensor(a) else None for a in args)
            shared = output.clone() if output.requires_grad else RequireGrad.apply(self.anchor, output)
            sink = self.sink
            owners = [(i, self.owner_of(a)) for i, a in enumerate(args) if torch.is_tensor(a)] \
                if isinstance(layer, nn.Module) and rule is unit.rule else []
            direct = [(i, owner) for i, owner in owners if owner is not None and owner[0] is not unit]
            called = tuple(a.detach() if torch.is_tensor(a) else a for a in args)

            def emit(rows: torch.Tensor) -> None:
                if armed is not None and not armed[0]:
                    return
                sink.emit(Record(unit, name, rule, layer, params, inputs, dict(kwargs), rows, ctx, 0, dims))
                for i, (owner, local, p) in direct:  # another unit's parameter, read as this layer's input
                    per_example = input_gradients(layer, called, kwargs, i, rows, sink.replay)
                    sink.emit(Record(owner, f"{owner.path}.{local}<-{name}", DIRECT_RULE, Direct(local), {local: p},
                                     (), {}, per_example, ctx, 0))

            source = SharedOutput(where, shared, ctx.batch_size, emit)
            shared.register_hook(lambda grad: source.complete(grad) if sink.active else None)
        self.tracker.follow(source, output)
        return shared


class _Quiet:
    def __init__(self, tracker: SharedOutputTracker | None):
        self.tracker = tracker

    def __enter__(self):
        if self.tracker is not None:
            self.tracker.paused += 1

    def __exit__(self, *exc):
        if self.tracker is not None:
            self.tracker.paused -= 1


def _pull_back(t: torch.Tensor, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-example gradients of ``t`` pulled back to ``output`` through the batch-free ops between them."""
    pulled: torch.Tensor | None
    try:
        (pulled,) = torch.autograd.grad(t, output, rows, retain_graph=True, is_grads_batched=True,
                                        allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one vector-Jacobian product per example
        parts = [torch.autograd.grad(t, output, r, retain_graph=True, allow_unused=True)[0] for r in rows]
        pulled = torch.stack([torch.zeros_like(output) if p is None else p for p in parts]) if parts else None
    if pulled is None:
        return rows.new_zeros((rows.shape[0], *output.shape))
    return pulled.detach()
