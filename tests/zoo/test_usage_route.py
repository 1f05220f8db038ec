"""The usage route: modules no rule names, whose parameters reach the output through a linear map, an embedding
lookup, a broadcast element-wise op or a concatenation, are exact (naive micro-batch loop, float64, b in
{1, 2, B}, T == B and T != B) and take no generic torch.func route.

Every module below is written the way third-party code writes it (a Linear subclass doing its own matmul,
an Embedding subclass scaling its output or offsetting positions, a layer-scale gamma, a ViT root holding a
bare class token and position table, an affine-only norm, tied and twice-used weights), plus timm's own
ViT and ConvNeXt where timm imports (with a torchvision stub, ``timm_stub.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dp_microclip

from .data import CLASSES, VOCAB, lm_batch, seq_cls_batch
from .harness import B, TOL, ZooCase, build_model, engine, errors_by_param, naive, zoo_params
from .timm_stub import timm_class

D = 8


class MatmulLinear(nn.Linear):
    """A Linear subclass whose forward calls the matmul itself (FalconLinear does)."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class ScaledEmbedding(nn.Embedding):
    """An Embedding subclass that scales its output (sqrt(d) scaling)."""

    def forward(self, ids):
        return super().forward(ids) * self.embedding_dim ** 0.5


class OffsetPositions(nn.Embedding):
    """Learned positions offset by 2 (OPT-style), computed from the attention mask."""

    def __init__(self, n, d):
        super().__init__(n + 2, d)

    def forward(self, mask):
        positions = (torch.cumsum(mask, dim=1) * mask).long() - 1
        return F.embedding(positions + 2, self.weight)


class Affine(nn.Module):
    """An element-wise affine "norm" without statistics (ResMLP-style)."""

    def __init__(self, d):
        super().__init__()
        self.alpha = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.beta = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.alpha + self.beta


class AddcmulAffine(nn.Module):
    """ResMLP's affine written as timm writes it: ``addcmul(beta, alpha, x)`` (a shift and a scale in one call)."""

    def __init__(self, d):
        super().__init__()
        self.alpha = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.beta = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return torch.addcmul(self.beta, self.alpha, x)


class InplaceAddcmul(nn.Module):
    """A residual scaled in place: ``h.addcmul_(gamma, x, value=value)`` onto a fresh activation."""

    def __init__(self, d, value):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.gamma = nn.Parameter(0.5 + 0.1 * torch.randn(d))
        self.value = value

    def forward(self, x):
        h = self.fc(x) * 2.0
        return h.addcmul_(self.gamma, x, value=self.value)


class TokenMixing(nn.Module):
    """MLP-Mixer-style token mixing: a (T, T) parameter on the LEFT of the matmul, ``W @ x``, plus a bias per
    token, and a channel map ``V @ x^T`` (parameter left of a transposed activation)."""

    def __init__(self, t, d):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(t, t) / t ** 0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(t, 1))
        self.channels = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):  # x (B, T, d)
        h = torch.tanh(self.mix @ x + self.bias)  # (B, T, d)
        return torch.matmul(self.channels, h.transpose(1, 2)).transpose(1, 2)  # (B, T, d)


class TextModel(nn.Module):
    """ids -> embedding (+ positions) -> [block] -> mean over valid tokens -> head."""

    def __init__(self, embed, block, positions=None):
        super().__init__()
        self.embed, self.block, self.positions = embed, block, positions
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        if self.positions is not None:
            h = h + self.positions(attention_mask)
        h = torch.tanh(self.block(h))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


class LayerScaleBlock(nn.Module):
    """A ConvNeXt-like block: depthwise conv, channels-last LayerNorm and MLP, layer-scale gamma, residual."""

    def __init__(self, c):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)
        self.gamma = nn.Parameter(0.5 + 0.1 * torch.randn(c))

    def forward(self, x):
        shortcut = x
        x = self.fc(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x.mul(self.gamma.reshape(1, -1, 1, 1)) + shortcut


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, D, 2, stride=2)
        self.block = LayerScaleBlock(D)
        self.head = nn.Linear(D, CLASSES)

    def forward(self, pixels):
        return self.head(self.block(self.stem(pixels)).mean((2, 3)))


class TinyViT(nn.Module):
    """A ViT root holding a bare class token and position table; patches from a conv; head on the class token."""

    def __init__(self, T):
        super().__init__()
        self.patch = nn.Conv2d(3, D, 2, stride=2)
        n = (T // 2) ** 2
        self.cls_token = nn.Parameter(0.1 * torch.randn(1, 1, D))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, n + 1, D))
        self.block = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, pixels):
        x = self.patch(pixels).flatten(2).transpose(1, 2)  # (B, n, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.block(x)
        return self.head(x[:, 0])


