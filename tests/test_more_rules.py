"""Rules for more module types: transposed convs, PReLU, Bilinear, HF transformers and timm layers; registry lookup.

Every new rule is checked two ways:

* the engine with that rule (``fallback="error"``, so a missing rule fails
  instead of silently taking the generic path) against the naive micro-batch
  loop, float64, b in {1, 2, B}, every clipping mode;
* the rule's functions directly against autograd, one group at a time, with
  ragged keyed groups (``group_grads``; for ghost rules also ``group_sq_norms``
  and ``weighted_sum``).

HF modules are built directly (never ``from_pretrained``); timm's norm layers
are loaded without ``timm/__init__``, whose ``torchvision`` import fails where
torchvision is not installed (see ``_timm_norm``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from dp_microclip import grouping
from dp_microclip.layers import registry
from dp_microclip.layers.registry import LayerRule, register_lazy_rule, register_rule, rule_for, rule_for_type, squared_norm
from dp_microclip.layers.third_party import HF_RMS_FAMILIES, TIMM_NORM_RULES, hf_module_path

from .helpers import compare_with_naive
from .models import MeanOver

B = 6
T = 4
TOL = 1e-6  # relative, per parameter tensor, float64
CLIPPINGS = ["fixed", "adaptive", "per_layer", "normalize"]
MICRO = [1, 2, B]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add barriers, which cost tens of ms per op on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- models
def _randomise(*norms):
    """Norm weights start at ones (zeros for Gemma): draw them so a formula that ignores w cannot pass."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_(torch.rand(norm.bias.shape, generator=g) - 0.5)
    return norms[0]


class BilinearHead(nn.Module):
    """Linear -> Bilinear(h, x) over a sequence, mean over positions."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.bil = nn.Bilinear(4, 5, 3, bias=bias)

    def forward(self, x):  # x: (B, T, 5)
        return self.bil(torch.tanh(self.lin(x)), x).mean(1)


def _seq_norm(norm_factory):
    """Linear -> norm over the last dim of (B, T, 6) -> mean over T -> Linear."""

    def make():
        norm = _randomise(norm_factory())
        return nn.Sequential(nn.Linear(6, 6), norm, MeanOver(1), nn.Linear(6, 3))

    return make


def _chan_norm(norm_factory):
    """Conv2d -> channel norm on (B, 4, 3, 3) -> Linear."""

    def make():
        norm = _randomise(norm_factory())
        return nn.Sequential(nn.Conv2d(2, 4, 3), norm, nn.Flatten(), nn.Linear(4 * 3 * 3, 3))

    return make


def torch_cases():
    """name -> (model factory, input shape). Each model's parameters all have rules."""
    return {
        "conv_transpose1d": (
            lambda: nn.Sequential(
                nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), nn.Tanh(),
                nn.ConvTranspose1d(4, 2, 3, dilation=2, output_padding=1, bias=False),  # output_padding >= stride
                nn.Flatten(), nn.Linear(2 * 15, 3)),
            (B, 3, 5),
        ),
        "conv_transpose2d": (
            lambda: nn.Sequential(
                nn.ConvTranspose2d(4, 4, 3, stride=2, groups=2, dilation=(1, 2)), nn.Tanh(),
                nn.Flatten(), nn.Linear(4 * 7 * 9, 3)),
            (B, 4, 3, 3),
        ),
        "conv_transpose3d": (
            lambda: nn.Sequential(nn.ConvTranspose3d(2, 2, 2, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                                  nn.Linear(2 * 2 * 4 * 2, 3)),
            (B, 2, 2, 3, 2),
        ),
        "prelu_channels": (_chan_norm(lambda: nn.PReLU(4)), (B, 2, 5, 5)),
        "prelu_single": (lambda: nn.Sequential(nn.Linear(6, 5), _randomise(nn.PReLU()), nn.Linear(5, 3)), (B, 6)),
        "bilinear": (lambda: BilinearHead(), (B, T, 5)),
        "bilinear_no_bias": (lambda: BilinearHead(bias=False), (B, T, 5)),
    }


