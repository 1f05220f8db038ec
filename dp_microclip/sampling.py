"""Poisson sampling (the only sampling the engine's epsilon is computed for) and the sampled-batch queue.

Every step, every record of the dataset joins the batch independently with
probability ``q``, drawn from the engine's own generator. Batch sizes vary and
may be zero; an empty batch still makes a (noise-only) step, because skipping
it would leak that the batch was empty. Opacus' ``UniformWithReplacementSampler``
and ``DPDataLoader`` do the same job (and inspired the empty-batch handling);
this one reports every batch it yields to the engine, so the engine knows the
sampling it accounts for is the sampling that happened.
"""

from __future__ import annotations

import collections
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from accounting.epochs import steps_per_epoch

from .errors import BatchError, ConfigurationError, PrivacyError
from .grouping import GroupingPlan
from .settings import is_real


def sample_with_groups(coins: torch.Tensor, sample_rate: float, num_groups: int | None):
    """Poisson sampling and keyed groups from ONE uniform coin per record.

    Record ``r`` joins the batch iff ``coins[r] < q``; given that, ``coins[r] / q``
    is uniform on [0, 1) and independent of every other record, so
    ``floor(coins[r] / q * M)`` puts it in a uniform group chosen from its own
    randomness only. Adding or removing a record changes the contents of exactly
    one group (the property the 2C sensitivity rests on; tested with hypothesis).

    Returns:
        ``(indices, groups)``: sampled record indices (ascending) and their groups
        (``None`` when ``num_groups`` is None).
    """
    mask = coins < sample_rate
    indices = mask.nonzero().flatten()
    if num_groups is None:
        return indices, None
    groups = (coins[indices] / sample_rate * num_groups).floor().long().clamp_(max=num_groups - 1)
    return indices, groups


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps_per_epoch`` batches of independently Poisson-sampled indices.

    ``on_batch(indices, groups)`` is told about every batch as it is drawn, so the
    engine can give each example the group its own coin chose.
    """

    def __init__(self, num_records: int, sample_rate: float, generator: torch.Generator,
                 steps_per_epoch: int, num_groups: int | None = None, on_batch: Callable | None = None,
                 on_epoch: Callable | None = None):
        self.num_records = num_records
        self.sample_rate = sample_rate
        self.generator = generator
        self.steps_per_epoch = steps_per_epoch
        self.num_groups = num_groups
        self.on_batch = on_batch
        self.on_epoch = on_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        # on_epoch returns how many batches of this epoch a resumed run already consumed (0 normally).
        start = (self.on_epoch() or 0) if self.on_epoch is not None else 0
        for _ in range(start, self.steps_per_epoch):
            coins = torch.rand(self.num_records, generator=self.generator, dtype=torch.float64)
            indices, groups = sample_with_groups(coins, self.sample_rate, self.num_groups)
            if self.on_batch is not None:
                self.on_batch(indices, groups)
            yield indices.tolist()


def empty_batch_collate(dataset: Dataset, collate: Callable = default_collate) -> Callable:
    """A collate function that turns an empty index list into zero-length tensors of the right shape."""

    def collate_fn(samples):
        if samples:
            return collate(samples)
        template = collate([dataset[0]])
        return _take_zero_rows(template)

    return collate_fn


def _take_zero_rows(batch):
    if torch.is_tensor(batch):
        return batch[:0]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_take_zero_rows(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _take_zero_rows(v) for k, v in batch.items()}
    return batch


class SampledBatches:
    """The batches ``engine.data_loader`` drew and the model has not consumed yet, and the sampler's position."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.pending: collections.deque = collections.deque()  # (size, groups, generator state after the draw)
        self.sampler_state = generator.get_state()  # as of the last batch a forward consumed
        self.epoch_position = 0  # batches of the current epoch consumed
        self.resume_position = 0  # set by a checkpoint: the next epoch starts there

    def on_batch(self, indices: torch.Tensor, groups) -> None:
        """The sampler drew a batch (called by the loader's batch sampler)."""
        self.pending.append((int(indices.numel()), groups, self.generator.get_state()))

    def on_epoch(self) -> int:
        """A loader epoch starts; returns how many of its batches a resumed run already consumed."""
        self.pending.clear()
        start, self.resume_position = self.resume_position, 0
        self.epoch_position = start
        return start

    def next_is_empty(self) -> int:
        """0 when the next drawn batch is empty (``engine.take_empty_batch`` then takes it); raises otherwise."""
        if not self.pending or self.pending[0][0] != 0:
            raise BatchError(
                "engine.take_empty_batch(): the next batch of engine.data_loader is not an empty one (or none was "
                "drawn). Call it only for a batch of zero examples from engine.data_loader, instead of its forward."
            )
        return 0

    def take(self, batch_size: int) -> tuple[bool, torch.Tensor | None]:
        """(whether the sampler drew this batch, its records' groups or None); checks the size."""
        if not self.pending:
            return False, None
        size, groups, state_after = self.pending.popleft()
        if size != batch_size:
            self.pending.clear()
            raise BatchError(
                f"The batch has {batch_size} examples, but engine.data_loader drew {size} for it: batches reached "
                "the model out of order, or not every drawn batch was used. Feed each batch of "
                "engine.data_loader(...) to the model exactly once, in order (forward passes under "
                "torch.no_grad() do not count)."
            )
        self.sampler_state = state_after
        self.epoch_position += 1
        return True, groups


