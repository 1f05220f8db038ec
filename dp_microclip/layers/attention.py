"""nn.MultiheadAttention, unchanged, as two Linear maps.

``nn.MultiheadAttention`` computes its projections with ``F.linear`` on its own
parameters inside ``F.multi_head_attention_forward``, so hooks on ``out_proj``
never fire. While an attached MHA runs, the engine pushes a thread-local
``TorchFunctionMode`` (no module-level patching) that intercepts that one call
and runs it as:

    qkv  = linear(x, in_proj_weight, in_proj_bias)              # captured: x, dL/dqkv
    attn = F.multi_head_attention_forward(q, k, v, identity projections)
    out  = linear(attn, out_proj.weight, out_proj.bias)         # captured: attn, dL/dout

so both projections become ordinary Linear records for the Linear rule. The
middle call is torch's own function with the same masks, dropout and
``need_weights`` handling, so the attention is bit-for-bit the module's.
Supported: packed self-attention (query is key is value), no ``bias_k``/``bias_v``,
no ``add_zero_attn``. Anything else is refused by name.
Letters: T target length, B batch, E embedding dim.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModuleError

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


class LinearParts(NamedTuple):
    """A Linear map given by tensors, so the Linear rule can serve MHA projections."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def check_attention_supported(mha: nn.MultiheadAttention, path: str) -> None:
    """Refuse, by name, the MHA configurations the capture does not handle exactly."""
    problems = []
    if not mha._qkv_same_embed_dim:
        problems.append("kdim/vdim different from embed_dim (separate q/k/v projection weights)")
    if mha.bias_k is not None or mha.bias_v is not None:
        problems.append("add_bias_kv=True")
    if mha.add_zero_attn:
        problems.append("add_zero_attn=True")
    if problems:
        raise UnsupportedModuleError(
            f"{path} is nn.MultiheadAttention with {', '.join(problems)}, which dp_microclip does "
            "not support yet. Use the default configuration (packed projections, add_bias_kv=False, "
            "add_zero_attn=False)."
        )


class AttentionCapture(TorchFunctionMode):
    """Intercepts ``F.multi_head_attention_forward`` for one MHA module during its forward.

    ``on_linear(name, parts, x, y)`` is called for each projection with its input
    ``x`` and output ``y`` (sequence-first, as inside torch's function); the
    engine registers the output-gradient hook on ``y``.
    """

    def __init__(self, mha: nn.MultiheadAttention, path: str, on_linear: Callable):
        super().__init__()
        self.mha = mha
        self.path = path
        self.on_linear = on_linear
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            if bound.arguments["in_proj_weight"] is self.mha.in_proj_weight:
                self.calls += 1
                return self._run(func, bound.arguments)
        return func(*args, **kwargs)

    def _run(self, func, a: dict):
        query, key, value = a["query"], a["key"], a["value"]
        if not (query is key and key is value):
            raise UnsupportedModuleError(
                f"{self.path}: nn.MultiheadAttention called with different query/key/value "
                "(cross-attention). dp_microclip supports self-attention (query is key is value) "
                "for now; call it as mha(x, x, x)."
            )
        if query.dim() != 3:
            raise UnsupportedModuleError(
                f"{self.path}: unbatched input of shape {tuple(query.shape)}; a batch dimension is "
                "needed to tell examples apart. Pass a (batch, seq, embed) or (seq, batch, embed) tensor."
            )
        if a.get("static_k") is not None or a.get("static_v") is not None:
            raise UnsupportedModuleError(f"{self.path}: static_k/static_v are not supported.")
        mha = self.mha
        x = query if query.requires_grad else query.detach().requires_grad_()
        in_parts = LinearParts(mha.in_proj_weight, mha.in_proj_bias)
        qkv = F.linear(x, in_parts.weight, in_parts.bias)  # (T, B, 3E)
        self.on_linear("in_proj", in_parts, x, qkv)
        q, k, v = qkv.chunk(3, dim=-1)  # each (T, B, E)
        eye = torch.eye(mha.embed_dim, dtype=qkv.dtype, device=qkv.device)
        args = dict(a)
        args.update(
            query=q, key=k, value=v, in_proj_weight=None, in_proj_bias=None,
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
            out_proj_weight=eye, out_proj_bias=None,
        )
        attn, weights = func(**args)  # attn: (T, B, E), the input of out_proj
        out_parts = LinearParts(mha.out_proj.weight, mha.out_proj.bias)
        out = F.linear(attn, out_parts.weight, out_parts.bias)  # (T, B, E)
        self.on_linear("out_proj", out_parts, attn, out)
        return out, weights
