"""Model-zoo harness: one engine step on an unchanged third-party model against the naive loop.

A ``ZooCase`` says how a user builds the model, makes a batch, calls the model
and computes the loss. The engine is attached to the model itself (an HF model
stays the HF model: its forward is called with keyword arguments, exactly as a
user would); the loss is computed outside the model. Only the ORACLE sees a thin
wrapper (``_Call``), because ``naive_microbatch_grads`` slices positional tensors
along the batch dimension and calls ``model(*tensors)``.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Callable

import pytest
import torch
from torch import nn

import dp_microclip
from dp_microclip.reference import naive_microbatch_grads

TOL = 1e-6  # per-parameter relative error in float64


@dataclasses.dataclass
class ZooCase:
    build: Callable[[int], nn.Module]  # T -> the model (T matters for ViT / Whisper encoders only)
    # (B, T, dtype, generator) -> ({name: tensor, batch along batch_dim}, targets (B, ...))
    batch: Callable[[int, int, torch.dtype, torch.Generator], tuple[dict, torch.Tensor]]
    # (model, {name: tensor}) -> output: how the user calls the model (keyword arguments for HF)
    forward: Callable[[nn.Module, dict], torch.Tensor]
    # (output, targets) -> scalar: the MEAN of per-example losses
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_dim: int = 0
    input_dims: dict | None = None  # per input name, its batch dimension where it differs from batch_dim
    setup: Callable[[nn.Module], None] | None = None  # e.g. gradient checkpointing, after the copy
    C: float = 0.05  # the clipping bound: small enough that every micro-batch is clipped (checked)


class _Call(nn.Module):
    """For the oracle only: ``model(*tensors)`` -> ``forward(model, dict(zip(keys, tensors)))``."""

    def __init__(self, model, keys, forward, dims=None):
        super().__init__()
        self.model = model
        self.keys = keys
        self.fn = forward
        self.dims = dims or {}  # per input: its own batch dimension (the oracle passes every input batch-first)

    def forward(self, *tensors):
        return self.fn(self.model, {k: t.movedim(0, self.dims.get(k, 0)) for k, t in zip(self.keys, tensors)})


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=floor))


def errors_by_param(got: dict, want: dict) -> dict[str, float]:
    """Per-parameter relative error, the denominator floored at 1e-6 x the whole gradient's norm.

    Some exact gradients are zero up to rounding (an attention key bias: softmax is invariant to a
    shift that is the same for every key), so ``||got - want|| / ||want||`` there is rounding noise
    over rounding noise. With the floor such a tensor must still agree to 1e-12 of the whole gradient.
    """
    total = float(torch.sqrt(sum(w.double().pow(2).sum() for w in want.values())))
    return {n: rel_err(got[n], want[n], floor=1e-6 * total) for n in want}


def build_model(case: ZooCase, T: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = case.build(T).to(dtype)
    model.train()  # the engine hooks train mode; dropout is 0 in every config instead of eval()
    return model


def naive(case: ZooCase, model: nn.Module, inputs: dict, targets, *, b: int, autocast=None):
    """The oracle on a deep copy (taken before any engine is attached); names without the wrapper's prefix."""
    reference = copy.deepcopy(model)
    if case.setup is not None:
        case.setup(reference)
    keys = list(inputs)
    fn = case.forward
    if autocast is not None:
        def fn(m, kw, _inner=case.forward):
            with torch.autocast("cpu", dtype=autocast):
                return _inner(m, kw)
    dims = {k: (case.input_dims or {}).get(k, case.batch_dim) for k in keys}
    wrapped = _Call(reference, keys, fn, dims)
    grads = naive_microbatch_grads(
        wrapped, case.loss, tuple(inputs[k].movedim(dims[k], 0) for k in keys), targets, micro_batch_size=b,
        max_grad_norm=case.C,
    )
    return {n.removeprefix("model."): g for n, g in grads.items()}


