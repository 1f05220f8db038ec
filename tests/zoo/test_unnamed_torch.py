"""Plain-torch families no rule names, unchanged: exact against the naive micro-batch loop (float64,
b in {1, 2, B}, T == B and T != B), on no generic torch.func path.

Each model is written the way ordinary PyTorch code writes it: a dilated causal TCN (padding, then the
future sliced off, weight norm old and new), a small U-Net (ConvTranspose2d, skip concatenation,
GroupNorm), nn.Bilinear, nn.EmbeddingBag (2-D input; 1-D ids with offsets and per-sample weights),
learnable activations (nn.PReLU, a Swish with a learnable beta), nn.MultiheadAttention with separate
key / value widths or a key / value bias and zero attention, InstanceNorm, parametrizations
(orthogonal, a custom symmetric one), a module using F.conv2d / F.linear on its own parameters, local
attention over nn.Unfold patches, and a gated linear unit split with torch.chunk.

Also here: the generic torch.func path on flattened (B*T, d) rows (the probe's row map), every
nn.EmbeddingBag mode and call form, sequence-first MultiheadAttention variants with masks and returned
weights, spectral norm (a parametrization with state), and a refusal (the deprecated weight-norm hook).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import dp_microclip

from .data import CLASSES, VOCAB, seq_cls_batch
from .harness import (B, T_NE, TOL, ZooCase, assert_matches, build_model, engine, errors_by_param, naive,
                      zoo_params)
from .test_usage_route import compare_no_generic

D = 8


def _pool(h, mask):
    """Mean over the valid tokens of (B, T, d)."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


# ------------------------------------------------------------------------------------------ TCN
class CausalConv(nn.Module):
    """A dilated causal convolution: padded on both sides by ``(k-1) d``, then the future sliced off."""

    def __init__(self, c_in, c_out, k, dilation, norm):
        super().__init__()
        self.pad = (k - 1) * dilation
        self.conv = norm(nn.Conv1d(c_in, c_out, k, padding=self.pad, dilation=dilation))

    def forward(self, x):
        return self.conv(x)[..., : -self.pad]


class TCN(nn.Module):
    """Embedding -> two residual dilated causal conv blocks (channels-first) -> the last step's head."""

    def __init__(self, norm):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(CausalConv(D, D, 2, d, norm) for d in (1, 2))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids).transpose(1, 2)  # (B, D, T)
        for block in self.blocks:
            x = x + torch.relu(block(x))
        n = attention_mask.sum(1) - 1
        return self.head(x[torch.arange(x.shape[0]), :, n])


