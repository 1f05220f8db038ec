"""Micro-batch clipping on several processes with ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Why not ``DistributedDataParallel``: DDP's reducer averages ``p.grad`` from
autograd hooks on the parameters, but the engine switches the parameters'
``requires_grad`` off (so autograd never computes the unclipped gradients it
would throw away) and writes ``p.grad`` itself in an optimizer step pre-hook.
Under DDP the reducer would see no gradient at all. The engine instead combines
its *clipped* results across ranks at the step, through the
reducer this module plugs into the engine at construction
(``engine.ProcessParts``), before any noise is added:

* every rank clips its own micro-batches (the clipping unit never spans ranks);
* one all-reduce per (dtype, device) of a flat buffer combines the clipped means,
  so every rank ends with the global clipped mean over the global number of
  micro-batches, and (adaptive clipping) the smallest micro-batch norm of all ranks;
* in DP mode the divisor is the global public ``M``, and every rank adds the
  *same* noise (generators seeded identically from one seed drawn on rank 0), so
  the update has exactly one draw of ``N(0, (z C)^2) / M``, as on one process.

FSDP2 (``fully_shard``) models work the same way; ``fsdp.py`` turns the one full gradient into
each rank's shard. Launch with ``torchrun --nproc-per-node 2 train.py``; see docs/distributed.md.

Example (every rank runs this)::

    import torch.distributed as dist
    import dp_microclip.distributed as mcd

    dist.init_process_group("gloo")                  # "nccl" on GPUs
    engine = mcd.attach(model, optimizer, micro_batch_size=1, max_grad_norm=1.0,
                        privacy=dp_microclip.DP(noise_multiplier=1.1, sample_rate=256 / len(train_set), delta=1e-5))
    for x, y in mcd.data_loader(engine, train_set):  # this rank's share of one global Poisson batch
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()              # also for an empty share: every rank steps
        optimizer.step()
"""

from __future__ import annotations

import functools
import secrets
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from .attach import attach as _attach
from .rank_agreement import check_same_settings as _check_same_settings
from .engine import Engine, ProcessParts
from .fsdp import ShardedGrads, is_sharded, is_sharded_tensor, reshard_all
from .errors import BatchError, ConfigurationError, user_stacklevel
from .privacy import check_distributed_sampling
from .layers.traits import MIXES_EXAMPLES
from .sampling import PoissonBatchSampler, sample_with_groups
from .step import StepAccumulator
from .tensors import accumulation_dtype

__all__ = ["attach", "data_loader", "DistributedPoissonBatchSampler", "StepReducer"]

#: Engines built by :func:`attach` (the only ones :func:`data_loader` accepts).
_ENGINES: weakref.WeakSet = weakref.WeakSet()


