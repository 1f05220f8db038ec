"""Layers whose output is the same for every example: per-example gradients read where it meets the batch.

T5's ``relative_attention_bias`` is an ``nn.Embedding`` looked up with a
``(q, k)`` bucket matrix that does not depend on the batch; its ``(q, k, heads)``
output is permuted, given a size-1 batch dimension, and added to every
example's attention scores. Relative-position tables normalised by a LayerNorm
before use, and position tables projected by a Linear, have the same shape of
problem: the layer's output has no batch dimension, so the gradient autograd
delivers to it is already the sum over the batch, and the layer's rule has no
per-example output gradient to work with.

Each example's share exists, though, at the point where the shared tensor
meets the batch: an operation (``scores + bias``, ``bias + mask``, a matmul)
whose other operand is batched. This module follows the layer's output
through the batch-free operations that derive other tensors from it (a
``TorchFunctionMode`` active during the forward of a model that has such
layers); at a meeting point it replaces the shared operand ``t`` by ``t``
expanded along a new batch dimension of size ``B``. The values and the result
are unchanged, but autograd now delivers the gradient of the *expanded*
tensor, one slice per example, before summing it. That slice is pulled back
through the batch-free operations to the layer's output (one batched
vector-Jacobian product, ``is_grads_batched``), accumulated over every meeting
point, and handed to the layer's ordinary rule with the layer's inputs
expanded to the batch: the Embedding rule sees ``B`` identical bucket matrices
and each example's own output gradient.

The model may broadcast the shared tensor to the batch itself (MPNet:
``bias.expand(B, -1, q, k)``; DeBERTa-v2: a per-head table ``.repeat(B, 1, 1)``
to meet ``(B*heads, q, d)`` queries). Such an ``expand`` / ``repeat`` whose
leading size is ``B`` (or ``B`` times the table's leading size) is a meeting
point too: the engine rebuilds it from an expansion along a new batch
dimension, which it reads one slice per example. A size can equal ``B`` by
coincidence, so such a meeting counts only once confirmed: its result (or what
is derived from it by batch-free operations) must later be combined with a
batched tensor of the same rank and the same leading size. The probe ran the
model on another batch size, so a leading size that meets the batch there
follows the batch. An unconfirmed one delivers nothing, and the sum check
below refuses the step.

Nothing is guessed. When the layer's summed gradient arrives, it must equal
the sum over examples of what the meeting points delivered; a use of the
output that reached the loss some other way (reduced over an axis, compared
to a tensor whose first dimension is not the batch) leaves a difference, and
the step is refused, naming the layer and the fix (freeze it). A meeting point
is an operation with a batched operand of the output's rank whose first
dimension is the batch size, while the shared operand has size 1 there (or
lacks the dimension): the batch is the model's leading dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import BatchError, UnsupportedModuleError

# Operations that only rearrange or copy their input: their output is still the same for every example.
_NO_MEETING = {
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.permute, torch.permute,
    torch.Tensor.transpose, torch.transpose, torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze,
    torch.squeeze, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.clone, torch.clone,
    torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.repeat, torch.Tensor.__getitem__,
    torch.Tensor.type_as, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16,
}


# The model's own broadcasts: a leading size equal to the batch makes them meeting points (once confirmed).
_TO_BATCH = {torch.Tensor.expand, torch.Tensor.broadcast_to, torch.broadcast_to, torch.Tensor.repeat}


@dataclass(eq=False)
class _Pending:
    """A meeting at the model's own broadcast to the batch, waiting for a batched tensor to confirm it."""

    confirmed: bool = False


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
    each gets its own pull-back at every meeting point.
    """

    def __init__(self, batch_size: int, key: int):
        super().__init__()
        self.batch_size = batch_size
        self.key = key  # the input signature it was pushed for (the hooks stop following when none was found)
        self.derived: dict[int, tuple[torch.Tensor, tuple[SharedOutput, ...]]] = {}  # id -> (tensor, sources)
        self.sources: list[SharedOutput] = []
        self.pending: dict[int, tuple[torch.Tensor, tuple[_Pending, ...]]] = {}  # the model's own broadcasts

    def follow(self, source: SharedOutput) -> None:
        """Start following ``source.output`` (and keep following what it already derived from)."""
        self.sources.append(source)
        self.derived[id(source.output)] = (source.output, self.sources_of(source.output) + (source,))

    def sources_of(self, x) -> tuple[SharedOutput, ...]:
        """The shared outputs ``x`` derives from through batch-free operations (empty: none)."""
        if not torch.is_tensor(x):
            return ()
        hit = self.derived.get(id(x))
        return hit[1] if hit is not None and hit[0] is x else ()

    def _pending_of(self, x) -> tuple[_Pending, ...]:
        hit = self.pending.get(id(x)) if torch.is_tensor(x) else None
        return hit[1] if hit is not None and hit[0] is x else ()

    def _confirm(self, func, flat: list) -> tuple[_Pending, ...]:
        """Confirm pending meetings combined here with a batched tensor; the unconfirmed ones among ``flat``."""
        waiting = [(x, p) for x in flat for p in self._pending_of(x) if not p.confirmed]
        if not waiting:
            return ()
        if func not in _NO_MEETING:
            others = [x for x in flat if torch.is_tensor(x) and not self._pending_of(x) and not self.sources_of(x)]
            for x, p in waiting:
                if any(o.dim() == x.dim() and o.dim() > 0 and o.shape[0] == x.shape[0] for o in others):
                    p.confirmed = True
        return tuple(dict.fromkeys(p for _, p in waiting if not p.confirmed))

    def _touches(self, args, kwargs) -> bool:
        """Whether a followed tensor is among the arguments (top level or in a list): a cheap first look."""
        for x in (*args, *kwargs.values()):
            if isinstance(x, (list, tuple)):
                if any(id(y) in self.derived or id(y) in self.pending for y in x):
                    return True
            elif id(x) in self.derived or id(x) in self.pending:
                return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.derived or not self._touches(args, kwargs):
            return func(*args, **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        waiting = self._confirm(func, flat) if self.pending else ()
        shared = [i for i, x in enumerate(flat) if self.sources_of(x)]
        if not shared:
            out = func(*args, **kwargs)
            # Still the model's broadcast (a view, a cast, a scale: no other tensor took part) until confirmed.
            if waiting and all(self._pending_of(x) for x in flat if torch.is_tensor(x)):
                for t in tree_flatten(out)[0]:
                    if torch.is_tensor(t) and t.requires_grad:
                        self.pending[id(t)] = (t, waiting)
            return out
        if func in _TO_BATCH and shared == [0]:
            met = self._meet_broadcast(func, args, kwargs)
            if met is not None:
                return met
        if func not in _NO_MEETING:
            rank = max(x.dim() for x in flat if torch.is_tensor(x))
            batched = rank > 0 and any(
                torch.is_tensor(x) and i not in shared and x.dim() == rank and x.shape[0] == self.batch_size
                for i, x in enumerate(flat))
            if batched:  # the result is batched: not followed further
                for i in shared:
                    t = flat[i]
                    if t.dim() < rank or t.shape[0] == 1:
                        flat[i] = self._meet(t, rank)
                args, kwargs = tree_unflatten(flat, spec)
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        sources = tuple(dict.fromkeys(s for i in shared for s in self.sources_of(flat[i])))
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t) and t.is_floating_point() and t.requires_grad:
                self.derived[id(t)] = (t, sources)
        return out

    def _meet_broadcast(self, func, args, kwargs) -> torch.Tensor | None:
        """The model broadcasts shared ``t`` to the batch itself: ``t.expand(B, ...)`` of a size-1 (or new)
        leading dimension, or ``t.repeat(B, 1, ...)`` (rows of example i: ``i*k .. i*k + k-1``). The result is
        rebuilt from a hooked expansion (same values); None when the leading size is not the batch."""
        t, batch = args[0], self.batch_size
        out = func(*args, **kwargs)
        if not torch.is_tensor(out) or out.dim() == 0 or not out.requires_grad or out.shape[0] != batch * (
                t.shape[0] if func is torch.Tensor.repeat and t.dim() else 1):
            return None
        if func is torch.Tensor.repeat:
            if kwargs or len(args) < 2:
                return None
            sizes = tuple(args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:])
            if len(sizes) != t.dim() or t.dim() == 0 or sizes[0] != batch or any(r != 1 for r in sizes[1:]):
                return None
            tail = tuple(t.shape)  # (B, k, ...) flattened to (B*k, ...)
        else:
            aligned = (1,) * (out.dim() - t.dim()) + tuple(t.shape)
            if aligned[0] != 1:
                return None
            tail = aligned[1:]
        token = _Pending()
        expanded = t.expand(batch, *tail)
        self._read_rows(t, expanded, token)
        result = expanded.reshape(out.shape) if func is torch.Tensor.repeat else expanded.expand(out.shape)
        self.pending[id(result)] = (result, (token,))
        return result

    def _meet(self, t: torch.Tensor, rank: int) -> torch.Tensor:
        """``t`` expanded along a new leading batch dimension; its gradient arrives one slice per example."""
        aligned = t.reshape((1,) * (rank - t.dim()) + tuple(t.shape)) if t.dim() < rank else t
        expanded = aligned.expand(self.batch_size, *aligned.shape[1:])
        self._read_rows(t, expanded)
        return expanded

    def _read_rows(self, t: torch.Tensor, expanded: torch.Tensor, token: _Pending | None = None) -> None:
        """Hook ``expanded`` (``t`` along a leading batch dimension): its gradient, one slice per example, is
        added to each shared output ``t`` derives from (pulled back to it), once ``token`` (if any) is confirmed."""
        sources, every = self.sources_of(t), self.sources
        for source in sources:
            source.meetings += 1
        batch, shape = self.batch_size, tuple(t.shape)

        def on_grad(grad: torch.Tensor):
            if token is not None and not token.confirmed:
                return None  # never met a batched tensor: the sum check refuses the step
            rows = grad.reshape(batch, *shape)
            for source in sources:
                if t is source.output:
                    source.add(rows.detach())
                    continue
                for s in every:  # the pull-back's own gradients of shared outputs are not theirs to check
                    s.pulling = True
                try:
                    source.add(_pull_back(t, source.output, rows))
                finally:
                    for s in every:
                        s.pulling = False
            return None

        expanded.register_hook(on_grad)


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