def _old_weight_norm(conv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        return nn.utils.weight_norm(conv)


# ------------------------------------------------------------------------------------------ U-Net
class UNet(nn.Module):
    """One level: conv + GroupNorm down, stride-2 conv, ConvTranspose2d up, skip concatenation, 1x1 head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, D, 3, padding=1), nn.GroupNorm(2, D), nn.ReLU())
        self.down = nn.Conv2d(D, D, 2, stride=2)
        self.up = nn.ConvTranspose2d(D, D, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(2 * D, D, 3, padding=1), nn.GroupNorm(2, D), nn.ReLU())
        self.head = nn.Conv2d(D, CLASSES, 1)

    def forward(self, pixels):
        skip = self.enc(pixels)
        h = self.up(torch.relu(self.down(skip)))
        return self.head(self.dec(torch.cat([h, skip], dim=1)))  # (B, CLASSES, H, W)


def _segmentation_loss(logits, y):  # per-pixel cross-entropy, mean per example, then over the batch
    return F.cross_entropy(logits, y)


def _pixel_batch(B, T, dtype, g):
    return ({"pixels": torch.randn(B, 3, T, T, generator=g, dtype=dtype)},
            torch.randint(0, CLASSES, (B, T, T), generator=g))


def _image_batch(B, T, dtype, g):
    return {"pixels": torch.randn(B, 3, T, T, generator=g, dtype=dtype)}, torch.randint(0, CLASSES, (B,), generator=g)


# ------------------------------------------------------------------------------------------ Bilinear
class BilinearPairs(nn.Module):
    """Each token's embedding against its example's first token, through nn.Bilinear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.bilinear = nn.Bilinear(D, D, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        first = h[:, :1].expand_as(h)
        return self.head(_pool(torch.tanh(self.bilinear(h, first)), attention_mask))


# ------------------------------------------------------------------------------------------ EmbeddingBag
class BagOfTokens(nn.Module):
    """nn.EmbeddingBag, the bag-of-words text classifier: padded (B, T) ids (mean without the padding id,
    a mask-weighted sum with per_sample_weights, max), or the valid ids flattened with one offset per
    example and per-sample weights (torch's text-classification tutorial)."""

    def __init__(self, offsets: bool):
        super().__init__()
        self.offsets = offsets
        if offsets:
            self.bag = nn.EmbeddingBag(VOCAB, D, mode="sum", include_last_offset=True)
        else:
            self.mean = nn.EmbeddingBag(VOCAB, D, mode="mean", padding_idx=0)
            self.sum = nn.EmbeddingBag(VOCAB, D, mode="sum")
            self.max = nn.EmbeddingBag(VOCAB, D, mode="max", padding_idx=0)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        weights = attention_mask.to(self.head.weight.dtype)
        if not self.offsets:
            h = self.mean(input_ids) + self.sum(input_ids, per_sample_weights=weights) + self.max(input_ids)
            return self.head(torch.tanh(h))
        n = attention_mask.sum(1)
        offsets = torch.cat([n.new_zeros(1), torch.cumsum(n, 0)])  # include_last_offset: B + 1 offsets
        scale = (1.0 / n.to(weights.dtype)).repeat_interleave(n)  # a mean as per-sample weights
        h = self.bag(input_ids[attention_mask.bool()], offsets, per_sample_weights=scale)
        return self.head(torch.tanh(h))


# ------------------------------------------------------------------------------------------ learnable activations
class LearnedSwish(nn.Module):
    """``x * sigmoid(beta x)`` with a learnable beta per channel."""

    def __init__(self, d):
        super().__init__()
        self.beta = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


class ActivationNet(nn.Module):
    """Conv -> PReLU per channel -> conv -> PReLU shared -> pool -> Linear -> learned Swish -> head."""

    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, D, 3, padding=1), nn.PReLU(D)
        self.c2, self.a2 = nn.Conv2d(D, D, 3, padding=1), nn.PReLU()
        self.fc, self.a3 = nn.Linear(D, D), LearnedSwish(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, pixels):
        h = self.a2(self.c2(self.a1(self.c1(pixels)))).mean((2, 3))
        return self.head(self.a3(self.fc(h)))


# ------------------------------------------------------------------------------------------ MHA variants
class AttendTo(nn.Module):
    """Tokens attend to a second, differently-sized stream (kdim / vdim) or to themselves with a
    learned key / value bias and a zero key (add_bias_kv, add_zero_attn)."""

    def __init__(self, separate: bool):
        super().__init__()
        self.separate = separate
        self.embed = nn.Embedding(VOCAB, D)
        if separate:
            self.memory = nn.Embedding(VOCAB, 6)
            self.attn = nn.MultiheadAttention(D, 2, kdim=6, vdim=4, batch_first=True)
            self.value = nn.Linear(6, 4)
        else:
            self.attn = nn.MultiheadAttention(D, 2, add_bias_kv=True, add_zero_attn=True, batch_first=True)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        pad = attention_mask == 0
        if self.separate:
            mem = self.memory(input_ids.flip(1))
            out, _ = self.attn(h, mem, self.value(mem), key_padding_mask=pad.flip(1), need_weights=False)
        else:
            out, _ = self.attn(h, h, h, key_padding_mask=pad, need_weights=False)
        return self.head(_pool(out, attention_mask))


# ------------------------------------------------------------------------------------------ InstanceNorm
class InstanceNormNet(nn.Module):
    """A style-transfer-like CNN: conv -> InstanceNorm2d(affine) -> conv -> InstanceNorm1d over rows."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, D, 3, padding=1), nn.InstanceNorm2d(D, affine=True)
        self.c2, self.n2 = nn.Conv2d(D, D, 3, padding=1), nn.InstanceNorm1d(D, affine=True)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, pixels):
        h = torch.relu(self.n1(self.c1(pixels)))
        h = torch.relu(self.n2(self.c2(h).flatten(2)))  # (B, D, H*W)
        return self.head(h.mean(-1))


# ------------------------------------------------------------------------------------------ parametrizations
class Symmetric(nn.Module):
    """A custom parametrization: the weight is ``A + A^T`` (a symmetric matrix)."""

    def forward(self, a):
        return a.triu() + a.triu(1).transpose(-1, -2)


def _parametrized():
    model = TextMLP()
    parametrizations.orthogonal(model.mid)
    parametrize.register_parametrization(model.sym, "weight", Symmetric())
    return model


class TextMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.mid = nn.Linear(D, D)
        self.sym = nn.Linear(D, D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.sym(torch.tanh(self.mid(self.embed(input_ids)))))
        return self.head(_pool(h, attention_mask))


# ------------------------------------------------------------------------------------------ functional calls
class FunctionalConvNet(nn.Module):
    """Parameters held by the model itself and used through F.conv2d and F.linear."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(0.3 * torch.randn(D, 3, 3, 3))
        self.kernel_bias = nn.Parameter(0.1 * torch.randn(D))
        self.w = nn.Parameter(0.3 * torch.randn(CLASSES, D))
        self.b = nn.Parameter(torch.zeros(CLASSES))

    def forward(self, pixels):
        h = torch.relu(F.conv2d(pixels, self.kernel, self.kernel_bias, padding=1)).mean((2, 3))
        return F.linear(h, self.w, self.b)


class FunctionalConv1d(nn.Module):
    """Token features through F.conv1d on a flat parameter reshaped to a grouped, dilated kernel ("same"
    padding, keyword arguments), then a strided F.conv1d with only its bias held by the module."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.flat_kernel = nn.Parameter(0.3 * torch.randn(D * (D // 2) * 3))
        self.fixed = nn.Parameter(0.3 * torch.randn(D, D, 2), requires_grad=False)  # frozen: not tracked
        self.shift = nn.Parameter(0.1 * torch.randn(D))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        x = (self.embed(input_ids) * attention_mask[..., None]).transpose(1, 2)  # (B, D, T), padding zeroed
        h = torch.tanh(F.conv1d(x, self.flat_kernel.view(D, D // 2, 3), padding="same", dilation=2, groups=2))
        h = torch.tanh(F.conv1d(h, self.fixed, self.shift, stride=2))  # (B, D, T')
        return self.head(h.mean(-1))


# ------------------------------------------------------------------------------------------ Unfold local attention
class UnfoldLocalAttention(nn.Module):
    """Each pixel attends to its 3x3 neighbourhood: nn.Unfold gathers the keys and values, Linear maps
    project them (channels-last), a learned relative-position logit per neighbour is added."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, D, 1)
        self.q, self.kv = nn.Linear(D, D), nn.Linear(D, 2 * D)
        self.unfold = nn.Unfold(3, padding=1)
        self.rel = nn.Parameter(0.1 * torch.randn(9))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, pixels):
        x = self.stem(pixels)  # (B, D, H, W)
        b, c, h, w = x.shape
        q = self.q(x.flatten(2).transpose(1, 2))  # (B, HW, D)
        nb = self.unfold(x).view(b, c, 9, h * w).permute(0, 3, 2, 1)  # (B, HW, 9, D)
        k, v = self.kv(nb).chunk(2, dim=-1)  # (B, HW, 9, D) each
        scores = (q.unsqueeze(2) * k).sum(-1) / c ** 0.5 + self.rel  # (B, HW, 9)
        out = (scores.softmax(-1).unsqueeze(-1) * v).sum(2)  # (B, HW, D)
        return self.head(out.mean(1))


