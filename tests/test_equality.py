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