def poisson_loader(dataset: Dataset, sample_rate: float, generator: torch.Generator, *,
                   num_groups: int | None = None, on_batch: Callable | None = None,
                   on_epoch: Callable | None = None, sampler_factory: Callable | None = None,
                   **loader_kwargs) -> DataLoader:
    """A DataLoader over ``dataset`` with Poisson sampling at rate ``sample_rate``.

    One epoch is ``round(1 / sample_rate)`` steps (each record is then seen once per
    epoch on average). ``loader_kwargs`` go to ``DataLoader`` (num_workers, pin_memory, ...);
    ``batch_size``, ``shuffle``, ``sampler`` and ``batch_sampler`` are set here.
    ``sampler_factory`` (multi-process training) builds the batch sampler instead of
    :class:`PoissonBatchSampler`, from the same arguments.
    """
    for forbidden in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
        if forbidden in loader_kwargs:
            raise ValueError(
                f"engine.data_loader(...) sets {forbidden} itself (Poisson sampling); remove {forbidden}=."
            )
    if not isinstance(dataset, collections.abc.Sized):
        raise TypeError(f"engine.data_loader(...) samples from every record, so it needs a dataset with a length; "
                        f"{type(dataset).__name__} has no __len__. Pass a map-style dataset.")
    steps = steps_per_epoch(sample_rate)  # the same formula the privacy plan uses for epochs
    make = sampler_factory or PoissonBatchSampler
    sampler = make(len(dataset), sample_rate, generator, steps, num_groups, on_batch, on_epoch)
    collate = loader_kwargs.pop("collate_fn", default_collate)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=empty_batch_collate(dataset, collate), **loader_kwargs)


def make_loader(dataset, sample_rate: float | None, batch_size: int | None, generator: torch.Generator,
                sampled: SampledBatches, plan: GroupingPlan, *, dp: bool, micro_batch_size: int,
                keeps_order: bool, sampler_factory: Callable | None = None,
                **loader_kwargs) -> tuple[DataLoader, float]:
    """``engine.data_loader``: check the arguments, fix ``q`` and the grouping plan, build the loader.

    Returns the loader and the sample rate ``q`` it samples with (``batch_size / N`` when the
    engine had none).
    """
    n = len(dataset)
    if n == 0:
        raise ConfigurationError("engine.data_loader(dataset): the dataset is empty.")
    q = sample_rate
    if q is None:
        if batch_size is None:
            raise ConfigurationError("engine.data_loader(dataset, batch_size=...) needs the expected batch size.")
        if not is_real(batch_size) or not 0 < batch_size <= n:
            raise ConfigurationError(f"batch_size must be in (0, len(dataset)={n}]. Found {batch_size!r}.")
        q = batch_size / n
    elif batch_size is not None and abs(batch_size - q * n) > 0.5:
        raise ConfigurationError(
            f"batch_size={batch_size} disagrees with sample_rate={q} x len(dataset)={n} = {q * n:.1f}. "
            f"Pass batch_size={round(q * n)} or omit it."
        )
    if dp and micro_batch_size > 1 and "collate_fn" in loader_kwargs and not keeps_order:
        raise PrivacyError(
            "engine.data_loader(..., collate_fn=...) in DP mode with micro_batch_size > 1: each record's "
            "micro-batch follows its row, so a collate_fn that reorders rows (e.g. sorting by length) would "
            "move records between micro-batches depending on the other records. Use a collate_fn that keeps "
            "the rows in order and declare it with collate_keeps_order=True, or sort inside the model."
        )
    plan.use_loader(q * n)
    loader = poisson_loader(dataset, q, generator, num_groups=plan.loader_groups, on_batch=sampled.on_batch,
                            on_epoch=sampled.on_epoch, sampler_factory=sampler_factory, **loader_kwargs)
    return loader, float(q)