# ------------------------------------------------------------------------------------------ GLU with chunk
class GLU(nn.Module):
    """A gated linear unit: one matmul on the module's own weight, split with torch.chunk."""

    def __init__(self, d, hidden):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, 2 * hidden) / d ** 0.5)
        self.out = nn.Linear(hidden, d)

    def forward(self, x):
        a, gate = torch.chunk(x @ self.w, 2, dim=-1)
        return self.out(a * torch.sigmoid(gate))


class GLUModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.glu = GLU(D, 12)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        return self.head(_pool(self.glu(self.embed(input_ids)), attention_mask))


# ------------------------------------------------------------------------------------------ cases
def _text(make):
    return ZooCase(lambda T=None: make(), seq_cls_batch, lambda m, kw: m(**kw), F.cross_entropy)


def _image(make, batch=_image_batch, loss=F.cross_entropy):
    return ZooCase(lambda T=None: make(), batch, lambda m, kw: m(kw["pixels"]), loss)


CASES = {
    "tcn_weight_norm": _text(lambda: TCN(parametrizations.weight_norm)),
    "unet": _image(UNet, _pixel_batch, _segmentation_loss),
    "bilinear": _text(BilinearPairs),
    "embedding_bag_2d": _text(lambda: BagOfTokens(offsets=False)),
    "embedding_bag_offsets": _text(lambda: BagOfTokens(offsets=True)),
    "learned_activations": _image(ActivationNet),
    "mha_kdim_vdim": _text(lambda: AttendTo(separate=True)),
    "mha_bias_kv_zero_attn": _text(lambda: AttendTo(separate=False)),
    "instance_norm": _image(InstanceNormNet),
    "parametrized": _text(_parametrized),
    "functional_conv": _image(FunctionalConvNet),
    "functional_conv1d_grouped": _text(FunctionalConv1d),
    "unfold_local_attention": _image(UnfoldLocalAttention),
    "glu_chunk": _text(GLUModel),
}

