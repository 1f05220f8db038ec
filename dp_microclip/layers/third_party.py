"""Rules for layers of Hugging Face ``transformers`` and ``timm``, registered lazily by class name.

Nothing here imports ``transformers`` or ``timm``: each rule is registered with
:func:`register_lazy_rule` under the defining module path and class name, and
applies when the engine meets a module of that class (or an unchanged subclass).
A norm rule recomputes the layer's normalised input exactly as the library's
``forward`` does, dtype casts included, so the gradients match autograd's.

Hugging Face ``Conv1D`` (``transformers/pytorch_utils.py``; GPT-2 and DistilGPT-2,
OpenAI GPT, ImageGPT, Decision Transformer, CLVP): ``y = x @ W + b`` with ``W``
of shape (d, p), i.e. an ``nn.Linear`` whose weight is stored transposed. Per group, with rows
A_j (N, d) and output gradients G_j (N, p):

    weight gradient  = A_j^T G_j                                  (d, p)
    squared norm     = ||A_j^T G_j||^2 = <A_j A_j^T, G_j G_j^T>   (Gram form, transpose-invariant)

so the Linear rule's norms (``linear.py``; ghost clipping, Li et al. 2021;
book-keeping, Bu et al. 2023) apply unchanged and only the materialised
gradient and the weighted sum are transposed. Full ghost support.
Input layout: batch at dim 0, features last: x ``(B, *, d)``, out_grad ``(B, *, p)``.

RMS-style norms with a weight only (Zhang & Sennrich, "Root Mean Square Layer
Normalization", 2019: ``y = x / RMS(x) * w``), over the last dim of
size d. With ``h`` the normalised input as the forward computes it (in float32,
then cast as that family's forward casts), ``y = w * h`` (or ``(1 + w) * h``
for Gemma), so for every family

    dL/dw = sum over rows of  G * h          (d,)   rows: every example's positions

(``d/dw`` of ``(1 + w) * h`` is ``h`` too). Families, by their forward source:

* Llama (``h = (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype); y = w * h``): Llama, Mistral,
  Mixtral, Qwen2/2-MoE/2-VL/2.5-VL, Qwen3/3-MoE, Phi-3, Granite, DeepSeek-V3, SmolLM3, ...
* Olmo2 (``y = (w * x32 * rsqrt(...)).to(x.dtype)``): OLMo 2/3, gpt-oss.
* T5 (variance in float32, ``h = x * rsqrt(var + eps)``, cast to w's dtype if half): T5, mT5, UMT5, LongT5.
* Gemma (``y = (x32 * rsqrt(...) * (1 + w32)).type_as(x)``): Gemma 1/2/3, Qwen3-Next.
* Gemma3n (``x32 * pow(mean + eps, -0.5) * w32``, weight only if ``with_scale``).

The ``transformers`` test in ``tests/test_more_rules.py`` checks that every
class registered here still has its family's forward source, so a changed
forward in a new release is caught. A weight is d numbers: group gradients
are materialised (M x d).
Input layout: batch at dim 0, normalised features last: x and out_grad ``(B, *, d)``.

``timm`` (``timm/layers/norm.py``): ``LayerNorm``, ``GroupNorm``, ``GroupNorm1`` and
``RmsNorm`` compute exactly what ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.RMSNorm``
compute (only an optional fused kernel differs) and use those rules.
``LayerNorm2d`` and ``RmsNorm2d`` normalise over the channels of ``(B, C, H, W)``:

    LayerNorm2d: y = permute(layer_norm(permute(x, (0,2,3,1))), (0,3,1,2))
                 dL/dw_c = sum_{h,w} G * x_hat,  dL/db_c = sum_{h,w} G     (Ba et al., "Layer Normalization", 2016)
    RmsNorm2d:   y = x * rsqrt(mean_c(x^2) + eps) * w[c]
                 dL/dw_c = sum_{h,w} G * x * rsqrt(mean_c(x^2) + eps)
Input layout: batch at dim 0, channels first: x and out_grad ``(B, C, H, W)``.
Letters: B examples, M groups, N rows per group, d features, p out features, C channels.
"""

