"""Every rank of a process group attaches with the same settings, or all of them refuse (``distributed.attach``).

Ranks that disagree (another model, another optimizer setting, another attach argument) would silently train
different models; one all-gather of a hash, then of the descriptions to name what differs, finds it before any
hook is installed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch
from torch import nn

from . import __version__
from .errors import ConfigurationError


def _canonical(value):
    """A JSON-able description of an argument, the same on every rank for equal values."""
    if torch.is_tensor(value):
        return {"tensor": value.detach().cpu().tolist(), "dtype": str(value.dtype)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return repr(value)


def _settings_description(model: nn.Module, optimizer: torch.optim.Optimizer, per_core: bool,
                         attach_kwargs: Mapping, world_size: int) -> dict:
    """What must be equal on every rank: attach's arguments, the model's layout, the optimizer's settings.

    Devices are left out (each rank has its own GPU); parameter values too (they are broadcast).
    """
    return {
        "versions": f"dp_microclip {__version__}, torch {torch.__version__}",
        "world_size": world_size,
        "per_core": per_core,
        "attach": _canonical(dict(attach_kwargs)),
        "model": type(model).__qualname__,
        "parameters": [[n, list(p.shape), str(p.dtype), p.requires_grad] for n, p in model.named_parameters()],
        "buffers": [[n, list(b.shape), str(b.dtype)] for n, b in model.named_buffers()],
        "optimizer": type(optimizer).__qualname__,
        "param_groups": [
            {**_canonical({k: v for k, v in g.items() if k != "params"}), "num_params": len(g["params"])}
            for g in optimizer.param_groups
        ],
    }


def check_same_settings(model, optimizer, per_core, attach_kwargs, group) -> None:
    """Raise on every rank when the ranks' settings differ (compared by hash, then diffed by key)."""
    import torch.distributed as dist
    world = dist.get_world_size(group)
    mine = _settings_description(model, optimizer, per_core, attach_kwargs, world)
    digest = hashlib.sha256(json.dumps(mine, sort_keys=True).encode()).hexdigest()
    digests = [None] * world
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) == 1:
        return
    everyone: list = [None] * world  # all_gather_object puts each rank's description in its slot
    dist.all_gather_object(everyone, mine, group=group)
    differ = sorted(k for k in mine if any(d.get(k) != everyone[0].get(k) for d in everyone))
    details = "; ".join(f"{k}: " + " vs ".join(f"rank {r}: {json.dumps(d.get(k))[:200]}"
                                               for r, d in enumerate(everyone)) for k in differ)
    raise ConfigurationError(
        f"dp_microclip.distributed.attach: the ranks disagree on {differ} ({details}). Every rank must build the "
        "same model and optimizer and call attach with the same arguments (a seed, if given, included)."
    )