EXPECTED: dict = {}


@pytest.mark.parametrize("name, b, T", zoo_params(CASES, EXPECTED))
def test_matches_naive_loop(name, b, T):
    assert_matches(CASES[name], B=B, T=T, b=b)


# ------------------------------------------------------------------- MultiheadAttention variants, usage route
class SeqFirstAttention(nn.Module):
    """nn.MultiheadAttention at batch_first=False with a learned key/value bias (and a zero key), a causal
    mask and a padding mask, its attention weights returned and used; or separate widths without biases."""

    def __init__(self, separate: bool):
        super().__init__()
        self.separate = separate
        self.embed = nn.Embedding(VOCAB, D)
        if separate:
            self.attn = nn.MultiheadAttention(D, 2, bias=False, kdim=5, vdim=5)
            self.memory = nn.Linear(D, 5)
        else:
            self.attn = nn.MultiheadAttention(D, 2, add_bias_kv=True, add_zero_attn=True)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids).transpose(0, 1)  # (T, B, D)
        pad = attention_mask == 0
        causal = torch.ones(h.shape[0], h.shape[0], dtype=torch.bool).triu(1)  # True: not attended
        if self.separate:
            mem = torch.tanh(self.memory(h))
            out, weights = self.attn(h, mem, mem, key_padding_mask=pad, attn_mask=causal)
        else:
            out, weights = self.attn(h, h, h, key_padding_mask=pad, attn_mask=causal)
        pooled = _pool(out.transpose(0, 1), attention_mask) + weights[..., 0].mean(-1, keepdim=True)
        return self.head(pooled)