# ================================================================ attach
def attach(model: nn.Module, optimizer: torch.optim.Optimizer, *, group=None, per_core: bool = False,
           broadcast_noise: bool = False, **attach_kwargs) -> Engine:
    """Attach micro-batch clipping on every rank of a ``torch.distributed`` process group.

    Call it on every rank, after ``torch.distributed.init_process_group`` and before
    training, with the same arguments. It makes the ranks start identical and stay
    identical, so that the ranks together compute what one process would on the
    union of their batches:

    1. checks that every rank passed the same settings (a hash of the attach
       arguments, the model's parameter and buffer names, shapes and dtypes, the
       optimizer's hyperparameters), and refuses if not: ranks that disagree would
       silently train different models;
    2. broadcasts the model's parameters and buffers from the group's first rank;
    3. broadcasts one engine seed from the first rank (drawn with ``secrets`` unless
       you give ``seed=``), so every rank draws the same noise and the same Poisson
       coins; the ranks then need no communication for the noise;
    4. calls :func:`dp_microclip.attach` and installs a :class:`StepReducer` that
       all-reduces the clipped means at each step, before noise is added.

    Args:
        model: the unwrapped model (not ``DistributedDataParallel``: see the module docstring), or one
            sharded with FSDP2's ``fully_shard`` (``fsdp.py``: each rank writes its shard of one full gradient).
        optimizer: the optimizer over the model's parameters (its state is not broadcast:
            attach before training).
        group: the process group (default: the world).
        per_core: per-core clipping (Wang et al., 2024): each rank's local batch is ONE
            micro-batch, whatever its size; with ``clipping="adaptive"`` the bound is the
            smallest per-rank norm. Give ``micro_batch_size=`` the per-rank batch size.
            Noise-free only.
        broadcast_noise: draw the noise on the first rank and broadcast it (one collective
            per parameter per step) instead of drawing identical noise on every rank. Use it
            when ranks run on different device types, whose generators may not produce the
            same numbers from the same seed. ``secure_rng=True`` turns it on (the OS's
            generator cannot be seeded identically).
        **attach_kwargs: everything :func:`dp_microclip.attach` takes. In DP mode
            ``sample_rate`` and ``expected_batch_size`` describe the GLOBAL batch (the union
            of the ranks' shares); :func:`data_loader` samples it.

    Returns:
        The engine of this rank. ``engine.data_loader(dataset)`` is redirected to
        :func:`data_loader` (a plain Poisson loader on every rank would give every rank
        the whole batch, counting each record once per rank).

    Raises:
        ConfigurationError: torch.distributed is not initialised, the model is wrapped in
            DDP, FSDP2 settings are unsupported (fsdp.py), it holds a SyncBatchNorm, ranks disagree on settings,
            or ``per_core`` is combined with DP mode or a grouping.
    """
    dist = _dist()
    per_core = bool(per_core)
    if per_core:
        attach_kwargs = _per_core_kwargs(attach_kwargs)
    _check_model(model)
    if _wants_dp(attach_kwargs):
        check_distributed_sampling(getattr(attach_kwargs.get("privacy"), "sampling", "engine"))
    if not dist.is_initialized():
        raise ConfigurationError(
            "dp_microclip.distributed.attach needs an initialised process group: call "
            'torch.distributed.init_process_group("gloo") (CPU) or ("nccl") (GPU) first, e.g. under '
            "torchrun --nproc-per-node 2 train.py. For one process use dp_microclip.attach."
        )
    device = _collective_device(group)
    src = _first_rank(group)
    reshard_all(model)  # FSDP2: the sharded parameters are the ones to check, broadcast-skip and manage
    _check_same_settings(model, optimizer, per_core, {**attach_kwargs, "broadcast_noise": bool(broadcast_noise)},
                         group)
    _broadcast_state(model, src, group)  # FSDP2's shards are each rank's own: only plain tensors travel
    placement = ShardedGrads(model) if is_sharded(model) else None  # checks FSDP2's settings (fsdp.py)
    seed_is_secret = attach_kwargs.get("seed") is None
    if seed_is_secret:
        seed = torch.tensor([secrets.randbits(63) if dist.get_rank() == src else 0], dtype=torch.int64,
                            device=device)
        dist.broadcast(seed, src, group=group)
        attach_kwargs = {**attach_kwargs, "seed": int(seed.item())}
    if _has_batchnorm(model) and not _wants_dp(attach_kwargs):
        warnings.warn(
            "A BatchNorm layer under dp_microclip.distributed: its statistics cover each rank's local batch "
            "only (as under DDP without SyncBatchNorm), so the ranks together do not compute what one process "
            "would on the whole batch. nn.GroupNorm or nn.LayerNorm have no such dependence.", UserWarning,
            stacklevel=user_stacklevel(),
        )
    reducer = StepReducer(group=group, per_core=per_core)
    secure = bool(getattr(attach_kwargs.get("privacy"), "secure_rng", False))
    wrap_noise = None
    if broadcast_noise or secure:
        wrap_noise = functools.partial(_BroadcastNoise, src=src, group=group)
    # Every rank draws the same coins and keeps its own share of one global batch.
    sampler = functools.partial(DistributedPoissonBatchSampler, rank=reducer.rank, world_size=reducer.world_size,
                                shard_by_group=not per_core)
    # User-level DP: every rank draws the same users and keeps those whose slot falls to it (a user never spans ranks).
    share = functools.partial(_share, rank=reducer.rank, world_size=reducer.world_size)
    engine = _attach(model, optimizer, **attach_kwargs,
                     process_parts=ProcessParts(reducer=reducer, wrap_noise=wrap_noise, sampler_factory=sampler,
                                                seed_is_secret=seed_is_secret, share=share,
                                                placement=placement))
    _ENGINES.add(engine)
    return engine