from __future__ import annotations

import torch

from ..grouping import Groups
from .linear import _as_rows, linear_group_sq_norms
from .norms import group_norm_group_grads, layer_norm_group_grads, rms_norm_group_grads
from .registry import LayerRule, register_lazy_rule
from ..tensors import LOW_PRECISION


# ----------------------------------------------------------------------------------- HF Conv1D
def hf_conv1d_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    """``{"weight": (M, d, p), "bias": (M, p)}``: ``A_j^T G_j`` per group (the Linear gradient, transposed)."""
    a3, g3 = _as_rows(inputs[0], out_grad)  # (B, T, d), (B, T, p)
    pa = groups.pad(a3).flatten(1, 2)  # (M, N, d)
    pg = groups.pad(g3).flatten(1, 2)  # (M, N, p)
    out = {"weight": torch.bmm(pa.transpose(1, 2), pg)}  # (M, d, p)
    if layer.bias is not None:
        out["bias"] = groups.sum(g3.sum(1))  # (M, p)
    return out


def hf_conv1d_group_sq_norms(layer, inputs, out_grad, groups: Groups) -> dict:
    """``{"weight": (M,), "bias": (M,)}``: the Linear rule's Gram norms (a norm does not see the transpose)."""
    return linear_group_sq_norms(inputs[0], out_grad, groups, layer.bias is not None)


def hf_conv1d_weighted_sum(layer, inputs, out_grad, row_weight: dict) -> dict:
    """``sum_i w_i grad_i``: ``A^T (w * G)`` over all rows, ``(d, p)``, and the weighted bias sum."""
    a3, g3 = _as_rows(inputs[0], out_grad)
    out = {}
    if "weight" in row_weight:
        gw = g3 * row_weight["weight"].to(g3.dtype)[:, None, None]  # (B, T, p)
        out["weight"] = a3.flatten(0, 1).t() @ gw.flatten(0, 1)  # (d, p)
    if layer.bias is not None and "bias" in row_weight:
        out["bias"] = torch.mv(g3.sum(1).t(), row_weight["bias"].to(g3.dtype))  # (p,)
    return out


def hf_conv1d_group_grad_elements(layer, inputs, out_grad, groups: Groups) -> int:
    """Elements of the (M, d, p) group gradients (the bias adds only M x p)."""
    return groups.num_groups * layer.weight.numel()


HF_CONV1D_RULE = LayerRule(hf_conv1d_group_grads, hf_conv1d_group_sq_norms, hf_conv1d_weighted_sum,
                           hf_conv1d_group_grad_elements)


# ------------------------------------------------------------------------------ HF RMS norms
def _weight_group_grads(layer, prod: torch.Tensor, groups: Groups, channels_first: bool = False) -> dict:
    """``{"weight": (M, d)}`` from the per-element products ``G * h`` (B, *, d) or (B, C, *S)."""
    prod = prod.to(torch.promote_types(prod.dtype, layer.weight.dtype))  # accumulate at least at w's precision
    batch = prod.shape[0]
    if channels_first:
        per_example = prod.reshape(batch, prod.shape[1], -1).sum(-1)  # (B, C)
    else:
        per_example = prod.reshape(batch, -1, prod.shape[-1]).sum(1)  # (B, d)
    return {"weight": groups.sum(per_example).to(layer.weight.dtype)}  # (M, d)


def _eps(layer) -> float:
    """The layer's epsilon, whichever name its release gives it (``variance_epsilon`` or ``eps``)."""
    for name in ("variance_epsilon", "eps"):
        value = getattr(layer, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise AttributeError(f"{type(layer).__name__} has neither variance_epsilon nor eps: its rule cannot apply.")


def llama_rms_norm_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    """LlamaRMSNorm family: ``h = (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``, ``y = w * h``."""
    x = inputs[0]
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _eps(layer))
    return _weight_group_grads(layer, out_grad * h.to(x.dtype), groups)  # (M, d)


