"""Which modules the engine hooks, which path each takes, and which the engine refuses.

``find_units`` walks the model once, before any hook is installed. It collects
every problem of the model and reports them all at once (as Opacus'
``ModuleValidator.validate`` does), so a user fixes a model in one round trip,
not one error at a time. The engine receives the units; it never discovers
modules itself.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .errors import ConfigurationError, UnsupportedModuleError
from .records import Unit
from .layers.attention import attention_problems
from .layers.registry import rule_for
from .layers.rnn import is_captured_rnn
from .layers.traits import INDEPENDENT_WITHOUT_RULE, MIXES_EXAMPLES
from .layers.validators import module_problems
from .layout import declared_batch_dim

_ATTENTION_PARAMS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "q_proj_weight",
                     "k_proj_weight", "v_proj_weight", "bias_k", "bias_v")


def _has_param(module: nn.Module, dotted: str) -> bool:
    try:
        return module.get_parameter(dotted) is not None
    except AttributeError:
        return False


def _is_parametrization(path: str) -> bool:
    # torch.nn.utils.parametrize keeps the original tensors in "<module>.parametrizations.<name>.original*".
    return ".parametrizations." in f".{path}." or path.startswith("parametrizations.")


def _owner_path(path: str) -> str:
    return path.split(".parametrizations.")[0] if ".parametrizations." in f".{path}" else ""


def _handled_parametrization(model: nn.Module, path: str) -> bool:
    """A parametrization of a layer with a rule: the engine chains the rule's weight gradient through it."""
    owner_path = _owner_path(path) if not path.startswith("parametrizations.") else ""
    owner = model.get_submodule(owner_path) if owner_path else model
    return rule_for(owner) is not None


def _parametrized_tensors(module: nn.Module) -> dict:
    """``{tensor name: ParametrizationList}`` of a module parametrized with torch.nn.utils.parametrize."""
    lists = getattr(module, "parametrizations", None)
    return dict(lists.items()) if isinstance(lists, nn.ModuleDict) else {}


def parametrization_problems(model: nn.Module) -> list[str]:
    """Trainable tensors of a parametrization the engine cannot carry its gradient back through."""
    problems = []
    for path, module in model.named_modules():
        if _is_parametrization(path) and any(p.requires_grad for p in module.parameters(recurse=False)) \
                and not _handled_parametrization(model, path):
            problems.append(
                f"{path or '<root module>'} holds trainable tensors of a torch.nn.utils.parametrize "
                "parametrization (e.g. weight norm) on a module without a rule; the parametrized weight has no "
                "batch dimension, so per-example gradients of its original tensors need the chain rule through "
                "the parametrization, which dp_microclip does only for modules with a rule. Remove it "
                "(torch.nn.utils.parametrize.remove_parametrizations(module, name)) or freeze those tensors "
                "before attach()."
            )
    return problems