def _share(keys: torch.Tensor, *, rank: int, world_size: int) -> torch.Tensor:
    """Rows whose group key falls to this rank: ``key % world_size == rank``."""
    return keys % world_size == rank


def _per_core_kwargs(kwargs: dict) -> dict:
    """attach() keywords for per-core clipping: every local batch (any size) is one keyed group."""
    if _wants_dp(kwargs):
        raise ConfigurationError(
            "per_core=True is a noise-free tool (per-core clipping, Wang et al. 2024): with one micro-batch per "
            "rank the noisy sum would have world_size terms and sensitivity 2C. For DP use per_core=False with "
            "micro_batch_size=1."
        )
    if "micro_batch_size" not in kwargs:
        raise ConfigurationError(
            "per_core=True needs micro_batch_size=<the per-rank batch size>: each rank's local batch is one "
            "micro-batch."
        )
    for key, allowed in (("grouping", "keyed"), ("num_groups", 1)):
        if kwargs.get(key, allowed) not in (allowed, None) and not (key == "grouping" and kwargs[key] == "auto"):
            raise ConfigurationError(
                f"per_core=True sets {key} itself (each rank's local batch is one group); remove {key}=."
            )
    return {**kwargs, "grouping": "keyed", "num_groups": 1}


def _wants_dp(kwargs: Mapping) -> bool:
    return kwargs.get("privacy") is not None


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, MIXES_EXAMPLES) for m in model.modules())


def _check_model(model: nn.Module) -> None:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise ConfigurationError(
            "dp_microclip.distributed.attach got a DistributedDataParallel model. DDP averages p.grad from "
            "autograd hooks on the parameters, but the engine switches requires_grad off and writes p.grad "
            "itself, so DDP would see no gradient. Pass the unwrapped module (model.module): the engine "
            "all-reduces the clipped gradients itself."
        )
    for name, m in model.named_modules():
        if isinstance(m, nn.SyncBatchNorm):
            raise ConfigurationError(
                f"{name or '<root module>'} is nn.SyncBatchNorm: its forward all-reduces batch statistics across "
                "ranks, which mixes examples of every rank into every micro-batch (and in DP mode releases "
                "un-noised statistics); the engine's per-micro-batch replay cannot run it either. Use "
                "nn.GroupNorm (opacus.validators.ModuleValidator.fix(model)), or, noise-free, plain BatchNorm "
                "(per-rank statistics)."
            )


# ================================================================ settings check and broadcasts
def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigurationError("torch.distributed is not available in this torch build; use dp_microclip.attach.")
    return dist


def _first_rank(group) -> int:
    """The global rank of the group's first member (the source of every broadcast)."""
    dist = _dist()
    return 0 if group is None else dist.get_global_rank(group, 0)


def _collective_device(group) -> torch.device:
    """Where small bookkeeping tensors live: the current CUDA device for NCCL, else the CPU."""
    dist = _dist()
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _buckets(tensors):
    """Group tensors by (dtype, device), keeping order: one flat buffer per group."""
    out: dict = {}
    for t in tensors:
        out.setdefault((t.dtype, t.device), []).append(t)
    return out


@torch.no_grad()
def _broadcast_state(model: nn.Module, src: int, group) -> None:
    """Copy every parameter and buffer of the first rank to the others, one broadcast per (dtype, device)."""
    dist = _dist()
    tensors = [p.data for p in model.parameters() if not is_sharded_tensor(p)] + [b for b in model.buffers()]
    for items in _buckets(tensors).values():
        flat = torch.cat([t.reshape(-1) for t in items])
        dist.broadcast(flat, src, group=group)
        for t, part in zip(items, torch.split(flat, [t.numel() for t in items])):
            t.copy_(part.view_as(t))


class _BroadcastNoise:
    """Noise drawn on the first rank and broadcast: one draw for all ranks, whatever their devices."""

    def __init__(self, inner, src: int, group):
        self._inner, self._src, self._group = inner, src, group
        self.secure, self.seed = inner.secure, getattr(inner, "seed", None)

    def gaussian_like(self, tensor: torch.Tensor, std: float) -> torch.Tensor:
        dist = _dist()
        if dist.get_rank() == self._src:
            noise = self._inner.gaussian_like(tensor, std).contiguous()
        else:
            noise = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        dist.broadcast(noise, self._src, group=self._group)
        return noise

    def state_dict(self) -> dict:
        return self._inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._inner.load_state_dict(state)


