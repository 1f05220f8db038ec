"""Shared test helpers: run one engine step and compare with the naive loop."""

from __future__ import annotations

import copy
import warnings

import torch

import dp_microclip
from dp_microclip.reference import naive_microbatch_grads

from .models import loss_fn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a whole tensor: ||a - b|| / max(||b||, tiny)."""
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def engine_grads(model, inputs, targets, *, batch_dim=0, **attach_kwargs):
    """Attach, do one backward + a zero-learning-rate step, return {name: p.grad}; then detach."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dp_microclip.attach(model, opt, **attach_kwargs)
    opt.zero_grad()
    out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    loss_fn(out, targets).backward()
    opt.step()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    engine.detach()
    return grads, engine


def compare_with_naive(factory, inputs, targets, *, b, clipping, grad_mode="auto", batch_dim=0, C=0.05, **extra):
    torch.manual_seed(0)
    model = factory().double()
    reference_model = copy.deepcopy(model)
    kwargs = {}
    if clipping == "per_layer":
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        bounds = {n: C * (1 + i % 3) / 2 for i, n in enumerate(names)}
        kwargs["per_param_bounds"] = bounds
        max_grad_norm = bounds
    else:
        max_grad_norm = C
    want = naive_microbatch_grads(
        reference_model, loss_fn, inputs, targets, micro_batch_size=b, max_grad_norm=C if clipping != "per_layer" else 1.0,
        clipping=clipping, batch_dim=batch_dim, **kwargs,
    )
    got, engine = engine_grads(
        model, inputs, targets, micro_batch_size=b, max_grad_norm=max_grad_norm, clipping=clipping,
        grad_mode=grad_mode, **extra,
    )
    assert set(got) == set(want), (set(got) ^ set(want))
    errors = {n: rel_err(got[n], want[n]) for n in want}
    return errors, engine


def OwnLossDP(**fields) -> dp_microclip.DP:
    """DP settings for a test whose loop backpropagates its own loss (``loss.backward()``, not ``engine.loss``).

    DP mode refuses such steps by default (``require_verified_loss=True``); tests whose subject is something
    else (noise, the ledger, sampling, physical batches, the model-side checks) opt out here, by name. The
    default itself is tested in test_loss_contract.py, and every tutorial runs with it.
    """
    return dp_microclip.DP(**{"require_verified_loss": False, **fields})
