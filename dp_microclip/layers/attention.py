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
Self-attention (query is key is value) uses the packed projection as one Linear.
Cross-attention (``nn.TransformerDecoder``'s memory attention) projects query,
key and value with the three row blocks of ``in_proj_weight``; the engine then
stacks the three inputs' rows and pads each block's output gradient with zeros
into the other two blocks, which is exactly one Linear map on the packed weight
(its Gram cross terms between blocks vanish). Separate ``kdim``/``vdim`` weights,
``bias_k``/``bias_v`` and ``add_zero_attn`` take the usage route instead
(``usage_mode.py`` splits the call the same way).
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


def attention_problems(mha: nn.MultiheadAttention, path: str) -> list[str]:
    """The MHA configurations this capture does not handle (empty: it does). Such a module takes the usage
    route instead, which splits torch's attention call into its projections (``usage_mode.py``)."""
    problems = []
    if not mha._qkv_same_embed_dim:
        problems.append("kdim/vdim different from embed_dim (separate q/k/v projection weights)")
    if mha.bias_k is not None or mha.bias_v is not None:
        problems.append("add_bias_kv=True")
    if mha.add_zero_attn:
        problems.append("add_zero_attn=True")
    return [f"{path} is nn.MultiheadAttention with {p}" for p in problems]


class AttentionCapture(TorchFunctionMode):
    """Intercepts ``F.multi_head_attention_forward`` for one MHA module during its forward.

    ``on_linear(name, parts, x, y)`` is called for each projection with its input
    ``x`` and output ``y`` (sequence-first, as inside torch's function); the
    engine registers the output-gradient hook on ``y``, or (under torch.compile)
    returns the tensor to use in its place.
    """

    def __init__(self, mha: nn.MultiheadAttention, path: str, on_linear: Callable, on_cross: Callable):
        super().__init__()
        self.mha = mha
        self.path = path
        self.on_linear = on_linear
        self.on_cross = on_cross
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
        if query.dim() != 3:
            raise UnsupportedModuleError(
                f"{self.path}: unbatched input of shape {tuple(query.shape)}; a batch dimension is "
                "needed to tell examples apart. Pass a (batch, seq, embed) or (seq, batch, embed) tensor."
            )
        if a.get("static_k") is not None or a.get("static_v") is not None:
            raise UnsupportedModuleError(f"{self.path}: static_k/static_v are not supported.")
        mha = self.mha
        in_parts = LinearParts(mha.in_proj_weight, mha.in_proj_bias)
        if query is key and key is value:  # self-attention: one packed projection
            x = query if query.requires_grad else query.detach().requires_grad_()
            qkv = F.linear(x, in_parts.weight, in_parts.bias)  # (T, B, 3E)
            tapped = self.on_linear("in_proj", in_parts, x, qkv)
            qkv = qkv if tapped is None else tapped
            q, k, v = qkv.chunk(3, dim=-1)  # each (T, B, E)
            dtype, device = qkv.dtype, qkv.device
        else:  # cross-attention: the three row blocks of the packed weight, each on its own input
            e = mha.embed_dim
            xs = tuple(t if t.requires_grad else t.detach().requires_grad_() for t in (query, key, value))
            bias = in_parts.bias
            q, k, v = (F.linear(x, in_parts.weight[i * e:(i + 1) * e],
                                None if bias is None else bias[i * e:(i + 1) * e])
                       for i, x in enumerate(xs))  # (T, B, E), (S, B, E), (S, B, E)
            self.on_cross(in_parts, xs, (q, k, v))
            dtype, device = q.dtype, q.device
        attn = _sdpa_core(q, k, v, a, mha.num_heads)
        if attn is not None:  # the common case, without the identity projections below
            out_parts = LinearParts(mha.out_proj.weight, mha.out_proj.bias)
            out = F.linear(attn, out_parts.weight, out_parts.bias)  # (T*B, E), T-major rows
            tapped = self.on_linear("out_proj", out_parts, attn, out)
            out = out if tapped is None else tapped
            return out.view(q.shape[0], q.shape[1], -1), None
        eye = torch.eye(mha.embed_dim, dtype=dtype, device=device)
        args = dict(a)
        args.update(
            query=q, key=k, value=v, in_proj_weight=None, in_proj_bias=None,
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
            out_proj_weight=eye, out_proj_bias=None,
        )
        attn, weights = func(**args)  # attn: (T, B, E), the input of out_proj
        out_parts = LinearParts(mha.out_proj.weight, mha.out_proj.bias)
        out = F.linear(attn, out_parts.weight, out_parts.bias)  # (T, B, E)
        tapped = self.on_linear("out_proj", out_parts, attn, out)
        out = out if tapped is None else tapped
        return out, weights


def _sdpa_core(q, k, v, a: dict, num_heads: int):
    """The attention between the projections, as ``F.multi_head_attention_forward`` computes it
    on its ``need_weights=False`` path (scaled_dot_product_attention), or None where that path
    is not replicated here (attention weights requested, key_padding_mask): the caller then
    runs torch's own function with identity projections, which is exact but costs four
    extra E x E products.

    Returns ``(T*B, E)`` with T-major rows, the input of ``out_proj``.
    """
    if a["need_weights"] or a["key_padding_mask"] is not None or not hasattr(F, "_canonical_mask"):
        return None
    attn_mask, is_causal = a["attn_mask"], a["is_causal"]
    if is_causal and attn_mask is None:
        return None  # torch's function raises its own error for this
    tgt_len, bsz, embed_dim = q.shape
    src_len = k.shape[0]
    head_dim = embed_dim // num_heads
    if is_causal:
        attn_mask = None  # torch passes the hint to SDPA instead of the mask
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=q.dtype, check_other=False,
        )
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)  # (1, T, S)
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)  # (1, 1, T, S)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)  # (B, H, T, S)
    # (T, B, E) -> (B, H, T, hd) as views: the same elements torch's reshape-transpose-view reads, without
    # its three copies (q, k, v are column blocks of the packed projection, so B and H do not merge).
    qh = q.unflatten(-1, (num_heads, head_dim)).permute(1, 2, 0, 3)
    kh = k.unflatten(-1, (num_heads, head_dim)).permute(1, 2, 0, 3)
    vh = v.unflatten(-1, (num_heads, head_dim)).permute(1, 2, 0, 3)
    dropout_p = a["dropout_p"] if a["training"] else 0.0
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask, dropout_p, is_causal)  # (B, H, T, hd)
    return out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed_dim)