def engine(case: ZooCase, model: nn.Module, inputs: dict, targets, *, b: int, autocast=None, **attach_kwargs):
    """Attach to the unchanged model, one backward + a zero-lr step; ``({name: grad}, engine)``."""
    if case.setup is not None:
        case.setup(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generic-path notices
        eng = dp_microclip.attach(model, opt, micro_batch_size=b, max_grad_norm=case.C, **attach_kwargs)
        try:
            opt.zero_grad()
            if autocast is not None:
                with torch.autocast("cpu", dtype=autocast):
                    out = case.forward(model, inputs)
            else:
                out = case.forward(model, inputs)
            case.loss(out, targets).backward()
            opt.step()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        finally:
            eng.detach()
    return grads, eng


def compare(case: ZooCase, *, B: int, T: int, b: int, dtype=torch.float64, **attach_kwargs) -> dict[str, float]:
    """Per-parameter relative errors of the engine against the naive loop."""
    model = build_model(case, T, dtype)
    pristine = copy.deepcopy(model)
    inputs, targets = case.batch(B, T, dtype, torch.Generator().manual_seed(B * 100 + T))
    got, eng = engine(case, model, inputs, targets, b=b, **attach_kwargs)  # first: a refusal costs no oracle
    want = naive(case, pristine, inputs, targets, b=b)
    assert set(got) == set(want), f"parameters with a gradient differ: {sorted(set(got) ^ set(want))}"
    if eng.last_group_norms is not None:  # clipping is active: every micro-batch norm exceeds C
        assert float(eng.last_group_norms.min()) > case.C, f"not every micro-batch is clipped: {eng.last_group_norms}"
    return errors_by_param(got, want)


def assert_matches(case: ZooCase, *, B: int, T: int, b: int, **kw) -> None:
    errors = compare(case, B=B, T=T, b=b, **kw)
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"max rel err {errors[worst]:.2e} at {worst}; all: " + ", ".join(
        f"{n}={e:.1e}" for n, e in sorted(errors.items(), key=lambda kv: -kv[1])[:6]
    )


# ----------------------------------------------------------------- parametrisation
# Every model runs at B = 4 with b in {1, 2, B}, and with sequence length T == B (4) and T != B (6):
# T == B is where a batch dimension guessed from sizes goes wrong.
B = 4
T_EQ, T_NE = 4, 6
ANY = "*"

# Outcome codes for the tables of expected failures (engine at commit 656a789).
WRONG = AssertionError  # runs, but the gradient differs from the naive loop


def zoo_params(cases: dict, expected: dict | None = None, *, slow=(), bs=(1, 2, B), ts=(T_EQ, T_NE)):
    """``pytest.param(name, b, T)`` for every case; ``expected[name][(b, T)] = (exception type, reason)``
    marks a strict xfail (``ANY`` for any b or T). Names in ``slow`` get ``@pytest.mark.slow``."""
    expected = expected or {}
    params = []
    for name in cases:
        table = expected.get(name, {})
        for t in ts:
            for b in bs:
                marks = [pytest.mark.slow] if name in slow else []
                hit = table.get((b, t)) or table.get((ANY, t)) or table.get((b, ANY)) or table.get((ANY, ANY))
                if hit is not None:
                    exc, reason = hit
                    marks.append(pytest.mark.xfail(strict=True, raises=exc, reason=reason))
                label = f"{name}-b{'B' if b == B else b}-{'TeqB' if t == B else 'TneB'}"
                params.append(pytest.param(name, b, t, marks=marks, id=label))
    return params

def compare_autocast(case: ZooCase, *, B: int, T: int, b: int, dtype=torch.bfloat16):
    """(engine under autocast vs float32 naive loop, naive under autocast vs float32 naive loop), per parameter.

    The second is the error bf16 itself causes with exact clipping: the floor the engine is held to.
    """
    model = build_model(case, T, torch.float32)
    pristine = copy.deepcopy(model)
    inputs, targets = case.batch(B, T, torch.float32, torch.Generator().manual_seed(B * 100 + T))
    got, _ = engine(case, model, inputs, targets, b=b, autocast=dtype)
    want = naive(case, pristine, inputs, targets, b=b)
    floor = naive(case, pristine, inputs, targets, b=b, autocast=dtype)
    assert set(got) == set(want), f"parameters with a gradient differ: {sorted(set(got) ^ set(want))}"
    return errors_by_param(got, want), errors_by_param(floor, want)