MHA_VARIANTS = {
    "seq_first_bias_kv_masks_weights": _text(lambda: SeqFirstAttention(separate=False)),
    "seq_first_kdim_vdim_no_bias": _text(lambda: SeqFirstAttention(separate=True)),
}


@pytest.mark.parametrize("name, b, T", zoo_params(MHA_VARIANTS, bs=(1, B)))
def test_attention_variants_match_naive_loop(name, b, T):
    assert_matches(MHA_VARIANTS[name], B=B, T=T, b=b)


# ------------------------------------------------------------------- the generic path on flattened rows
class ExpGate(nn.Module):
    """A parameter through ``exp`` (no recognised use: the generic torch.func path) on flattened rows."""

    def __init__(self, d):
        super().__init__()
        self.log_scale = nn.Parameter(0.1 * torch.randn(d))
        self.shift = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, rows):  # (N, d), N = B*T rows in either order
        return torch.tanh(rows * self.log_scale.exp() + self.shift.sin())


class MatmulGate(nn.Module):
    """Its own weight through ``rows @ W`` (a linear use: the usage route) and a scale (a broadcast use)."""

    def __init__(self, d, scale: bool):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(d)) if scale else None

    def forward(self, rows):
        h = torch.tanh(rows @ self.w)
        return h if self.scale is None else h * self.scale


class FlatRows(nn.Module):
    """Token rows flattened to (B*T, d) (example-major) or (T*B, d) (time-major) before a module without a rule."""

    def __init__(self, time_major: bool, gate=ExpGate):
        super().__init__()
        self.time_major = time_major
        self.embed = nn.Embedding(VOCAB, D)
        self.gate = gate(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)  # (B, T, D)
        b, t, d = h.shape
        if self.time_major:
            h = self.gate(h.transpose(0, 1).reshape(t * b, d)).view(t, b, d).transpose(0, 1)
        else:
            h = self.gate(h.reshape(b * t, d)).view(b, t, d)
        return self.head(_pool(h, attention_mask))


GENERIC_FOLDED = {
    "example_major": _text(lambda: FlatRows(False)),
    "time_major": _text(lambda: FlatRows(True)),
    "broadcast_scale_time_major": _text(lambda: FlatRows(True, lambda d: MatmulGate(d, scale=True))),
}
USAGE_FOLDED = {
    "matmul_example_major": _text(lambda: FlatRows(False, lambda d: MatmulGate(d, scale=False))),
    "matmul_time_major": _text(lambda: FlatRows(True, lambda d: MatmulGate(d, scale=False))),
}


@pytest.mark.parametrize("name, b, T", zoo_params(GENERIC_FOLDED, bs=(1, 2)))
def test_generic_path_on_flattened_rows_matches_naive_loop(name, b, T):
    # The layout probe's row map (B*T rows, k per example) regroups the rows per example for the replay.
    # A broadcast use on folded rows is not the usage route's (its shapes are per example): generic, exact.
    assert_matches(GENERIC_FOLDED[name], B=B, T=T, b=b)


@pytest.mark.parametrize("name, b, T", zoo_params(USAGE_FOLDED, bs=(1, 2)))
def test_usage_route_on_flattened_rows_matches_naive_loop(name, b, T):
    # A linear use on (B*T, d) rows takes the Linear rule on the rows regrouped (B, T, d) (before: an
    # AssertionError in the usage capture).
    errors = compare_no_generic(USAGE_FOLDED[name], B=B, T=T, b=b)
    assert max(errors.values()) < TOL, errors


