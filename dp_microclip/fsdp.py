"""FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``dp_microclip.distributed.attach``.

Where the per-micro-batch norms live. Under FSDP2 every rank holds one shard
(rows ``Shard(0)``) of each parameter, a ``DTensor``; before a module's forward
and again before its backward FSDP all-gathers the full parameter into a plain
"unsharded" ``nn.Parameter`` and sets it on the module. The engine's hooks
therefore see, on every rank, the layer's full inputs and full output gradients
for that rank's own examples: the group gradients (of the full, unsharded
shape), their norms and the clipped sum are computed locally exactly as on one
process, and no rule ever needs the weight's values. So:

* each rank computes its clipped sum at the full shape (the engine's normal
  path; no per-shard norm could be right, since a norm needs every coordinate);
* ``distributed.StepReducer`` adds the ranks' sums (one all-reduce per dtype:
  every rank then holds the global clipped sum), the engine adds the noise,
  ONE full-shape draw from generators seeded identically on every rank, as in
  data-parallel training;
* :class:`ShardedGrads` (the engine's ``ProcessParts.placement``) keeps each
  rank's own rows of that full gradient as ``p.grad``, a ``DTensor`` with the
  parameter's placement: each shard's noise is exactly its slice of the one
  global draw, never a second draw, and 2 ranks equal 1 process, noise included.

FSDP's own reduce-scatter is not used: it runs per module during backward,
before the clip factors (which need every layer's norms) are known, and it
would average unclipped gradients. After the first (checked) step the engine
switches ``requires_grad`` off on the sharded parameters, FSDP copies the flag
to the unsharded ones, and FSDP computes no gradient and reduce-scatters
nothing. During the checked steps :meth:`ShardedGrads.leaf` gives the
first-step check the unsharded parameter (the tensor autograd really
differentiates), so the check compares real gradients.

Memory: parameters, ``p.grad`` and optimizer state are 1/world per rank; the
step holds one transient full-size clipped sum (and, in DP mode, one full-size
noise buffer) per rank, freed when the step ends.

Refused (the error says why): meshes with more than one dimension (HSDP,
FSDP with tensor parallelism), placements other than ``Shard(0)``, a
``MixedPrecisionPolicy`` that changes the parameters' dtype, CPU offload (the
unsharded parameter on another device), modules with sharded parameters whose
rule is not verified under FSDP2 (:data:`SUPPORTED`). See docs/distributed.md, "FSDP2".
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigurationError

__all__ = ["ShardedGrads", "SUPPORTED", "is_sharded", "is_sharded_tensor", "reshard_all"]

#: Module types whose rules read only activations, output gradients and the weight's shape and dtype (never
#: its values, which FSDP has resharded by the time the engine clips), tested under FSDP2 in
#: tests/test_fsdp.py. Any other module that owns a sharded parameter is refused.
SUPPORTED: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.Embedding,
                                          nn.Conv1d, nn.Conv2d)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism)."""
    return any(is_sharded_tensor(p) for p in model.parameters())