def hf_cases():
    """name -> (model factory, input shape), building HF modules directly (skips without transformers)."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    def norm(module, name, **kwargs):
        return lambda: getattr(importlib.import_module(module), name)(6, **kwargs)

    return {
        "hf_conv1d": (
            lambda: nn.Sequential(Conv1D(5, 6), nn.Tanh(), MeanOver(1), Conv1D(3, 5)),  # Conv1D(nf=out, nx=in)
            (B, T, 6),
        ),
        "hf_llama_rms": (_seq_norm(norm(hf_module_path("llama"), "LlamaRMSNorm", eps=1e-5)), (B, T, 6)),
        "hf_mistral_rms": (_seq_norm(norm(hf_module_path("mistral"), "MistralRMSNorm")), (B, T, 6)),
        "hf_t5_layer_norm": (_seq_norm(norm(hf_module_path("t5"), "T5LayerNorm")), (B, T, 6)),
        "hf_olmo2_rms": (_seq_norm(norm(hf_module_path("olmo2"), "Olmo2RMSNorm")), (B, T, 6)),
        "hf_gemma_rms": (_seq_norm(norm(hf_module_path("gemma"), "GemmaRMSNorm")), (B, T, 6)),
        "hf_gemma3n_rms": (_seq_norm(norm(hf_module_path("gemma3n"), "Gemma3nRMSNorm")), (B, T, 6)),
    }


def _timm_norm():
    """``timm.layers.norm``, imported without running ``timm/__init__`` when that fails.

    timm's package ``__init__`` imports ``timm.layers``, which imports
    ``torchvision`` (absent here: installing it could replace torch). The norm
    module itself needs only torch and ``timm.layers.fast_norm``, so it is
    loaded under stand-in parent packages, which are removed again afterwards:
    the classes keep ``__module__ == "timm.layers.norm"``, which is all the
    lazy rules look at.
    """
    try:
        return importlib.import_module("timm.layers.norm")
    except ImportError:
        pass
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    saved = {k: v for k, v in sys.modules.items() if k == "timm" or k.startswith("timm.")}
    for k in saved:
        del sys.modules[k]
    for name, path in (("timm", root), ("timm.layers", root / "layers")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    try:
        return importlib.import_module("timm.layers.norm")
    except ImportError as err:
        pytest.skip(f"timm.layers.norm does not import on its own here: {err}")
    finally:
        for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def timm_cases():
    """name -> (model factory, input shape) for timm's norm layers."""
    tn = _timm_norm()
    return {
        "timm_layer_norm": (_seq_norm(lambda: tn.LayerNorm(6)), (B, T, 6)),
        "timm_layer_norm_2d": (_chan_norm(lambda: tn.LayerNorm2d(4)), (B, 2, 5, 5)),
        "timm_group_norm": (_chan_norm(lambda: tn.GroupNorm(4, num_groups=2)), (B, 2, 5, 5)),
        "timm_group_norm_1": (_chan_norm(lambda: tn.GroupNorm1(4)), (B, 2, 5, 5)),
        "timm_rms_norm": (_seq_norm(lambda: tn.RmsNorm(6)), (B, T, 6)),
        "timm_rms_norm_2d": (_chan_norm(lambda: tn.RmsNorm2d(4)), (B, 2, 5, 5)),
    }


SOURCES = {"torch": torch_cases, "hf": hf_cases, "timm": timm_cases}
CASE_NAMES = {
    "torch": list(torch_cases()),
    "hf": ["hf_conv1d", "hf_llama_rms", "hf_mistral_rms", "hf_t5_layer_norm", "hf_olmo2_rms", "hf_gemma_rms",
           "hf_gemma3n_rms"],
    "timm": ["timm_layer_norm", "timm_layer_norm_2d", "timm_group_norm", "timm_group_norm_1", "timm_rms_norm",
             "timm_rms_norm_2d"],
}
ALL_CASES = [(source, name) for source, names in CASE_NAMES.items() for name in names]
_CACHE: dict = {}