def find_units(
    model: nn.Module, *, dp: bool, fallback: str | None, root_batch_dim: int, warn: Callable[[str, str], None],
) -> list[Unit]:
    """The hooked units of ``model``: (module, the trainable parameters it owns, the path they take).

    Raises:
        UnsupportedModuleError: listing every module that cannot be handled, each with its fix.
    """
    problems = module_problems(model, dp=dp) + parametrization_problems(model)
    units: list[Unit] = []
    skip_paths: set[str] = set()
    for path, module in model.named_modules():
        if path in skip_paths:
            continue
        where = path or "<root module>"
        batch_dim = declared_batch_dim(model, path, root_batch_dim)
        if isinstance(module, nn.MultiheadAttention):
            owned = {n: module.get_parameter(n) for n in _ATTENTION_PARAMS if _has_param(module, n)}
            owned = {n: p for n, p in owned.items() if p.requires_grad}
            skip_paths.add(f"{path}.out_proj" if path else "out_proj")
            if owned and attention_problems(module, where):
                # Separate q/k/v weights (kdim/vdim), a learned key/value bias: the usage route, which splits
                # torch's attention call into its projections (layers/usage_mode.py), takes it.
                units.append(Unit(path, module, "functional", None, owned, batch_dim, generic_allowed=not (
                    fallback == "error" or (dp and fallback != "generic"))))
            elif owned:
                units.append(Unit(path, module, "attention", None, owned, batch_dim))
            continue
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if _is_parametrization(path):
            continue
        has_parametrized = any(p.requires_grad for pl in _parametrized_tensors(module).values()
                               for p in pl.parameters())
        if own and not has_parametrized and is_captured_rnn(module):
            units.append(Unit(path, module, "rnn", None, own, batch_dim))  # layers/rnn.py: Linear records
            continue
        if not own and not has_parametrized:
            continue
        if isinstance(module, MIXES_EXAMPLES) and not dp:
            warn(
                f"bn:{path}",
                f"{where} is nn.{type(module).__name__}: its statistics cover the whole batch, so micro-batches "
                "are not independent and the result differs from clipping each micro-batch on its own. "
                "Consider nn.GroupNorm.",
            )
        rule = rule_for(module)
        parametrized = _parametrized_tensors(module)
        if rule is not None and parametrized:
            # Weight norm and other parametrizations: the rule gives each group's gradient of the computed
            # tensor; the engine carries it back to the original tensors (aggregate.chain_parametrizations).
            for tensor, plist in parametrized.items():
                for name, p in plist.named_parameters():
                    if p.requires_grad:
                        own[f"parametrizations.{tensor}.{name}"] = p
        if rule is not None:
            units.append(Unit(path, module, "rule", rule, own, batch_dim,
                              {t: pl for t, pl in parametrized.items()} if parametrized else {}))
            continue
        # Modules known to treat examples independently (RNNs) may take the exact generic path in DP mode too.
        independent = isinstance(module, INDEPENDENT_WITHOUT_RULE)
        generic_allowed = not (fallback == "error" or (dp and fallback != "generic" and not independent))
        if not parametrized and not independent:
            # The usage route (usage.py): parameters used through recognised functions get rule maths, whatever
            # the module's class; a forward where that is not so goes generic, or is refused by name, then.
            units.append(Unit(path, module, "functional", None, own, batch_dim, generic_allowed=generic_allowed))
            continue
        if not generic_allowed:
            reason = " In DP mode the generic path must be allowed explicitly." if dp else ""
            problems.append(
                f"{where} ({type(module).__name__}) has trainable parameters {sorted(own)} and no dp_microclip "
                f"rule.{reason} Register a rule with dp_microclip.register_rule(...), or pass "
                'fallback="generic" to use torch.func per micro-batch (exact only if the module treats examples '
                "independently)."
            )
            continue
        warn(
            f"generic:{path}",
            f"{where} ({type(module).__name__}) has no rule: its parameters {sorted(own)} use the generic "
            "torch.func path (slower; exact only if the module treats examples independently).",
        )
        units.append(Unit(path, module, "generic", None, own, batch_dim))
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise UnsupportedModuleError(
            f"dp_microclip cannot attach to this model ({len(problems)} problem(s)):\n{listing}"
        )
    return units


def managed_parameters(units: list[Unit]) -> list[nn.Parameter]:
    """Every trainable parameter the units own, each once (tied weights appear in several units)."""
    seen, managed = set(), []
    for unit in units:
        for p in unit.params.values():
            if id(p) not in seen:
                seen.add(id(p))
                managed.append(p)
    return managed


def check_optimizer_parameters(optimizer, managed_ids: set[int], names: dict[int, str]) -> None:
    """Every parameter the optimizer may update is managed by the engine, or this raises naming it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in managed_ids:
                continue
            if p.requires_grad or p.grad is not None:
                name = names.get(id(p))
                what = f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)} not in the model"
                raise ConfigurationError(
                    f"The optimizer updates {what}, which the engine does not clip (it was frozen at attach(), "
                    "added later with optimizer.add_param_group, or belongs to another model): its gradient "
                    "would be the raw, unclipped and un-noised one. Decide which parameters train before "
                    "attach(), or detach() and attach() again after changing them."
                )


def summarize(units: list[Unit], header: str) -> str:
    """``engine.summary()``: one line per hooked unit (path, type, route, parameters), then the generic ones."""
    route = {"rule": "rule", "attention": "attention capture + Linear rule", "rnn": "RNN capture + Linear rule",
             "functional": "usage route (rules by function; else generic torch.func)", "generic": "generic torch.func"}
    lines = [header]
    for unit in units:
        lines.append(f"  {unit.path or '<root>'}: {type(unit.module).__name__} -> {route[unit.kind]} "
                     f"[{', '.join(unit.params)}]")
    generic = [u.path or "<root>" for u in units if u.kind == "generic"]
    if generic:
        lines.append("  generic torch.func path (exact only if the module treats examples independently): "
                     + ", ".join(generic))
    return "\n".join(lines)
