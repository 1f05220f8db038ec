"""Per-type refusals, registered like rules: what a layer type cannot do exactly (or privately).

A validator is ``(module, where, dp) -> list[str]``: one message per problem,
each naming the module path and the fix. ``attach`` runs every validator that
matches a module (by ``isinstance``, so subclasses are covered) and reports all
problems of the model at once, before any hook is installed (as Opacus'
``ModuleValidator.validate`` does), so a model is fixed in one round trip.

The built-in validators refuse what would break exactness or privacy:

* batch statistics (BatchNorm) and tracked running statistics (InstanceNorm) in
  DP mode: they mix examples and store un-noised averages in ``state_dict()``;
* ``Embedding(max_norm=...)`` (or ``EmbeddingBag``) in DP mode: its forward renormalises every
  looked-up row *in place*, so the released weights show which tokens were in
  the sampled batches, with no noise;
* sparse or frequency-scaled embeddings and embedding bags (sparse gradients;
  frequencies over the whole batch mix examples);
* weights computed by a forward pre-hook (the deprecated ``torch.nn.utils.weight_norm`` /
  ``spectral_norm``; their parametrization versions are chained through).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .traits import MIXES_EXAMPLES

#: ``(module, where, dp) -> problems``; ``module`` is an instance of the types the validator is registered for.
Validator = Callable[[Any, str, bool], list[str]]

_VALIDATORS: list[tuple[type | tuple[type, ...], Validator]] = []


def register_validator(layer_types: type | tuple[type, ...], validator: Validator) -> None:
    """Run ``validator`` on every module that is an instance of ``layer_types`` at ``attach``."""
    _VALIDATORS.append((layer_types, validator))


def module_problems(model: nn.Module, *, dp: bool) -> list[str]:
    """Every problem any registered validator finds in ``model`` (each message names the module and the fix)."""
    problems: list[str] = []
    for path, module in model.named_modules():
        where = path or "<root module>"
        for layer_types, validator in _VALIDATORS:
            if isinstance(module, layer_types):
                problems += validator(module, where, dp)
    return problems


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _batch_statistics(module: nn.Module, where: str, dp: bool) -> list[str]:
    if not dp:
        return []
    return [
        f"{where} is nn.{type(module).__name__}, which mixes examples across micro-batches (its "
        "statistics cover the whole batch) and stores un-noised batch statistics (running_mean, "
        "running_var) in model.state_dict(). Replace it with nn.GroupNorm "
        "(opacus.validators.ModuleValidator.fix(model) does this) before attach()."
    ]


def _tracked_instance_norm(module: nn.Module, where: str, dp: bool) -> list[str]:
    if not (dp and getattr(module, "track_running_stats", False)):
        return []
    return [
        f"{where} is nn.{type(module).__name__} with track_running_stats=True: its running statistics "
        "are un-noised averages over the private data, saved in model.state_dict(). Create it with "
        "track_running_stats=False."
    ]


def _embedding(module: nn.Module, where: str, dp: bool) -> list[str]:
    problems = []
    if (module.sparse or module.scale_grad_by_freq) and _trains(module):
        problems.append(
            f"{where} is nn.{type(module).__name__} with sparse=True or scale_grad_by_freq=True; the first gives "
            "sparse gradients, the second mixes examples (frequencies over the whole batch). "
            "Create it with sparse=False, scale_grad_by_freq=False."
        )
    if dp and module.max_norm is not None:
        problems.append(
            f"{where} is nn.{type(module).__name__} with max_norm={module.max_norm}: its forward renormalises every "
            "looked-up row in place, so the released weights show which tokens were in each sampled batch, without "
            "noise. Create it with max_norm=None (clip or normalise the looked-up vectors in forward instead, e.g. "
            "F.normalize(emb(ids), dim=-1) * max_norm, which does not write to the weight)."
        )
    return problems


def _weight_hooks(module: nn.Module, where: str, dp: bool) -> list[str]:
    hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]
    if not hooks or not _trains(module):
        return []
    names = ", ".join(f"{h.name} ({type(h).__name__})" for h in hooks)
    return [
        f"{where} computes {names} from other tensors in a forward pre-hook (the deprecated "
        "torch.nn.utils.weight_norm / spectral_norm): the engine's gradient of the computed tensor cannot be "
        "carried back to the tensors it is made of. Use the parametrizations instead (remove_weight_norm / "
        "remove_spectral_norm, then torch.nn.utils.parametrizations.weight_norm / spectral_norm), which the "
        "engine chains through."
    ]


register_validator(MIXES_EXAMPLES, _batch_statistics)
register_validator(nn.modules.instancenorm._InstanceNorm, _tracked_instance_norm)
register_validator((nn.Embedding, nn.EmbeddingBag), _embedding)
register_validator(nn.Module, _weight_hooks)
