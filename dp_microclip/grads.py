"""Module hooks: capture each layer call's inputs and output gradient as a ``Record``.

Data flow (one forward + backward):

* the root module's forward pre-hook opens a ``ForwardContext`` (batch size,
  groups of this batch); its forward hook closes it;
* each hooked unit's forward hook keeps its (detached, batch-first) inputs and
  registers a tensor hook on its output; when the output gradient arrives, the
  tensor hook emits a complete ``Record`` to the engine;
* the first record of a backward pass queues an end-of-backward callback on the
  autograd engine, where the engine turns the pass's records into clipped sums.

Nothing is stored on the user's modules or parameters: the records live in the
engine, and a record that never gets its gradient dies with the autograd graph.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import BatchError, UnsupportedModuleError
from .grouping import Groups
from .layers.attention import AttentionCapture, LinearParts
from .layers.registry import LayerRule, rule_for_type

_context_ids = itertools.count()


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


@dataclass
class ForwardContext:
    """One forward pass of the attached model: its batch size and groups."""

    batch_size: int
    groups: Groups
    drawn_by_engine: bool = False  # its groups came from engine.data_loader (DP: Poisson sampling verified)
    id: int = field(default_factory=lambda: next(_context_ids))


@dataclass
class Unit:
    """A hooked module and the trainable parameters it owns (by local name)."""

    path: str
    module: nn.Module
    kind: str  # "rule" | "attention" | "generic"
    rule: LayerRule | None
    params: dict[str, nn.Parameter]
    batch_dim: int | None  # declared by the module or an ancestor; None: found per call


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
    batch_dim: int  # where the batch was in the layer's own layout (inputs here are batch-first)


def first_tensor(obj) -> torch.Tensor | None:
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


class HookSet:
    """Installs and owns every hook of one engine. ``engine`` provides:

    ``active()`` (hooks do nothing when False), ``open_context(batch_size, device)``,
    ``close_context()``, ``current_context()``, ``emit(record)``, and
    ``replaying`` (a context manager that switches hooks off while a generic
    module is re-run by torch.func).
    """

    def __init__(self, engine, preferred_batch_dim: int = 0):
        self.engine = engine
        self.handles: list = []
        # When both dims 0 and 1 have the batch size and nothing is declared, use the root's layout.
        self.preferred_batch_dim = preferred_batch_dim
        self.anchor = torch.zeros((), requires_grad=True)  # makes RequireGrad's output need a gradient

    # ------------------------------------------------------------------ install
    def install_root(self, root: nn.Module, batch_dim: int) -> None:
        def pre(module, args, kwargs):
            if not self.engine.active() or not torch.is_grad_enabled():
                return None  # evaluation passes take no micro-batch and no sampled batch
            x = first_tensor((args, kwargs))
            if x is None:
                raise BatchError("The model was called without a tensor argument: cannot find the batch size.")
            if x.dim() <= batch_dim:
                raise BatchError(
                    f"The model's first input has shape {tuple(x.shape)}, with no batch dimension {batch_dim}. "
                    "Pass batched inputs, or set attach(..., batch_first=...) to name the batch dimension."
                )
            self.engine.open_context(int(x.shape[batch_dim]), x.device)
            return None

        def post(module, args, kwargs, output):
            self.engine.close_context()
            return None

        # Installed after the units: the pre-hook goes first (prepend) and the post-hook last, so a
        # root that is itself a hooked layer still sees an open context.
        self.handles.append(root.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        self.handles.append(root.register_forward_hook(post, with_kwargs=True, always_call=True))

    def install_unit(self, unit: Unit) -> None:
        if unit.kind == "attention":
            self._install_attention(unit)
        else:
            self._install_layer(unit)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # ------------------------------------------------------------------ helpers
    def _capturing(self) -> ForwardContext | None:
        if not self.engine.active() or not torch.is_grad_enabled():
            return None
        ctx = self.engine.current_context()
        if ctx is None:
            raise BatchError(
                "A hooked layer ran outside a forward call of the attached model (e.g. a submodule "
                "called directly). Call the model passed to attach(), or attach the engine to the "
                "module you call."
            )
        return ctx

    def _resolve_batch_dim(self, unit: Unit, ctx: ForwardContext, x: torch.Tensor) -> int:
        """The batch dimension of this call's input: declared by the module (or an ancestor),
        else the one dimension among the first two that can hold the batch and has its size."""
        if unit.batch_dim is not None:
            return unit.batch_dim
        module = unit.module
        if isinstance(module, (nn.modules.conv._ConvNd, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            return 0  # torch's own convention for these layers: (N, C, ...)
        if isinstance(module, nn.Linear):
            candidates = range(x.dim() - 1)
        elif isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
            candidates = range(x.dim() - len(module.normalized_shape))
        else:
            candidates = range(x.dim())
        matches = [d for d in candidates if d < 2 and x.shape[d] == ctx.batch_size]
        if len(matches) == 1:
            return matches[0]
        if len(matches) == 2:
            return self.preferred_batch_dim
        return 0  # the size check in _batch_first raises with the fix

    def _batch_first(self, unit: Unit, ctx: ForwardContext, tensor: torch.Tensor, what: str, bd: int) -> torch.Tensor:
        if tensor.dim() <= bd or tensor.shape[bd] != ctx.batch_size:
            shape = tuple(tensor.shape)
            raise BatchError(
                f"{unit.path} ({type(unit.module).__name__}): its {what} has shape {shape}, but the batch "
                f"has {ctx.batch_size} examples along dimension {bd}. A layer whose input is shared by the "
                "whole batch (batch size 1 broadcast, or no batch dimension) cannot be split per example: "
                "expand it to the batch (e.g. positions.expand(batch_size, -1)), or set the batch dimension "
                "with attach(..., batch_first=...)."
            )
        return tensor.movedim(bd, 0) if bd != 0 else tensor

    def _watch_output(self, unit: Unit, name, rule, layer, params, inputs, kwargs, ctx, output, bd: int):
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
            if engine.active():
                g = self._batch_first(unit, ctx, grad.reshape(shape), "output gradient", bd).detach()
                engine.emit(Record(unit, name, rule, layer, params, inputs, kwargs, g, ctx, bd))
            return None

        target.register_hook(on_grad)
        return replacement

    # ------------------------------------------------------------------ layers
    def _install_layer(self, unit: Unit) -> None:
        def post(module, args, kwargs, output):
            ctx = self._capturing()
            if ctx is None:
                return None
            if not torch.is_tensor(output):
                raise UnsupportedModuleError(
                    f"{unit.path} ({type(module).__name__}) returned {type(output).__name__}; dp_microclip "
                    "needs layers with trainable parameters to return one tensor. Register a rule with "
                    "dp_microclip.register_rule(...), or restructure the module."
                )
            for key, value in kwargs.items():
                if torch.is_tensor(value):
                    raise UnsupportedModuleError(
                        f"{unit.path} ({type(module).__name__}) was called with tensor keyword argument "
                        f"{key!r}; pass tensors positionally so they can be split per example."
                    )
            first = args[0] if args and torch.is_tensor(args[0]) else output
            bd = self._resolve_batch_dim(unit, ctx, first)
            inputs = tuple(
                self._batch_first(unit, ctx, a.detach(), f"input {i}", bd) if torch.is_tensor(a) else a
                for i, a in enumerate(args)
            )
            replaced = None
            if not output.requires_grad:
                # The engine switched the weights' own requires_grad off (autograd would compute an
                # unclipped weight gradient and throw it away). With an input that needs no gradient
                # either (the first layer, an embedding), the output would need none and no output
                # gradient would arrive: tie the output to the engine's anchor so it does.
                output = replaced = RequireGrad.apply(self.anchor, output)
            cloned = self._watch_output(
                unit, unit.path, unit.rule, module, unit.params, inputs, dict(kwargs), ctx, output, bd
            )
            return cloned if cloned is not None else replaced

        self.handles.append(unit.module.register_forward_hook(post, with_kwargs=True))

    # --------------------------------------------------------------- attention
    def _install_attention(self, unit: Unit) -> None:
        mha = unit.module
        linear_rule = rule_for_type(nn.Linear)
        modes: list[AttentionCapture] = []
        names = {"in_proj": ("in_proj_weight", "in_proj_bias"), "out_proj": ("out_proj.weight", "out_proj.bias")}

        def pre(module, args, kwargs):
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
                    if self.engine.active():
                        g3 = grad.reshape(-1, ctx.batch_size, grad.shape[-1]).transpose(0, 1).detach()
                        self.engine.emit(
                            Record(unit, f"{unit.path}.{part}", linear_rule, parts, params, (x3,), {}, g3, ctx, 0)
                        )

                y.register_hook(on_grad)

            mode = AttentionCapture(mha, unit.path, on_linear)
            mode.__enter__()
            modes.append(mode)
            return None

        def post(module, args, kwargs, output):
            if not modes:
                return None
            mode = modes.pop()
            mode.__exit__(None, None, None)
            if mode.calls != 1 and self.engine.active() and torch.is_grad_enabled():
                raise UnsupportedModuleError(
                    f"{unit.path}: nn.MultiheadAttention ran without the expected projection call "
                    "(a fast path or a changed torch version?); its parameters would be missed. "
                    "Report this with your torch version."
                )
            return None

        self.handles.append(mha.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(mha.register_forward_hook(post, with_kwargs=True, always_call=True))