def _case(source, name):
    if source not in _CACHE:
        _CACHE[source] = SOURCES[source]()
    return _CACHE[source][name]


def _inputs(shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# ------------------------------------------------------------------------- engine vs the naive loop
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("b", MICRO)
@pytest.mark.parametrize("source,case", ALL_CASES)
def test_rule_equals_naive_loop(source, case, b, clipping):
    factory, shape = _case(source, case)
    errors, _ = compare_with_naive(
        factory, _inputs(shape), torch.arange(B) % 3, b=b, clipping=clipping, fallback="error"
    )
    assert max(errors.values()) < TOL, errors


GHOST_CASES = [("torch", "bilinear"), ("hf", "hf_conv1d")]


@pytest.mark.parametrize("grad_mode", ["bookkeeping", "materialize"])
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("source,case", GHOST_CASES)
def test_ghost_rules_every_strategy(source, case, b, grad_mode):
    factory, shape = _case(source, case)
    errors, _ = compare_with_naive(
        factory, _inputs(shape), torch.arange(B) % 3, b=b, clipping="fixed", grad_mode=grad_mode, fallback="error"
    )
    assert max(errors.values()) < TOL, errors


# --------------------------------------------------------------------- rule functions vs autograd
def _layers_of(model):
    return [m for m in model.modules() if rule_for(m) is not None and not isinstance(m, (nn.Linear, nn.Conv2d))]


def _layer_inputs(model, x):
    """Capture each rule layer's positional inputs during one forward."""
    seen = {}

    def keep(module, args, output):
        seen.setdefault(module, args)  # returns None: the output stays as it is

    handles = [m.register_forward_hook(keep) for m in _layers_of(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("source,case", ALL_CASES)
def test_rule_functions_match_autograd_keyed_groups(source, case):
    factory, shape = _case(source, case)
    torch.manual_seed(0)
    model = factory().double()
    captured = _layer_inputs(model, _inputs(shape))
    assert captured, "the case has no layer with a new rule"
    groups = grouping.keyed_groups(B, 4, torch.Generator().manual_seed(5))  # ragged, may have an empty group
    # Gemma-style norms compute in float32 whatever the input dtype: autograd sums their products in float32.
    tol = {"rtol": 1e-6, "atol": 1e-9} if case.startswith("hf_gemma") else {"rtol": 1e-9, "atol": 1e-12}
    for layer, args in captured.items():
        rule = rule_for(layer)
        out_grad = torch.randn_like(layer(*args))
        got = rule.group_grads(layer, args, out_grad, groups)
        params = dict(layer.named_parameters(recurse=False))
        for j in range(groups.num_groups):
            rows = (groups.index == j).nonzero().flatten()
            grads = {n: torch.zeros_like(p) for n, p in params.items()}
            if rows.numel():
                loss = (layer(*(a[rows] for a in args)) * out_grad[rows]).sum()
                want = torch.autograd.grad(loss, list(params.values()))
                grads = dict(zip(params, want))
            for n in params:
                torch.testing.assert_close(got[n][j], grads[n], **tol)
        if rule.group_sq_norms is not None:
            sq = rule.group_sq_norms(layer, args, out_grad, groups)
            for n in params:
                torch.testing.assert_close(squared_norm(sq[n]), got[n].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
        if rule.weighted_sum is not None:
            w = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
            ws = rule.weighted_sum(layer, args, out_grad, {n: w for n in params})
            per_example = rule.group_grads(layer, args, out_grad, grouping.contiguous_groups(B, 1))
            for n in params:
                torch.testing.assert_close(ws[n], torch.einsum("b,b...->...", w, per_example[n]), rtol=1e-9, atol=1e-12)
        if rule.group_grad_elements is not None:
            assert rule.group_grad_elements(layer, args, out_grad, groups) >= groups.num_groups * layer.weight.numel()


CONV_TRANSPOSE_SHAPES = {
    "1d-output-padding": (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, padding=1, output_padding=1), (B, 3, 7)),
    "1d-output-padding-over-stride": (lambda: nn.ConvTranspose1d(2, 3, 3, dilation=2, output_padding=1), (B, 2, 6)),
    "2d-groups-dilation": (lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), groups=2,
                                                      dilation=(1, 2)), (B, 4, 5, 4)),
    "2d-stride3-no-bias": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=3, output_padding=2, bias=False), (B, 2, 4, 4)),
    "3d": (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, padding=1), (B, 2, 3, 4, 3)),
}


