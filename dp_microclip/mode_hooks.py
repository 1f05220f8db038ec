"""Hooks for modules whose parameters a function mode captures: ``nn.MultiheadAttention`` and the RNNs.

Their projections run inside one torch function (``F.multi_head_attention_forward``, the fused RNN
call), so module hooks on their parts never fire. A forward pre-hook enters a thread-local function mode
for the module's forward (``layers/attention.py``, ``layers/rnn.py``) that runs the call as Linear
maps and reports each one; the forward hook leaves it. Each Linear becomes a record for the Linear
rule, through a tensor hook (eager) or a tap (``traced.py``, attention under torch.compile).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import BatchError, UnsupportedModuleError
from .layers.attention import AttentionCapture, LinearParts
from .layers.registry import rule_for_type
from .layers.rnn import RNNCapture
from .records import Record, Unit

if TYPE_CHECKING:
    from .hooks import HookSet


def _self_attention(args: tuple, kwargs: dict) -> bool:
    """Query, key and value are one tensor (the packed projection the tap handles; cross-attention is not)."""
    q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
    return q is not None and q is k and k is v


def install_attention(hooks: HookSet, unit: Unit) -> None:
    """nn.MultiheadAttention: both projections captured as Linear records (layers/attention.py)."""
    mha = unit.module
    assert isinstance(mha, nn.MultiheadAttention)  # unit.kind == "attention"
    linear_rule = rule_for_type(nn.Linear)
    modes: list[AttentionCapture] = []
    names = {"in_proj": ("in_proj_weight", "in_proj_bias"), "out_proj": ("out_proj.weight", "out_proj.bias")}
    keys: dict[str, int] = {}  # under torch.compile each projection's output goes through a tap (traced.py)
    for part, (w, b) in names.items():
        params = {k: unit.params[n] for k, n in (("weight", w), ("bias", b)) if n in unit.params}
        parts = LinearParts(mha.in_proj_weight, mha.in_proj_bias) if part == "in_proj" else \
            LinearParts(mha.out_proj.weight, mha.out_proj.bias)
        if params:
            keys[part] = hooks.traced.key_for("complete_projection", unit, f"{unit.path}.{part}", linear_rule,
                                              parts, params)

    def start(module, args, ctx):

        def on_linear(part: str, parts: LinearParts, x, y):
            if ctx is None:  # traced: returns the output to use instead of y
                return hooks.traced.tap(keys[part], (x,), y) if part in keys else None
            weight_name, bias_name = names[part]
            params = {}
            if weight_name in unit.params:
                params["weight"] = unit.params[weight_name]
            if bias_name in unit.params:
                params["bias"] = unit.params[bias_name]
            if not params:
                return None
            # Inside torch's function tensors are (T, B, E), or (T*B, E) before out_proj: rows are
            # T-major there, i.e. row = t * B + b.
            x3 = x.reshape(-1, ctx.batch_size, x.shape[-1]).transpose(0, 1).detach()  # (B, T, E)

            def on_grad(grad):
                if hooks.sink.active:
                    g3 = grad.reshape(-1, ctx.batch_size, grad.shape[-1]).transpose(0, 1).detach()
                    hooks.sink.emit(
                        Record(unit, f"{unit.path}.{part}", linear_rule, parts, params, (x3,), {}, g3, ctx, 0)
                    )

            y.register_hook(on_grad)
            return None

        def on_cross(parts: LinearParts, xs, ys):
            if ctx is None:
                raise UnsupportedModuleError(f"{unit.path}: cross-attention under torch.compile is not "
                                             "supported yet. Train this model eagerly.")
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
                hooks.sink.emit(Record(unit, f"{unit.path}.in_proj", linear_rule, parts, params, (x_all,),
                                         {}, torch.cat(blocks, dim=1).detach(), ctx, 0))

            for i, y in enumerate(ys):
                def on_grad(grad, i=i):
                    if hooks.sink.active:
                        grads[i] = grad
                        if len(grads) == 3:
                            complete()

                y.register_hook(on_grad)

        return AttentionCapture(mha, unit.path, on_linear, on_cross)

    _install_capture(hooks, unit.path, mha, start, modes, f"{unit.path}: nn.MultiheadAttention ran without the "
                     "expected projection call (a fast path or a changed torch version?)", traced=_self_attention)

def install_rnn(hooks: HookSet, unit: Unit) -> None:
    """nn.LSTM / GRU / RNN: run step by step (layers/rnn.py); one Linear record per weight matrix."""
    linear_rule = rule_for_type(nn.Linear)
    modes: list[RNNCapture] = []

    def start(module, args, ctx):
        packed = args[0] if args and isinstance(args[0], nn.utils.rnn.PackedSequence) else None

        def on_part(weight: str, bias: str | None, parts: LinearParts, x, source, source_dim: int):
            params = {k: unit.params[n] for k, n in (("weight", weight), ("bias", bias)) if n in unit.params}
            if not params:
                return
            if x.shape[0] != ctx.batch_size:
                raise BatchError(
                    f"{unit.path} ({type(module).__name__}) ran on {x.shape[0]} examples in a batch of "
                    f"{ctx.batch_size}: its batch_first={module.batch_first} does not match the input's layout. "
                    "Pass the input in the layout the module declares."
                )

            def on_grad(grad):
                if hooks.sink.active:
                    g = (grad.movedim(source_dim, 0) if source_dim else grad).detach()
                    hooks.sink.emit(Record(unit, f"{unit.path}.{weight}", linear_rule, parts, params, (x,), {},
                                          g, ctx, 0))

            source.register_hook(on_grad)

        return RNNCapture(module, unit.path, on_part, None if packed is None else packed.unsorted_indices)

    _install_capture(hooks, unit.path, unit.module, start, modes, f"{unit.path}: {type(unit.module).__name__} "
                     "ran without the expected fused RNN call (a changed torch version?)")


def _install_capture(hooks: HookSet, path: str, module: nn.Module, start, modes: list, missing: str,
                     traced=None) -> None:
    """Hook a module whose parameters a function mode captures: ``start(module, args, ctx)`` makes the mode,
    entered for the module's forward while the engine captures; the forward hook leaves it and refuses a
    forward in which the mode saw no call (its parameters would be missed). ``traced(args, kwargs)``: whether
    the mode taps this call's outputs under torch.compile (``ctx`` None there: the pass is known only when
    the gradient arrives)."""

    def pre(module, args, kwargs):
        if hooks.layouts.probing is not None:
            hooks.layouts.record_probe_call(path, tuple(args), None)  # its layout is checked against its declaration
            return None
        if traced is not None and torch.compiler.is_compiling() and traced(args, kwargs):
            if not hooks.traced.tapping():
                return None
            ctx = None
        else:
            ctx = hooks.capturing()
            if ctx is None:
                return None
        mode = start(module, args, ctx)
        mode.__enter__()
        modes.append(mode)
        return None

    def post(module, args, kwargs, output):
        if not modes:
            return None
        mode = modes.pop()
        mode.__exit__(None, None, None)
        if mode.calls != 1 and hooks.sink.active and torch.is_grad_enabled():
            raise UnsupportedModuleError(
                f"{missing}; its parameters would be missed. Report this with your torch version.")
        return None

    hooks.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    hooks.handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