# ------------------------------------------------------------------- EmbeddingBag: every mode, both forms
class OneBag(nn.Module):
    """One nn.EmbeddingBag in a given mode, fed (B, T) ids or the valid ids with offsets (positional or
    keyword, with or without the closing offset); with ``empty``, examples whose first id is even get an empty bag."""

    def __init__(self, mode, offsets, padding_idx=None, include_last=False, empty=False):
        super().__init__()
        self.offsets, self.include_last, self.empty = offsets, include_last, empty
        self.bag = nn.EmbeddingBag(VOCAB, D, mode=mode, padding_idx=padding_idx, include_last_offset=include_last)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        if self.empty:  # by content, so that an example keeps its empty bag wherever it is in the batch
            attention_mask = attention_mask * (input_ids[:, :1] % 2)
        if not self.offsets:
            return self.head(torch.tanh(self.bag(input_ids.masked_fill(attention_mask == 0, 0))))
        n = attention_mask.sum(1)
        offsets = torch.cumsum(n, 0) - n
        if self.include_last:
            offsets = torch.cat([offsets, n.sum(0, keepdim=True)])
        return self.head(torch.tanh(self.bag(input_ids[attention_mask.bool()], offsets=offsets)))


BAG_VARIANTS = {
    "max_offsets": _text(lambda: OneBag("max", True)),
    "max_2d_padding_idx": _text(lambda: OneBag("max", False, padding_idx=0)),
    "mean_offsets_padding_idx_last": _text(lambda: OneBag("mean", True, padding_idx=3, include_last=True)),
    "sum_offsets_empty_bag": _text(lambda: OneBag("sum", True, empty=True)),
    "max_offsets_empty_bag": _text(lambda: OneBag("max", True, include_last=True, empty=True)),
}


@pytest.mark.parametrize("name, b, T", zoo_params(BAG_VARIANTS, ts=(T_NE,)))
def test_embedding_bag_modes_match_naive_loop(name, b, T):
    assert_matches(BAG_VARIANTS[name], B=B, T=T, b=b)


def test_embedding_bag_with_frequency_scaling_is_refused():
    model = nn.Sequential(nn.EmbeddingBag(VOCAB, D, scale_grad_by_freq=True), nn.Linear(D, CLASSES))
    with pytest.raises(dp_microclip.UnsupportedModuleError, match="EmbeddingBag with sparse=True or scale_grad_by_freq"):
        dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0)


# ------------------------------------------------------------------- a parametrization with state: spectral norm
def _spectral():
    model = TextMLP()
    parametrizations.spectral_norm(model.mid)  # a power iteration updates its (u, v) in every training forward
    return model


@pytest.mark.parametrize("name, b, T", zoo_params({"spectral_norm": None}))
def test_spectral_norm_reads_the_weight_the_forward_used(name, b, T):
    # The engine's one forward does one power iteration, the naive loop one per micro-batch: the oracle is the
    # naive loop on a copy advanced by that one training forward, its power iteration then held (eval), so that
    # every micro-batch sees the weight the engine's forward used. The engine itself must run no other
    # iteration (reading the weight after the forward, the chain rule's pullback): (u, v) end as plain torch's.
    case = _text(_spectral)
    model = build_model(case, T, torch.float64)
    oracle, plain = copy.deepcopy(model), copy.deepcopy(model)
    inputs, targets = case.batch(B, T, torch.float64, torch.Generator().manual_seed(B * 100 + T))
    got, _ = engine(case, model, inputs, targets, b=b)
    with torch.no_grad():
        plain(**inputs)
        oracle(**inputs)
    oracle.mid.parametrizations.weight.eval()
    want = naive(case, oracle, inputs, targets, b=b)
    errors = errors_by_param(got, want)
    assert max(errors.values()) < TOL, errors
    sn, sn_plain = model.mid.parametrizations.weight[0], plain.mid.parametrizations.weight[0]
    assert torch.equal(sn._u, sn_plain._u) and torch.equal(sn._v, sn_plain._v)


def test_the_deprecated_weight_norm_hook_is_refused_with_the_fix():
    # nn.utils.weight_norm computes `weight` from weight_g / weight_v in a forward pre-hook (the model cannot
    # even be deep-copied once built); before, the step failed with a KeyError.
    model = TCN(_old_weight_norm)
    with pytest.raises(dp_microclip.UnsupportedModuleError, match=r"weight \(WeightNorm\).*parametrizations"):
        dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=1, max_grad_norm=1.0)