@pytest.mark.parametrize("case", list(CONV_TRANSPOSE_SHAPES))
def test_conv_transpose_both_layouts_match_autograd(case):
    """Both conv layouts, forced, on the shapes where the adjoint's indexing differs most (the engine picks one)."""
    from dp_microclip.layers.conv_transpose import conv_transpose_group_grads

    make, shape = CONV_TRANSPOSE_SHAPES[case]
    torch.manual_seed(0)
    layer = make().double()
    x = _inputs(shape)
    out_grad = torch.randn_like(layer(x))
    groups = grouping.keyed_groups(B, 3, torch.Generator().manual_seed(1))
    layouts = ["grouped", "forward"] if layer.groups == 1 else ["grouped"]
    got = {name: conv_transpose_group_grads(layer, (x,), out_grad, groups, implementation=name) for name in layouts}
    for j in range(groups.num_groups):
        rows = (groups.index == j).nonzero().flatten()
        params = dict(layer.named_parameters())
        want = {n: torch.zeros_like(p) for n, p in params.items()}
        if rows.numel():
            loss = (layer(x[rows]) * out_grad[rows]).sum()
            want = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        for grads in got.values():
            for n in params:
                torch.testing.assert_close(grads[n][j], want[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32)])
@pytest.mark.parametrize("case", ["hf_llama_rms", "hf_t5_layer_norm", "hf_olmo2_rms", "hf_gemma_rms",
                                  "hf_gemma3n_rms"])
def test_hf_norm_casts_match_autograd(case, x_dtype, w_dtype):
    """Mixed precision: the rule recomputes h with the forward's own casts, so its gradient is autograd's."""
    factory, _ = _case("hf", case)
    norm = factory()[1].to(w_dtype)
    x = torch.randn(B, T, 6, generator=torch.Generator().manual_seed(0)).to(x_dtype)
    out = norm(x)
    out_grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    groups = grouping.contiguous_groups(B, 2)
    got = rule_for(norm).group_grads(norm, (x,), out_grad, groups)["weight"]
    assert got.dtype == norm.weight.dtype
    tol = {"rtol": 2e-2, "atol": 2e-2} if torch.bfloat16 in (x_dtype, w_dtype) else {"rtol": 1e-5, "atol": 1e-5}
    for j in range(groups.num_groups):
        rows = slice(2 * j, 2 * j + 2)
        (want,) = torch.autograd.grad((norm(x[rows]) * out_grad[rows]).sum(), [norm.weight])
        torch.testing.assert_close(got[j], want, **tol)


# ------------------------------------------------------------------- HF families: forward unchanged
def _transformers_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("transformers is not installed")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _forward_source(model_dir: str, name: str) -> str | None:
    path = _transformers_dir() / "models" / model_dir / f"modeling_{model_dir}.py"
    if not path.exists():
        return None
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            methods = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name in ("forward", "_norm")]
            for m in methods:  # type hints and docstrings do not change the maths
                m.returns = None
                for arg in m.args.args:
                    arg.annotation = None
                if m.body and isinstance(m.body[0], ast.Expr) and isinstance(m.body[0].value, ast.Constant):
                    m.body = m.body[1:]
            return "\n".join(ast.unparse(m) for m in methods)
    return None


