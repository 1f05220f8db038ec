"""The engine's averaged gradient equals the naive micro-batch loop, for every rule, b, clipping mode and strategy."""

from __future__ import annotations

import pytest
import torch

from .helpers import compare_with_naive
from .models import batch_dim_of, layer_cases, whole_model_cases

B = 8
TOL = 1e-5  # relative, per parameter tensor; float64 gives ~1e-13 in practice
CLIPPINGS = ["fixed", "adaptive", "per_layer", "normalize"]
MICRO = [1, 2, 4, B]


def _layout(case):
    return {"batch_first": False} if batch_dim_of(case) == 1 else {}


def _batch(cases, name):
    factory, make_inputs = cases[name]
    inputs = make_inputs()
    if inputs.is_floating_point():
        inputs = inputs.double()
    targets = torch.arange(B) % 3
    return factory, inputs, targets


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("b", MICRO)
@pytest.mark.parametrize("case", list(layer_cases(B)))
def test_layer_equals_naive_loop(case, b, clipping):
    factory, inputs, targets = _batch(layer_cases(B), case)
    errors, _ = compare_with_naive(
        factory, inputs, targets, b=b, clipping=clipping, batch_dim=batch_dim_of(case), **_layout(case)
    )
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("grad_mode", ["bookkeeping", "materialize", "func"])
@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("case", list(layer_cases(B)))
def test_every_strategy_equals_naive_loop(case, b, grad_mode):
    factory, inputs, targets = _batch(layer_cases(B), case)
    errors, _ = compare_with_naive(
        factory, inputs, targets, b=b, clipping="fixed", grad_mode=grad_mode, batch_dim=batch_dim_of(case),
        **_layout(case),
    )
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("b", MICRO)
@pytest.mark.parametrize("case", ["mlp", "cnn", "transformer"])
def test_whole_model_equals_naive_loop(case, b, clipping):
    cases = whole_model_cases(B)
    factory, make_inputs = cases[case]
    inputs = make_inputs()
    if inputs.is_floating_point():
        inputs = inputs.double()
    targets = torch.arange(B) % (3 if case == "transformer" else 10)
    errors, _ = compare_with_naive(factory, inputs, targets, b=b, clipping=clipping)
    assert max(errors.values()) < TOL, errors


class MaskedAttention(torch.nn.Module):
    """MHA with the masks users pass: causal, key padding, need_weights; plus dropout with a fixed seed."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        t = x.shape[1]
        causal = torch.nn.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype)
        if self.variant == "causal":
            out, _ = self.attn(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
        elif self.variant == "float_mask":
            out, _ = self.attn(x, x, x, attn_mask=causal, need_weights=False)
        elif self.variant == "padding":
            pad = x[..., 0] > 0.8  # a per-example mask (from the example itself, never its position)
            pad[:, 0] = False
            out, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        else:  # need_weights
            out, w = self.attn(x, x, x)
            out = out + 0.1 * w.sum(-1, keepdim=True)
        return self.head(out.mean(1))


@pytest.mark.parametrize("variant", ["causal", "float_mask", "padding", "weights"])
@pytest.mark.parametrize("b", [1, 4])
def test_attention_masks_equal_naive_loop(variant, b):
    inputs = torch.randn(B, 5, 8, generator=torch.Generator().manual_seed(0)).double()
    targets = torch.arange(B) % 3
    errors, _ = compare_with_naive(lambda: MaskedAttention(variant), inputs, targets, b=b, clipping="fixed")
    assert max(errors.values()) < TOL, errors
