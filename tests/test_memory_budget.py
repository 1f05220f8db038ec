"""The memory budget (``attach(memory_budget=...)``): planned from shapes, respected before timing, exact.

* Under any budget (lean, tiny, large, a fraction of free memory) the gradient equals the naive loop.
* A route whose planned peak exceeds the budget is never built, not even to be timed.
* Bad budget values are refused with the fix; a budget no route fits warns (or raises with ``strict``).
* Shape only: a 7B-shaped decoder layer (d=4096, 32 heads, T=2048, B=8) built on the meta device is
  planned without running it; the planned peak stays within the budget and a tight budget changes the routes.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import dp_microclip
from dp_microclip import aggregate
from dp_microclip import ConfigurationError, MemoryBudget
from dp_microclip.grouping import contiguous_groups
from dp_microclip.layers.registry import rule_for
from dp_microclip.reference import naive_microbatch_grads
from dp_microclip.planner import (
    LayerShape, footprint, pass_peak, plan_call, plan_pass, record_shape,
)
from dp_microclip.routes import Autotuner

from .helpers import compare_with_naive
from .models import loss_fn, whole_model_cases

B = 8
TOL = 1e-9  # float64


# ---------------------------------------------------------------- exactness under a budget
@pytest.mark.parametrize("budget", ["lean", 1, 10**9, 0.5, MemoryBudget(max_bytes=20_000)])
@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("case", ["mlp", "cnn", "transformer"])
def test_gradient_under_a_budget_equals_the_naive_loop(case, b, budget):
    factory, make_inputs = whole_model_cases(B)[case]
    inputs = make_inputs()
    inputs = inputs.double() if inputs.is_floating_point() else inputs
    targets = torch.arange(B) % 3
    # verify_steps=0: lean mode reduces records as they arrive from the first step on (no self-check holds them).
    errors, engine = compare_with_naive(factory, inputs, targets, b=b, clipping="fixed", memory_budget=budget,
                                        verify_steps=0)
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("grouping", ["keyed", "contiguous"])
def test_lean_equals_the_naive_loop_over_several_steps_and_groupings(grouping, monkeypatch):
    """After the first (self-checked) step, lean mode reduces LayerNorm/conv records early: still exact."""
    from dp_microclip.reference import naive_microbatch_grads

    factory, make_inputs = whole_model_cases(B)["cnn"]
    torch.manual_seed(0)
    model = factory().double()
    x, y = make_inputs().double(), torch.arange(B) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reduced = []
    original = aggregate.EarlyReduction.__call__

    def spy(self, record):
        out = original(self, record)
        reduced.append(out.group_grads is not None)
        return out

    monkeypatch.setattr(aggregate.EarlyReduction, "__call__", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.05, grouping=grouping,
                                     num_groups=4 if grouping == "keyed" else None, memory_budget="lean", seed=3)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        groups = engine.last_groups
        opt.step()
    got = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    engine.detach()
    assert any(reduced) and not all(reduced)  # GroupNorm and the first conv reduced as they arrived, from step 2
    if grouping == "contiguous":
        want = naive_microbatch_grads(model, loss_fn, x, y, micro_batch_size=2, max_grad_norm=0.05)
    else:  # the naive loop over the engine's own keyed groups of the last step
        want = naive_microbatch_grads(model, loss_fn, x, y, group_index=groups.index, num_groups=4,
                                      max_grad_norm=0.05)
    for name in want:
        assert float((got[name] - want[name]).norm() / want[name].norm()) < TOL, name


# ---------------------------------------------------------------- never built over the budget
def test_a_route_over_the_budget_is_never_built_nor_timed(monkeypatch):
    """Materialised group gradients of Linear(64, 64) at M=16 take 16 x 4160 x 8 bytes: a 20 kB budget rules
    them out, so the autotuner never builds them (not even to time them); ghost norms (one row per group) fit."""
    built = []
    original = Autotuner.group_grads

    def spy(self, record, groups):
        built.append(record.name)
        return original(self, record, groups)

    monkeypatch.setattr(Autotuner, "group_grads", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0,
                                 memory_budget=MemoryBudget(max_bytes=20_000))
    x, y = torch.randn(16, 64, dtype=torch.float64), torch.arange(16) % 3
    loss_fn(model(x), y).backward()
    opt.step()
    assert built == []
    assert set(engine.last_strategies.values()) == {"ghost"}
    engine.detach()

    # A budget that holds them lets the autotuner build and time them.
    model2 = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).double()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.0)
    engine2 = dp_microclip.attach(model2, opt2, micro_batch_size=1, max_grad_norm=1.0, memory_budget=10**9)
    loss_fn(model2(x), y).backward()
    opt2.step()
    assert built  # timed (and maybe chosen)
    engine2.detach()


def test_routes_are_planned_once_per_pass_signature_and_again_for_new_shapes(monkeypatch):
    """The planner runs at the first pass of each signature (shapes, groups); a later pass with the same shapes
    reuses its routes, one with another batch size plans again; the gradient equals the naive loop throughout."""
    from dp_microclip import routes

    planned = []
    original = routes.leanest_peaks

    def spy(records, *args):
        planned.append(len(records))
        return original(records, *args)

    monkeypatch.setattr(routes, "leanest_peaks", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=0.5)
    batches = [(torch.randn(n, 6, dtype=torch.float64), torch.arange(n) % 3) for n in (8, 8, 6, 8, 6)]
    counts = []
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()  # the engine writes .grad in the optimizer's pre-step hook
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        counts.append(len(planned))
        want = naive_microbatch_grads(reference, loss_fn, x, y, micro_batch_size=2, max_grad_norm=0.5)
        for name, g in got.items():
            torch.testing.assert_close(g, want[name], rtol=TOL, atol=TOL)
    assert counts == [1, 1, 2, 2, 2]  # B=8 planned once, B=6 once
    engine.detach()


def test_a_budget_no_route_fits_warns_with_the_fix_or_raises_when_strict():
    model = nn.Sequential(nn.Linear(16, 16)).double()
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.arange(8) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0, memory_budget=1)
    with pytest.warns(UserWarning, match=r"max_physical_batch_size"):
        loss_fn(model(x), y).backward()
    opt.step()
    assert engine.last_strategies == {"0": "ghost"}  # the leanest exact route
    engine.detach()

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=1.0,
                                 memory_budget=MemoryBudget(max_bytes=1, strict=True))
    with pytest.raises(ConfigurationError, match=r"memory budget.*max_physical_batch_size"):
        loss_fn(model(x), y).backward()
    engine.detach()


# ---------------------------------------------------------------- bad values
@pytest.mark.parametrize("value, message", [
    (0, "bytes >= 1"), (-5, "bytes >= 1"), (1.5, r"\(0, 1\]"), (0.0, r"\(0, 1\]"), (float("nan"), r"\(0, 1\]"),
    (True, "memory_budget must be"), ("big", "not understood"), ([1], "memory_budget must be"),
])
def test_bad_budget_values_are_refused_with_the_fix(value, message):
    model = nn.Linear(4, 2)
    with pytest.raises(ConfigurationError, match=message):
        dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=1,
                            max_grad_norm=1.0, memory_budget=value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_bytes=10, fraction_of_free=0.5), "not both"),
    (dict(max_bytes=2.5), "whole number of bytes"),
    (dict(max_bytes=True), "whole number of bytes"),
    (dict(fraction_of_free=2), r"\(0, 1\]"),
    (dict(fraction_of_free=float("inf")), r"\(0, 1\]"),
    (dict(lean="yes"), "True or False"),
    (dict(strict=1), "True or False"),
])
def test_bad_memory_budget_objects_are_refused(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        MemoryBudget(**kwargs)


def test_budget_forms_and_default():
    model = nn.Linear(4, 2)
    for value, want in [(None, MemoryBudget()), ("lean", MemoryBudget(lean=True)), (4096, MemoryBudget(max_bytes=4096)),
                        (0.25, MemoryBudget(fraction_of_free=0.25))]:
        engine = dp_microclip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=1,
                                     max_grad_norm=1.0, memory_budget=value)
        assert engine.settings.clip.memory == want
        engine.detach()
    assert not MemoryBudget().explicit and MemoryBudget(max_bytes=1).explicit


# ---------------------------------------------------------------- shape only: a 7B-shaped decoder layer
D, HEADS, T, BATCH, FF = 4096, 32, 2048, 8, 11008
GIB = 2**30


def _llama_layer_shapes():
    """A LLaMA-like decoder layer from plain torch modules on the meta device, as the engine's records would
    capture it (batch-first inputs and output gradients, meta tensors: nothing is allocated or run)."""
    meta = torch.device("meta")
    layers = {
        "input_norm": nn.RMSNorm(D, device=meta),
        "q_proj": nn.Linear(D, D, bias=False, device=meta), "k_proj": nn.Linear(D, D, bias=False, device=meta),
        "v_proj": nn.Linear(D, D, bias=False, device=meta), "o_proj": nn.Linear(D, D, bias=False, device=meta),
        "post_norm": nn.RMSNorm(D, device=meta),
        "gate_proj": nn.Linear(D, FF, bias=False, device=meta), "up_proj": nn.Linear(D, FF, bias=False, device=meta),
        "down_proj": nn.Linear(FF, D, bias=False, device=meta),
    }
    assert D % HEADS == 0  # 32 heads of 128: attention itself has no parameters, its projections are the Linears
    groups = contiguous_groups(BATCH, 1)
    shapes = []
    for name, layer in reversed(list(layers.items())):  # backward order, as records arrive
        d_in = layer.in_features if isinstance(layer, nn.Linear) else D
        d_out = layer.out_features if isinstance(layer, nn.Linear) else D
        rule = rule_for(layer)
        record = SimpleNamespace(name=name, layer=layer, rule=rule, params=dict(layer.named_parameters()),
                                 inputs=(torch.empty(BATCH, T, d_in, device=meta),),
                                 out_grad=torch.empty(BATCH, T, d_out, device=meta))
        routes = ("ghost", "norms_then_sum", "materialize") if rule.has_ghost else ("materialize",)
        shapes.append(record_shape(record, groups, routes))
    return shapes, groups


def test_7b_decoder_layer_is_planned_from_shapes_within_the_budget():
    shapes, groups = _llama_layer_shapes()
    m, r = groups.num_groups, groups.max_size()
    up = next(s for s in shapes if s.name == "up_proj")
    assert up.group_grad_elements == BATCH * D * FF  # (M, 11008, 4096): 1.4 GB in float32
    assert footprint(up, "ghost", m, r, True).transient >= 3 * BATCH * T * T * 4  # Gram matrices (B, T, T)

    generous = plan_pass(shapes, 64 * GIB, m, r)
    tight = plan_pass(shapes, 2 * GIB, m, r)
    lean = plan_pass(shapes, 2 * GIB, m, r, lean=True)
    for plans, budget in ((generous, 64 * GIB), (tight, 2 * GIB), (lean, 2 * GIB)):
        assert not any(plan.over_budget for _, plan in plans.values())
        assert pass_peak(plans) <= budget
    # A generous budget lets the fast route (materialised group gradients) through; a tight one rules most out.
    routes = {name: route for name, (route, _) in generous.items()}
    tight_routes = {name: route for name, (route, _) in tight.items()}
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert all(routes[n] == "materialize" for n in linears)  # 6 GiB of group gradients held: fits 64 GiB
    held = sum(1 for n in linears if tight_routes[n] == "materialize")
    assert held < len(linears) and tight_routes["up_proj"] != "materialize"
    # Lean: the leanest route everywhere, Gram norms for the projections; the smallest planned peak.
    assert {lean[n][0] for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")} \
        == {"ghost"}
    assert {lean[n][0] for n in ("input_norm", "post_norm")} == {"materialize"}
    assert pass_peak(lean) <= pass_peak(tight) <= pass_peak(generous)


def test_7b_decoder_layer_over_a_tiny_budget_falls_back_to_the_leanest_route():
    shapes, groups = _llama_layer_shapes()
    plans = plan_pass(shapes, 64 * 2**20, groups.num_groups, groups.max_size())  # 64 MiB: not even Gram norms fit
    assert any(plan.over_budget for _, plan in plans.values())
    for route, plan in plans.values():
        if plan.over_budget:
            assert route == plan.leanest


def test_planner_counts_padding_of_ragged_groups():
    shape = LayerShape("x", batch=8, rows=4, in_features=16, out_features=16, group_grad_elements=4 * 272,
                       routes=("ghost",))
    equal = plan_call(shape, 10**9, 4, 2, contiguous=True).footprints["ghost"]
    ragged = plan_call(shape, 10**9, 4, 3, contiguous=False).footprints["ghost"]
    assert ragged.transient > equal.transient


def test_lean_skips_a_non_finite_group_after_records_were_reduced_early():
    """A NaN example with lean mode's early-reduced records (LayerNorm): its group contributes zero, the rest
    equals the naive loop over the finite examples (divided by all M groups)."""
    from dp_microclip.reference import naive_microbatch_grads

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.arange(8) % 3
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = dp_microclip.attach(model, opt, micro_batch_size=1, max_grad_norm=0.5, memory_budget="lean",
                                 verify_steps=0)
    bad = x.clone()
    bad[3] = float("nan")
    loss_fn(model(bad), y).backward()
    opt.step()
    got = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    assert engine.nonfinite_groups == 1 and engine.last_strategies["1"] == "materialize"
    engine.detach()
    keep = torch.tensor([i for i in range(8) if i != 3])
    want = naive_microbatch_grads(model, loss_fn, x[keep], y[keep], micro_batch_size=1, max_grad_norm=0.5)
    for name, value in want.items():  # the naive loop divides by 7 groups, the engine by all 8
        assert torch.allclose(got[name], value * 7 / 8, rtol=1e-9, atol=1e-12), name