@pytest.mark.parametrize("family", list(HF_RMS_FAMILIES))
def test_hf_norm_family_members_share_the_forward(family):
    """Every class registered for a family computes what its tested first member computes (same source)."""
    _, members = HF_RMS_FAMILIES[family]
    items = [(d, n) for d, names in members.items() for n in names]
    reference = _forward_source(*items[0])
    assert reference, f"{items[0]} not found in the installed transformers"
    missing = []
    for model_dir, name in items[1:]:
        source = _forward_source(model_dir, name)
        if source is None:
            missing.append(name)  # not in this release: its lazy rule simply never matches
            continue
        assert source == reference, f"{name} no longer computes what {items[0][1]} computes:\n{source}"
    assert len(missing) < len(items) // 2 + 1, f"most of the {family} family is missing: {missing}"


def test_lazy_rules_resolve_on_real_classes():
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    assert rule_for(Conv1D(3, 4)).has_ghost
    assert rule_for(LlamaRMSNorm(4)) is not None
    tn = _timm_norm()
    assert set(TIMM_NORM_RULES) <= {n for n in dir(tn)}
    assert rule_for(tn.LayerNorm2d(4)) is not None


def test_import_does_not_import_third_party_libraries():
    code = ("import sys, dp_microclip; bad = [m for m in ('transformers', 'timm') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])


# -------------------------------------------------------------------------------------- registry
@pytest.fixture
def clean_registry():
    """Restore the registry after a test that registers rules."""
    rules, lazy = dict(registry._RULES), dict(registry._LAZY)
    yield
    registry._RULES.clear()
    registry._RULES.update(rules)
    registry._LAZY.clear()
    registry._LAZY.update(lazy)
    registry._RESOLVED.clear()


class PlainLayerNorm(nn.LayerNorm):
    """Changes only __init__: computes what nn.LayerNorm computes."""

    def __init__(self, n):
        super().__init__(n, eps=1e-4)


class ScaledLayerNorm(nn.LayerNorm):
    """Overrides forward: computes something else."""

    def forward(self, x):
        return 2 * super().forward(x)


class StandardisedConv(nn.Conv2d):
    """Keeps forward but overrides the method it calls: computes something else."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight - weight.mean(), bias)


class ResetOnlyLinear(nn.Linear):
    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def test_subclass_without_forward_override_uses_the_base_rule():
    assert rule_for(PlainLayerNorm(4)) is rule_for_type(nn.LayerNorm)
    assert rule_for(ResetOnlyLinear(2, 3)) is rule_for_type(nn.Linear)
    assert rule_for(ScaledLayerNorm(4)) is None
    assert rule_for(StandardisedConv(1, 2, 3)) is None
    assert rule_for(type("Deeper", (PlainLayerNorm,), {})(4)) is rule_for_type(nn.LayerNorm)
    assert rule_for(type("BelowOverride", (ScaledLayerNorm,), {})(4)) is None


@pytest.mark.parametrize("b", [1, 3])
def test_subclass_equals_naive_loop_with_the_base_rule(b):
    def factory():
        return nn.Sequential(nn.Linear(6, 6), _randomise(PlainLayerNorm(6)), MeanOver(1), nn.Linear(6, 3))

    errors, _ = compare_with_naive(factory, _inputs((B, T, 6)), torch.arange(B) % 3, b=b, clipping="fixed",
                                   fallback="error")
    assert max(errors.values()) < TOL, errors


def test_subclass_overriding_forward_takes_the_generic_path():
    def factory():
        return nn.Sequential(nn.Linear(6, 6), ScaledLayerNorm(6), MeanOver(1), nn.Linear(6, 3))

    errors, engine = compare_with_naive(factory, _inputs((B, T, 6)), torch.arange(B) % 3, b=2, clipping="fixed",
                                        fallback="generic")
    assert max(errors.values()) < TOL, errors
    assert "generic" in engine.summary()


def _dummy_rule():
    return LayerRule(lambda layer, inputs, out_grad, groups: {})


def test_register_rule_refuses_duplicates_and_replaces(clean_registry):
    class Fresh(nn.Module):
        pass

    first, second = _dummy_rule(), _dummy_rule()
    register_rule(Fresh, first)
    with pytest.raises(ValueError, match="replace=True"):
        register_rule(Fresh, second)
    assert rule_for(Fresh()) is first
    register_rule(Fresh, second, replace=True)
    assert rule_for(Fresh()) is second  # the lookup cache was cleared
    with pytest.raises(ValueError, match="replace=True"):
        register_rule(nn.Linear, first)
    with pytest.raises(TypeError, match="type\\(module\\)"):
        register_rule(nn.Linear(1, 1), first)


def test_registering_a_subclass_overrides_the_inherited_rule(clean_registry):
    own = _dummy_rule()
    assert rule_for(PlainLayerNorm(3)) is rule_for_type(nn.LayerNorm)
    register_rule(PlainLayerNorm, own)
    assert rule_for(PlainLayerNorm(3)) is own
    register_rule(ScaledLayerNorm, own)  # a rule for an overriding subclass is the user's call
    assert rule_for(ScaledLayerNorm(3)) is own


def _library_class(module_path, name, base=nn.Module, body=None):
    """A class that looks as if defined in a third-party module (no such module needs to exist)."""
    return type(name, (base,), {"__module__": module_path, "__qualname__": name, **(body or {})})


def test_lazy_rule_matches_by_module_path_and_name(clean_registry):
    Layer = _library_class("fake_lib.layers", "Scale", body={"forward": lambda self, x: x})
    Other = _library_class("other_lib.layers", "Scale", body={"forward": lambda self, x: x})
    rule = _dummy_rule()
    register_lazy_rule("fake_lib.layers", "Scale", rule)
    assert ("fake_lib.layers", "Scale") in registry.registered_lazy_names()
    assert rule_for(Layer()) is rule
    assert rule_for(Other()) is None  # same name, other library
    assert rule_for(type("Sub", (Layer,), {})()) is rule  # unchanged subclass
    assert rule_for(type("Sub2", (Layer,), {"forward": lambda self, x: 2 * x})()) is None
    with pytest.raises(ValueError, match="replace=True"):
        register_lazy_rule("fake_lib.layers", "Scale", _dummy_rule())
    with pytest.raises(ValueError, match="replace=True"):
        register_rule(Layer, _dummy_rule())  # the name already has a (lazy) rule
    concrete = _dummy_rule()
    register_rule(Layer, concrete, replace=True)
    assert rule_for(Layer()) is concrete
    with pytest.raises(ValueError, match="replace=True"):
        register_lazy_rule("fake_lib.layers", "Scale", rule)  # a concrete class of that name has one
    register_lazy_rule("fake_lib.layers", "Scale", rule, replace=True)
    assert rule_for(Layer()) is rule


def test_lazy_rule_drives_the_engine(clean_registry):
    """End to end: a 'third-party' layer with a lazily registered rule, against the naive loop."""

    def scale_forward(self, x):
        return torch.tanh(x * self.w)

    def init(self, n):
        nn.Module.__init__(self)
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    Scale = _library_class("fake_lib.layers", "Scale", body={"forward": scale_forward, "__init__": init})

    def group_grads(layer, inputs, out_grad, groups):
        x = inputs[0]
        y = torch.tanh(x * layer.w)
        per_example = (out_grad * (1 - y * y) * x).reshape(x.shape[0], -1, x.shape[-1]).sum(1)
        return {"w": groups.sum(per_example)}

    register_lazy_rule("fake_lib.layers", "Scale", LayerRule(group_grads))
    errors, _ = compare_with_naive(lambda: nn.Sequential(nn.Linear(6, 5), Scale(5), nn.Linear(5, 3)),
                                   _inputs((B, 6)), torch.arange(B) % 3, b=2, clipping="fixed", fallback="error")
    assert max(errors.values()) < TOL, errors