def is_sharded_tensor(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (its storage on this rank holds only a shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def reshard_all(model: nn.Module) -> None:
    """Shard again the parameters a forward with ``reshard_after_forward=False`` left gathered (no communication):
    the engine must manage the sharded parameters, those the optimizer holds."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


class _Leaf:
    """The unsharded parameter standing for a sharded one in autograd's graph (takes its tensor hooks)."""

    def __init__(self, unsharded: nn.Parameter):
        self.unsharded = unsharded

    def register_hook(self, hook):
        """Hook the unsharded parameter's gradient (this rank's examples, full shape)."""
        return self.unsharded.register_hook(hook)

    def register_post_accumulate_grad_hook(self, hook):
        """Hook the unsharded parameter after its gradient accumulated (before FSDP reduce-scatters it)."""
        return self.unsharded.register_post_accumulate_grad_hook(hook)


class ShardedGrads:
    """The engine's ``ProcessParts.placement`` for FSDP2: full-shape gradients in, this rank's shard out.

    Built by :func:`dp_microclip.distributed.attach` when the model has ``DTensor``
    parameters. At construction it checks the sharding (1-D mesh, ``Shard(0)``,
    supported module types), then unshards every FSDP module once (FSDP's public
    ``unshard()``, an all-gather on every rank) to find each sharded parameter's
    unsharded stand-in, checks that it has the sharded parameter's dtype and
    device (no mixed precision, no CPU offload), and reshards.
    """

    def __init__(self, model: nn.Module):
        from torch.distributed.fsdp import FSDPModule

        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if not fsdp_modules:
            raise ConfigurationError(
                "The model has DTensor parameters but no module was sharded with "
                "torch.distributed.fsdp.fully_shard: tensor parallelism alone is not supported. Shard with "
                "fully_shard, or attach to a model with plain parameters."
            )
        reshard_all(model)
        pending = {id(owner[3]): owner for owner in _sharded_owners(model)}  # id(p) -> (name, module, local, p)
        self._leaves: dict[int, _Leaf] = {}
        for m in fsdp_modules:  # one FSDP group gathered at a time (an all-gather, in the same order on every rank)
            m.unshard()
            try:
                for key, (name, module, local, p) in list(pending.items()):
                    unsharded = dict(module.named_parameters(recurse=False)).get(local)
                    if unsharded is not None and not is_sharded_tensor(unsharded):
                        _check_unsharded(name, p, unsharded)
                        self._leaves[key] = _Leaf(unsharded)
                        del pending[key]
            finally:
                m.reshard()
        if pending:
            name = next(iter(pending.values()))[0]
            raise ConfigurationError(
                f"parameter {name!r} is sharded but no fully_shard-ed module above it gathers it: shard it with "
                "fully_shard (on its module or an ancestor), or leave it unsharded."
            )

    def leaf(self, p: nn.Parameter):
        """The unsharded parameter for a sharded ``p`` (whose own hooks never fire under FSDP), else ``p``."""
        return self._leaves.get(id(p), p)

    def to_grad(self, p: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the full-shape gradient, as a ``DTensor`` with ``p``'s placement (a copy: the
        full tensor is freed after the step)."""
        from torch.distributed.tensor import DTensor

        if not isinstance(p, DTensor):
            return full
        mesh = p.device_mesh
        rows = torch.chunk(full, mesh.size(), dim=0)  # FSDP2's and DTensor's Shard(0) split
        rank = mesh.get_local_rank()
        local = rows[rank].clone() if rank < len(rows) else full.new_empty((0, *full.shape[1:]))
        expected = p.to_local().shape
        if local.shape != expected:
            raise ConfigurationError(
                f"FSDP2 shard of shape {tuple(expected)} does not match the rows this rank takes of the full "
                f"gradient {tuple(local.shape)}: a sharding other than torch.chunk along dim 0 is not supported."
            )
        return DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _sharded_owners(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
    """``(full name, owning module, local name, parameter)`` of every DTensor parameter, after checking its
    placement and its module type."""
    from torch.distributed.tensor import Shard

    out = []
    for mod_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{local}" if mod_name else local
            if not is_sharded_tensor(p):
                continue
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ConfigurationError(
                    f"parameter {name!r} is sharded as {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; "
                    "only FSDP2's plain sharding (Shard(0) on a 1-D mesh) is supported, not HSDP or tensor "
                    "parallelism: the engine writes each rank's rows of one full gradient. Use fully_shard "
                    "with a 1-D mesh."
                )
            if _unwrapped_type(module) not in SUPPORTED:
                raise ConfigurationError(
                    f"{mod_name or '<root module>'} ({_unwrapped_type(module).__name__}) owns the sharded parameter "
                    f"{name!r}: its rule is not verified under FSDP2 (at the end of backward FSDP has "
                    "resharded the weight, and rules that read its values or run the module again would see "
                    f"a DTensor). Supported: {', '.join(t.__name__ for t in SUPPORTED)}. Leave this module's "
                    "parameters unsharded (fully_shard the supported layers only) or drop FSDP."
                )
            out.append((name, module, local, p))
    return out


def _unwrapped_type(module: nn.Module) -> type:
    """The module's own class: ``fully_shard`` swaps it for a subclass ``FSDP<Class>(FSDPModule, Class)``."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        cls = next((b for b in cls.__bases__ if b is not FSDPModule), cls)
    return cls


def _check_unsharded(name: str, p: nn.Parameter, unsharded: torch.Tensor) -> None:
    """Refuse mixed precision and CPU offload: the unsharded parameter must match the sharded one."""
    if unsharded.dtype != p.dtype:
        raise ConfigurationError(
            f"parameter {name!r} is stored as {p.dtype} but FSDP computes with {unsharded.dtype} (a "
            "MixedPrecisionPolicy with param_dtype): the engine would take per-micro-batch norms at the low "
            "precision, where rounding can let a clipped contribution exceed the bound the noise is sized for. "
            "Not supported: fully_shard without mp_policy (or with param_dtype=None), or cast the model itself."
        )
    if unsharded.device != p.device:
        raise ConfigurationError(
            f"parameter {name!r} lives on {p.device} but FSDP gathers it to {unsharded.device} (CPU "
            "offload): not supported (the engine writes p.grad at the compute device's full gradient). "
            "Use fully_shard without offload_policy."
        )
    if unsharded.shape != p.shape:
        raise ConfigurationError(
            f"parameter {name!r}: FSDP's unsharded parameter has shape {tuple(unsharded.shape)}, the sharded "
            f"one {tuple(p.shape)}; not supported."
        )