# ================================================================ the step
class StepReducer:
    """Combines every rank's clipped means at the step, before noise (the engine's ``ProcessParts.reducer``).

    Called by the engine's step as ``reducer(managed, acc, dp, global_groups)`` where
    ``acc.sums`` maps ``id(p) -> (p, clipped mean over this rank's acc.groups_seen groups)``;
    it rewrites ``acc.sums``, ``acc.groups_seen`` and ``acc.min_norm`` for the whole group of ranks:

    * divisor local to each rank (your own batches, noise-free, each rank's groups its
      own): the mean is ``sum_r mean_r * M_r / sum_r M_r`` over ``sum_r M_r`` groups;
    * divisor shared (DP mode: the public ``M``; noise-free keyed groups of
      :func:`data_loader`: one global group space of ``M`` slots): each rank's mean is
      already divided by the global ``M``, so the global mean is the plain sum and the
      count stays ``M`` (checked equal on every rank);
    * the smallest micro-batch norm of all ranks (adaptive clipping's bound).

    A parameter missing from one rank's ``sums`` counts as zero there. Communication: one
    all-gather of a small float64 vector (counts, the smallest norm, which parameters
    are present), then one all-reduce per (dtype, device) of one flat buffer.
    """

    def __init__(self, *, group=None, per_core: bool = False):
        dist = _dist()
        self.group = group
        self.per_core = per_core
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = _collective_device(group)
        self.calls = 0  # how many steps this rank has reduced

    def __call__(self, managed: list, acc: StepAccumulator, dp: bool, global_groups: bool) -> None:
        acc.sums, acc.groups_seen, acc.min_norm = self.reduce(
            managed, acc.sums, acc.groups_seen, acc.min_norm,
            shared=dp or (not self.per_core and global_groups),
            per_core_broken=self.per_core and acc.groups_seen != len(acc.contexts))

    def reduce(self, managed, sums, groups_seen, min_norm, *, shared: bool, per_core_broken: bool):
        """``(sums, groups_seen, min_norm)`` of all ranks together; ``shared``: means are already over one
        global M (see the class docstring)."""
        dist = _dist()
        self.calls += 1
        head = [float(groups_seen), float(min_norm), float(shared), float(per_core_broken)]
        present = [1.0 if id(p) in sums else 0.0 for p in managed]
        meta = torch.tensor(head + present, dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(meta) for _ in range(self.world_size)]
        dist.all_gather(gathered, meta, group=self.group)
        table = torch.stack(gathered).cpu()  # (world, 4 + number of parameters)
        counts = table[:, 0].tolist()
        if len(set(table[:, 2].tolist())) > 1:
            raise ConfigurationError(
                "Ranks disagree on how this step's groups were formed (some from dp_microclip.distributed."
                "data_loader's global keyed groups, some from their own batches). Feed every rank from "
                "dp_microclip.distributed.data_loader(engine, dataset), or every rank from its own loader."
            )
        if bool(table[:, 3].any()):
            raise BatchError(
                "per_core=True with micro_batch_size=1: a rank's local batch had more than one example, so it "
                "was split into several micro-batches. Give micro_batch_size=<the per-rank batch size>."
            )
        if shared and len(set(counts)) > 1:
            raise ConfigurationError(
                f"The ranks divided their clipped sums by different numbers of groups {counts}; in DP mode every "
                "rank must use the global public M. Pass the same expected_batch_size (of the global batch) on "
                "every rank, or build every rank's loader with dp_microclip.distributed.data_loader on the same "
                "dataset."
            )
        total = counts[0] if shared else sum(counts)
        smallest = float(table[:, 1].min())
        used = table[:, 4:].amax(0) > 0 if managed else torch.zeros(0, dtype=torch.bool)
        params = [p for p, u in zip(managed, used.tolist()) if u]
        if not params or total == 0:
            return {}, float(total), smallest
        weight = 1.0 if shared else float(groups_seen)
        by_bucket: dict = {}
        for p in params:
            dtype = accumulation_dtype(p.dtype)
            by_bucket.setdefault((dtype, p.device), []).append(p)
        out = {}
        for (dtype, device), items in by_bucket.items():
            parts = []
            for p in items:
                entry = sums.get(id(p))
                parts.append(torch.zeros(p.numel(), dtype=dtype, device=device) if entry is None
                             else entry[1].reshape(-1).to(dtype))
            flat = torch.cat(parts)
            if weight != 1.0:
                flat.mul_(weight)  # mean_r * M_r: this rank's clipped sum
            dist.all_reduce(flat, group=self.group)
            if not shared:
                flat.div_(total)
            for p, part in zip(items, torch.split(flat, [p.numel() for p in items])):
                out[id(p)] = (p, part.view(p.shape))
        return out, float(total), smallest