def olmo2_rms_norm_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    """Olmo2RMSNorm family: ``h = x32 * rsqrt(mean(x32^2) + eps)``, ``y = (w * h).to(x.dtype)``."""
    h = inputs[0].to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _eps(layer))
    grad = out_grad.to(torch.promote_types(layer.weight.dtype, h.dtype))  # the cast's backward
    return _weight_group_grads(layer, grad * h, groups)


def t5_layer_norm_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    """T5LayerNorm family: variance in float32, ``h = x * rsqrt(var + eps)``, ``y = w * h``.

    ``h`` is cast to the weight's dtype when that is float16 or bfloat16, as the forward does.
    """
    x = inputs[0]
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(variance + _eps(layer))
    if layer.weight.dtype in LOW_PRECISION:
        h = h.to(layer.weight.dtype)
    return _weight_group_grads(layer, out_grad * h, groups)


def gemma_rms_norm_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    """GemmaRMSNorm family: ``y = (x32 * rsqrt(mean(x32^2) + eps) * (1 + w32)).type_as(x)``; ``dy/dw = h``."""
    h = inputs[0].float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _eps(layer))
    return _weight_group_grads(layer, out_grad.float() * h, groups)  # type_as's backward casts G to float32


def gemma3n_rms_norm_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    """Gemma3nRMSNorm family: ``y = (x32 * pow(mean(x32^2) + eps, -0.5) * w32).type_as(x)``.

    The weight exists only with ``with_scale=True``; without it the layer has no parameter and no unit.
    """
    h = inputs[0].float()
    h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + _eps(layer), -0.5)
    return _weight_group_grads(layer, out_grad.float() * h, groups)


# (module path under transformers.models, class names) per family; verified against the installed
# transformers' source by tests/test_more_rules.py (classes missing from a release are skipped there).
HF_RMS_FAMILIES = {
    "llama": (llama_rms_norm_group_grads, {
        "llama": ["LlamaRMSNorm"], "mistral": ["MistralRMSNorm"], "mixtral": ["MixtralRMSNorm"],
        "ministral": ["MinistralRMSNorm"], "mistral3": ["Mistral3RMSNorm"], "qwen2": ["Qwen2RMSNorm"],
        "qwen2_moe": ["Qwen2MoeRMSNorm"], "qwen2_vl": ["Qwen2VLRMSNorm"], "qwen2_5_vl": ["Qwen2_5_VLRMSNorm"],
        "qwen3": ["Qwen3RMSNorm"], "qwen3_moe": ["Qwen3MoeRMSNorm"], "phi3": ["Phi3RMSNorm"],
        "granite": ["GraniteRMSNorm"], "deepseek_v3": ["DeepseekV3RMSNorm"], "smollm3": ["SmolLM3RMSNorm"],
        "mllama": ["MllamaTextRMSNorm"], "idefics3": ["Idefics3RMSNorm"],
    }),
    "olmo2": (olmo2_rms_norm_group_grads, {
        "olmo2": ["Olmo2RMSNorm"], "olmo3": ["Olmo3RMSNorm"], "gpt_oss": ["GptOssRMSNorm"],
    }),
    "t5": (t5_layer_norm_group_grads, {
        "t5": ["T5LayerNorm"], "mt5": ["MT5LayerNorm"], "umt5": ["UMT5LayerNorm"], "longt5": ["LongT5LayerNorm"],
    }),
    "gemma": (gemma_rms_norm_group_grads, {
        "gemma": ["GemmaRMSNorm"], "gemma2": ["Gemma2RMSNorm"], "gemma3": ["Gemma3RMSNorm"],
        "qwen3_next": ["Qwen3NextRMSNorm"],
    }),
    "gemma3n": (gemma3n_rms_norm_group_grads, {"gemma3n": ["Gemma3nRMSNorm"]}),
}


