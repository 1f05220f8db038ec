"""Vision families no rule names, unchanged, against the naive loop (float64, b in {1, 2, B}, T == B and T != B).

HuggingFace Swin (window attention; a ``relative_position_bias_table`` gathered by a ``relative_position_index``
buffer and added to every window's scores), BEiT (a relative-position bias module whose output is the same for
every example, layer-scale lambdas), DeiT (class and distillation tokens), Dinov2 (layer scale, interpolated
positions), ConvNeXtV2 (global response normalisation); timm's Swin, CaiT (class attention, layer scale),
ResMLP (affine "norms") and PoolFormer. Tiny configs, no download.

What T means per family (T == B is where a size guessed as the batch goes wrong):

* Swin: the image side in patches; windows of 2 x 2 patches, so T == B gives B windows per example, and every
  window holds 4 == B tokens; the relative-position table meets the batch folded with the windows
  (``(B * windows, heads, 4, 4)`` scores);
* BEiT, DeiT: the number of tokens (patches plus class / distillation tokens);
* Dinov2, ConvNeXtV2, CaiT, ResMLP: the image side in patches; PoolFormer: the image side after its stride-4 stem.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from .data import CLASSES
from .harness import B, TOL, ZooCase, build_model, engine, errors_by_param, naive, zoo_params
from .test_generic_path import DOCUMENTED
from .timm_stub import timm_class

transformers = pytest.importorskip("transformers")

D = 8


def _images(h, w):
    def batch(B, T, dtype, g):
        return ({"pixel_values": torch.randn(B, 3, h(T), w(T), generator=g, dtype=dtype)},
                torch.randint(0, CLASSES, (B,), generator=g))
    return batch


def _hf_logits(model, kw):
    return model(**kw).logits


def _hf(build, batch):
    return ZooCase(build, batch, _hf_logits, F.cross_entropy)


def _swin(T):
    return transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=T, patch_size=1, num_channels=3, embed_dim=D, depths=[2], num_heads=[2], window_size=2,
        mlp_ratio=2.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        num_labels=CLASSES,
    ))


def _beit(T):
    # T tokens: T - 1 patches of 2 x 2 in a 2 x 2(T-1) image, and the class token.
    return transformers.BeitForImageClassification(transformers.BeitConfig(
        image_size=(2, 2 * (T - 1)), patch_size=2, num_channels=3, hidden_size=D, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0, use_relative_position_bias=True, use_absolute_position_embeddings=False,
        layer_scale_init_value=0.5, use_mean_pooling=True, num_labels=CLASSES,
    ))


def _deit(T):
    # T tokens: T - 2 patches, the class token and the distillation token.
    return transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(
        image_size=(2, 2 * (T - 2)), patch_size=2, num_channels=3, hidden_size=D, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=CLASSES,
    ))


def _dinov2(T):
    return transformers.Dinov2ForImageClassification(transformers.Dinov2Config(
        image_size=T, patch_size=1, num_channels=3, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
        mlp_ratio=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layerscale_value=0.5,
        num_labels=CLASSES,
    ))


def _convnextv2(T):
    return transformers.ConvNextV2ForImageClassification(transformers.ConvNextV2Config(
        num_channels=3, num_stages=2, patch_size=1, hidden_sizes=[D, D], depths=[1, 1], drop_path_rate=0.0, num_labels=CLASSES,
    ))


CASES = {
    "hf_swin": _hf(_swin, _images(lambda T: T, lambda T: T)),
    "hf_beit": _hf(_beit, _images(lambda T: 2, lambda T: 2 * (T - 1))),
    "hf_deit": _hf(_deit, _images(lambda T: 2, lambda T: 2 * (T - 2))),
    "hf_dinov2": _hf(_dinov2, _images(lambda T: T, lambda T: T)),
    "hf_convnextv2": _hf(_convnextv2, _images(lambda T: T, lambda T: T)),
}


# ------------------------------------------------------------------------------------------ timm
def _timm_logits(model, kw):
    return model(kw["pixel_values"])


def _timm_swin(T):
    return timm_class("models.swin_transformer", "SwinTransformer")(
        img_size=T, patch_size=1, in_chans=3, num_classes=CLASSES, embed_dim=D, depths=(2,), num_heads=(2,),
        window_size=2, mlp_ratio=2.0, drop_path_rate=0.0)  # its default draws per example


def _timm_cait(T):
    return timm_class("models.cait", "Cait")(
        img_size=T, patch_size=1, in_chans=3, num_classes=CLASSES, embed_dim=D, depth=1, num_heads=2, mlp_ratio=2.0,
        init_values=0.5, depth_token_only=1, mlp_ratio_token_only=2.0)


def _timm_resmlp(T):
    block = functools.partial(timm_class("models.mlp_mixer", "ResBlock"), init_values=0.5)
    return timm_class("models.mlp_mixer", "MlpMixer")(
        num_classes=CLASSES, img_size=T, in_chans=3, patch_size=1, num_blocks=1, embed_dim=D, mlp_ratio=2,
        block_layer=block, norm_layer=timm_class("models.mlp_mixer", "Affine"))


def _timm_poolformer(T):
    return timm_class("models.metaformer", "MetaFormer")(
        in_chans=3, num_classes=CLASSES, depths=(1,), dims=(D,), downsample_norm=None, mlp_act=torch.nn.GELU,
        mlp_bias=True, norm_layers=timm_class("layers", "GroupNorm1"), layer_scale_init_values=0.5,
        res_scale_init_values=None, use_mlp_head=False)


def _timm(build, batch):
    return ZooCase(build, batch, _timm_logits, F.cross_entropy)


# timm imports when a case builds its model (timm_stub.timm_class); the zoo table lists these as TIMM.<case>.
TIMM = {
    "timm_swin": _timm(_timm_swin, _images(lambda T: T, lambda T: T)),
    "timm_cait": _timm(_timm_cait, _images(lambda T: T, lambda T: T)),
    "timm_resmlp": _timm(_timm_resmlp, _images(lambda T: T, lambda T: T)),
    "timm_poolformer": _timm(_timm_poolformer, _images(lambda T: 4 * T, lambda T: 4 * T)),
}


def _no_generic(case, *, b, T):
    """``assert_matches``, and no module on the generic torch.func path other than the documented ones."""
    model = build_model(case, T, torch.float64)
    pristine = copy.deepcopy(model)
    inputs, targets = case.batch(B, T, torch.float64, torch.Generator().manual_seed(B * 100 + T))
    got, eng = engine(case, model, inputs, targets, b=b)
    generic = {type(model.get_submodule(name)).__name__ for name, route in eng.last_strategies.items()
               if route == "func"}
    assert not generic - set(DOCUMENTED), f"on the generic path without a documented reason: {sorted(generic)}"
    want = naive(case, pristine, inputs, targets, b=b)
    assert set(got) == set(want), f"parameters with a gradient differ: {sorted(set(got) ^ set(want))}"
    assert float(eng.last_group_norms.min()) > case.C, "not every micro-batch is clipped"
    errors = errors_by_param(got, want)
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"max rel err {errors[worst]:.2e} at {worst}"


@pytest.mark.parametrize("name, b, T", zoo_params(CASES))
def test_hf_vision_families_match_naive_loop(name, b, T):
    _no_generic(CASES[name], b=b, T=T)


@pytest.mark.parametrize("name, b, T", zoo_params(TIMM))
def test_timm_vision_families_match_naive_loop(name, b, T):
    _no_generic(TIMM[name], b=b, T=T)


def test_dp_steps_on_swin_with_poisson_batches():
    # DP mode allows no generic path by default: Swin's tables take the usage route and meet the batch where the
    # probe found it, at every sampled batch size.
    import dp_microclip

    torch.manual_seed(0)
    model = _swin(4).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine_ = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0,
                                  privacy=dp_microclip.DP(noise_multiplier=1.0, sample_rate=0.5, delta=1e-5))
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.arange(8) % CLASSES)
    for x, y in engine_.data_loader(data):
        opt.zero_grad()
        logits = model(pixel_values=x).logits
        engine_.loss(lambda out, t: F.cross_entropy(out, t, reduction="none"), logits, y).backward()
        opt.step()
    assert engine_.epsilon() > 0
    assert not any(route == "func" for route in engine_.last_strategies.values())