# ================================================================ the loader
class DistributedPoissonBatchSampler(PoissonBatchSampler):
    """Every rank draws the same Poisson coins and keeps its own share of the one global batch.

    Each step, ``coins = rand(N)`` from the engine's sampling generator (seeded
    identically on every rank); record ``i`` is in the global batch iff
    ``coins[i] < q``, and its micro-batch is ``floor(coins[i] / q * M)``
    (:func:`dp_microclip.sampling.sample_with_groups`, as on one process). A sampled
    record goes to rank ``group % world_size`` when groups are drawn (``b > 1``),
    so a micro-batch is never split across ranks and the clipping units are exactly
    the single-process ones; otherwise (``b = 1``, per-core) to rank
    ``index % world_size``. Either way a record's rank depends on its own coin or
    index only. A rank whose share is empty still gets an (empty) batch: it must
    take part in the step.
    """

    def __init__(self, num_records: int, sample_rate: float, generator: torch.Generator, steps_per_epoch: int,
                 num_groups: int | None, on_batch, on_epoch, *, rank: int, world_size: int, shard_by_group: bool):
        super().__init__(num_records, sample_rate, generator, steps_per_epoch, num_groups, on_batch, on_epoch)
        self.rank, self.world_size, self.shard_by_group = rank, world_size, shard_by_group

    def __iter__(self):
        start = (self.on_epoch() or 0) if self.on_epoch is not None else 0
        for _ in range(start, self.steps_per_epoch):
            coins = torch.rand(self.num_records, generator=self.generator, dtype=torch.float64)
            indices, groups = sample_with_groups(coins, self.sample_rate, self.num_groups)
            key = groups if (self.shard_by_group and groups is not None) else indices
            mine = key % self.world_size == self.rank
            indices = indices[mine]
            groups = None if groups is None else groups[mine]
            if self.on_batch is not None:
                self.on_batch(indices, groups)
            yield indices.tolist()


def data_loader(engine: Engine, dataset, batch_size: int | None = None, *,
                collate_keeps_order: bool | None = None, **loader_kwargs) -> DataLoader:
    """This rank's share of one global Poisson batch per step: the sampling epsilon is computed for.

    Every rank must call it with the same dataset (the whole dataset, not a shard).
    The arguments and checks are those of :meth:`dp_microclip.Engine.data_loader`
    (``q`` is the global sample rate; in DP mode the public ``M = round(q N / b)``
    counts the groups of the whole global batch); see
    :class:`DistributedPoissonBatchSampler` for who gets which record. The ledger
    records one step per global step at the global ``q``, so ``engine.epsilon()`` is
    the same on every rank and equals a one-process run's.

    Args:
        engine: an engine from :func:`attach`.
        dataset: the whole map-style dataset, identical on every rank.
        batch_size: the expected GLOBAL batch size ``q N`` (noise-free without ``sample_rate``).
        collate_keeps_order: as for ``engine.data_loader``.
        **loader_kwargs: passed to ``DataLoader`` (num_workers, collate_fn, ...).

    Raises:
        ConfigurationError: the engine was not attached with :func:`attach`.
    """
    if engine not in _ENGINES:
        raise ConfigurationError(
            "dp_microclip.distributed.data_loader needs an engine from dp_microclip.distributed.attach "
            "(this one combines nothing across ranks). Attach with dp_microclip.distributed.attach, or use "
            "engine.data_loader(dataset) on one process."
        )
    # The engine's loader already samples with this module's sampler (plugged in at attach).
    return engine.data_loader(dataset, batch_size, collate_keeps_order=collate_keeps_order, **loader_kwargs)