class TiedLM(nn.Module):
    """One table used for the lookup and for the output projection (tied weights in one module)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(VOCAB, D))
        self.mid = nn.Linear(D, D)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.mid(F.embedding(input_ids, self.weight))) * attention_mask[..., None]
        return h @ self.weight.T  # (B, T, V)


class TiedAcrossModules(nn.Module):
    """An Embedding subclass (usage route) whose table is the weight of a Linear head (a rule)."""

    def __init__(self):
        super().__init__()
        self.embed = ScaledEmbedding(VOCAB, D)
        self.mid = nn.Linear(D, D)
        self.out = nn.Linear(D, VOCAB, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, input_ids, attention_mask):
        return self.out(torch.tanh(self.mid(self.embed(input_ids))) * attention_mask[..., None])


class Twice(nn.Module):
    """One weight applied twice (a weight-shared two-layer map)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w)), self.w)


def _image_batch(B, T, dtype, g):
    return {"pixels": torch.randn(B, 3, T, T, generator=g, dtype=dtype)}, torch.randint(0, CLASSES, (B,), generator=g)


def _lm_loss(logits, labels):  # per-example mean over valid tokens (labels -100 elsewhere), then the batch mean
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, T)
    valid = (labels != -100).to(per_token.dtype)
    return (per_token.sum(1) / valid.sum(1)).mean()


def _text(make):
    return ZooCase(lambda T=None: make(), seq_cls_batch, lambda m, kw: m(**kw), F.cross_entropy)


def _lm(make):
    return ZooCase(lambda T=None: make(), lm_batch, lambda m, kw: m(**kw), _lm_loss)


def _image(make):
    return ZooCase(make, _image_batch, lambda m, kw: m(kw["pixels"]), F.cross_entropy)


CASES = {
    "matmul_linear": _text(lambda: TextModel(nn.Embedding(VOCAB, D), MatmulLinear(D, D))),
    "scaled_embedding": _text(lambda: TextModel(ScaledEmbedding(VOCAB, D), nn.Linear(D, D))),
    "offset_positions": _text(lambda: TextModel(nn.Embedding(VOCAB, D), nn.Linear(D, D), OffsetPositions(8, D))),
    "affine_norm": _text(lambda: TextModel(nn.Embedding(VOCAB, D), nn.Sequential(nn.Linear(D, D), Affine(D)))),
    "used_twice": _text(lambda: TextModel(nn.Embedding(VOCAB, D), Twice(D))),
    "addcmul_affine": _text(lambda: TextModel(nn.Embedding(VOCAB, D), nn.Sequential(nn.Linear(D, D),
                                                                                    AddcmulAffine(D)))),
    "addcmul_inplace": _text(lambda: TextModel(nn.Embedding(VOCAB, D), InplaceAddcmul(D, 1.0))),
    "addcmul_inplace_scaled": _text(lambda: TextModel(nn.Embedding(VOCAB, D), InplaceAddcmul(D, 0.5))),
    "weight_on_the_left": ZooCase(lambda T: TextModel(nn.Embedding(VOCAB, D), TokenMixing(T, D)), seq_cls_batch,
                                  lambda m, kw: m(**kw), F.cross_entropy),
    "layer_scale": _image(lambda T: ConvNet()),
    "vit_root": _image(TinyViT),
    "tied_in_module": _lm(TiedLM),
    "tied_across_modules": _lm(TiedAcrossModules),
}


def compare_no_generic(case: ZooCase, *, B: int, T: int, b: int) -> dict[str, float]:
    """Per-parameter relative errors against the naive loop; asserts no record took the generic route."""
    model = build_model(case, T, torch.float64)
    pristine = copy.deepcopy(model)
    inputs, targets = case.batch(B, T, torch.float64, torch.Generator().manual_seed(B * 100 + T))
    got, eng = engine(case, model, inputs, targets, b=b)
    generic = sorted(name for name, route in eng.last_strategies.items() if route == "func")
    assert not generic, f"on the generic torch.func path: {generic}"
    assert any("[" in name for name in eng.last_strategies), "no usage-route record"
    want = naive(case, pristine, inputs, targets, b=b)
    assert set(got) == set(want), f"parameters with a gradient differ: {sorted(set(got) ^ set(want))}"
    assert float(eng.last_group_norms.min()) > case.C, "not every micro-batch is clipped"
    return errors_by_param(got, want)


def _check(case, b, T):
    errors = compare_no_generic(case, B=B, T=T, b=b)
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"max rel err {errors[worst]:.2e} at {worst}"


@pytest.mark.parametrize("name, b, T", zoo_params(CASES))
def test_usage_route_matches_naive_loop(name, b, T):
    _check(CASES[name], b, T)


def _falcon_linear(d_in, d_out):
    falcon = pytest.importorskip("transformers.models.falcon.modeling_falcon")
    return falcon.FalconLinear(d_in, d_out)


# Cases whose library imports when the case builds its model (the zoo table lists them as HF.<case>, TIMM.<case>).
HF = {"falcon_linear": _text(lambda: TextModel(nn.Embedding(VOCAB, D), _falcon_linear(D, D)))}