def hf_module_path(model_dir: str) -> str:
    """``transformers.models.<dir>.modeling_<dir>``: where a model's classes are defined."""
    return f"transformers.models.{model_dir}.modeling_{model_dir}"


# ------------------------------------------------------------------------------------- timm
def timm_layer_norm_2d_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    """timm LayerNorm2d: the LayerNorm rule on the channels-last view ``(B, H, W, C)`` of ``(B, C, H, W)``."""
    return layer_norm_group_grads(layer, (inputs[0].permute(0, 2, 3, 1),), out_grad.permute(0, 2, 3, 1), groups)


def timm_rms_norm_2d_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    """timm RmsNorm2d: ``h = x * rsqrt(mean_c(x^2) + eps)`` over dim 1, ``dL/dw_c = sum_{h,w} G * h``."""
    x = inputs[0]
    h = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + _eps(layer))  # (B, C, H, W)
    return _weight_group_grads(layer, out_grad * h, groups, channels_first=True)  # (M, C)


def vit_embeddings_group_grads(layer, inputs, out_grad, groups: Groups) -> dict:
    """HF ``ViTEmbeddings``' own parameters: the ``[CLS]`` token, the position table and the mask token.

    Its forward is ``dropout(cat(cls_token, patches (masked by mask_token)) + position_embeddings)``; the
    patch convolution is a unit of its own. With dropout off the per-example gradients are read straight off
    the output gradient G ``(B, N+1, d)``: cls_token gets ``G[:, 0]``, the position table gets ``G``, and
    the mask token gets ``sum_n mask[n] G[1 + n]`` (``bool_masked_pos`` passed positionally). Input layout:
    pixel values ``(B, C, H, W)``, batch at dim 0.
    """
    dropout = getattr(layer, "dropout", None)
    if layer.training and dropout is not None and dropout.p > 0:
        from ..errors import UnsupportedModuleError

        raise UnsupportedModuleError(
            f"ViTEmbeddings with dropout p={dropout.p} in training: the dropout mask between its parameters and "
            "its output is not known per example. Set hidden_dropout_prob=0 in the config (or call .eval() on "
            "this module)."
        )
    g = out_grad  # (B, N+1, d)
    out = {"cls_token": groups.sum(g[:, 0]).reshape(groups.num_groups, 1, 1, -1),  # (M, 1, 1, d)
           "position_embeddings": groups.sum(g).unsqueeze(1)}  # (M, 1, N+1, d)
    if getattr(layer, "mask_token", None) is not None:
        mask = inputs[1] if len(inputs) > 1 and torch.is_tensor(inputs[1]) else None
        if mask is None:
            out["mask_token"] = g.new_zeros((groups.num_groups, 1, 1, g.shape[-1]))
        else:
            per_example = (g[:, 1:] * mask.unsqueeze(-1).to(g.dtype)).sum(1)  # (B, d)
            out["mask_token"] = groups.sum(per_example).reshape(groups.num_groups, 1, 1, -1)
    return out


TIMM_NORM_RULES = {
    "LayerNorm": layer_norm_group_grads,
    "LayerNorm2d": timm_layer_norm_2d_group_grads,
    "GroupNorm": group_norm_group_grads,
    "GroupNorm1": group_norm_group_grads,
    "RmsNorm": rms_norm_group_grads,
    "RmsNorm2d": timm_rms_norm_2d_group_grads,
}


def _register() -> None:
    register_lazy_rule("transformers.pytorch_utils", "Conv1D", HF_CONV1D_RULE)
    register_lazy_rule("transformers.models.vit.modeling_vit", "ViTEmbeddings", LayerRule(vit_embeddings_group_grads))
    for group_grads, members in HF_RMS_FAMILIES.values():
        rule = LayerRule(group_grads)
        for model_dir, names in members.items():
            for name in names:
                register_lazy_rule(hf_module_path(model_dir), name, rule)
    for name, group_grads in TIMM_NORM_RULES.items():
        register_lazy_rule("timm.layers.norm", name, LayerRule(group_grads))


_register()