@pytest.mark.parametrize("name, b, T", zoo_params(HF))
def test_hf_falcon_linear_takes_the_usage_route(name, b, T):
    _check(HF[name], b, T)


# ------------------------------------------------------------------------------------------ timm
def _timm_vit(T):
    return timm_class("models.vision_transformer", "VisionTransformer")(
        img_size=T, patch_size=2, in_chans=3, num_classes=CLASSES, embed_dim=D, depth=1, num_heads=2, mlp_ratio=2.0,
        init_values=0.5)  # init_values: LayerScale gammas


def _timm_convnext(T):
    return timm_class("models.convnext", "ConvNeXt")(
        in_chans=3, num_classes=CLASSES, depths=(1, 1, 1, 1), dims=(D, D, D, D), patch_size=1, ls_init_value=0.5)


def _big_images(B, T, dtype, g):  # three downsampling stages need more than T pixels
    return _image_batch(B, 2 * T, dtype, g)


TIMM = {"timm_vit": _image(_timm_vit),
        "timm_convnext": ZooCase(_timm_convnext, _big_images, lambda m, kw: m(kw["pixels"]), F.cross_entropy)}


@pytest.mark.slow
@pytest.mark.parametrize("name, b, T", zoo_params(TIMM))
def test_timm_families_take_the_usage_route(name, b, T):
    _check(TIMM[name], b, T)


# ------------------------------------------------------------------- what stays on the generic path
class ScaleAndExp(nn.Module):
    """One recognised use (a scale) and one that is not (``exp``) of the same parameter."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.w + self.w.exp()


class ReturnsTable(nn.Module):
    """Returns a slice of its table: the tensor leaves the forward, so its uses are not seen."""

    def __init__(self, n, d):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(n, d))

    def forward(self, x):
        return self.weight[: x.shape[1]]


class AddTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = ReturnsTable(8, D)

    def forward(self, h):
        return h + self.table(h)


def test_a_table_returned_by_the_forward_is_not_taken_by_the_usage_route():
    # Its uses happen outside the module, unseen: the generic capture takes the call and, as before, refuses a
    # parameter whose output has no batch dimension.
    case = _text(lambda: TextModel(nn.Embedding(VOCAB, D), AddTable()))
    model = build_model(case, 5, torch.float64)
    inputs, targets = case.batch(B, 5, torch.float64, torch.Generator().manual_seed(1))
    with pytest.raises(dp_microclip.BatchError, match=r"block.table \(ReturnsTable\).*no batch dimension"):
        engine(case, model, inputs, targets, b=2)


class TwoFactorAddcmul(nn.Module):
    """``addcmul`` with a parameter in BOTH factors: a product of two parameters is not a linear use."""

    def __init__(self, d):
        super().__init__()
        self.a = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.b = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return torch.addcmul(x, self.a, self.b)


@pytest.mark.parametrize("block", [ScaleAndExp, TwoFactorAddcmul])
def test_an_unrecognised_use_keeps_the_generic_path(block):
    module = "block"
    case = _text(lambda: TextModel(nn.Embedding(VOCAB, D), block(D)))
    model = build_model(case, 5, torch.float64)
    pristine = copy.deepcopy(model)
    inputs, targets = case.batch(B, 5, torch.float64, torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"usage route cannot take it.*generic torch.func"):
        got, eng = engine_warned(case, model, inputs, targets, b=2)
    assert eng.last_strategies[module] == "func"
    assert not any(name.startswith(f"{module}[") for name in eng.last_strategies)  # its usage records dropped
    want = naive(case, pristine, inputs, targets, b=2)
    errors = errors_by_param(got, want)
    assert max(errors.values()) < TOL, errors


def engine_warned(case, model, inputs, targets, *, b):
    """``harness.engine`` without its warning filter, so the generic-path warning reaches the test."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    eng = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=case.C)
    try:
        case.loss(case.forward(model, inputs), targets).backward()
        opt.step()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, eng
    finally:
        eng.detach()


@pytest.mark.parametrize("name", sorted(CASES))
def test_second_step_after_verification(name):
    # After the first (verified) step the engine switches the parameters' requires_grad off: outputs of
    # recognised calls that then need no gradient are tied to the engine's anchor. Same gradient, step 2.
    case = CASES[name]
    model = build_model(case, 6, torch.float64)
    pristine = copy.deepcopy(model)
    inputs, targets = case.batch(B, 6, torch.float64, torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    eng = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=case.C)
    try:
        for _ in range(2):
            opt.zero_grad()
            case.loss(case.forward(model, inputs), targets).backward()
            opt.step()
        assert not any(p.requires_grad for p in model.parameters())
        assert "func" not in eng.last_strategies.values()
        got = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        eng.detach()
    want = naive(case, pristine, inputs, targets, b=2)
    errors = errors_by_param(got, want)
    assert max(errors.values()) < TOL, errors
