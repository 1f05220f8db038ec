"""Poisson sampling: the only sampling the engine's epsilon is computed for.

Every step, every record of the dataset joins the batch independently with
probability ``q``, drawn from the engine's own generator. Batch sizes vary and
may be zero; an empty batch still makes a (noise-only) step, because skipping
it would leak that the batch was empty. Opacus' ``UniformWithReplacementSampler``
and ``DPDataLoader`` do the same job (and inspired the empty-batch handling);
this one reports every batch it yields to the engine, so the engine knows the
sampling it accounts for is the sampling that happened.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from .privacy import steps_per_epoch


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


def poisson_loader(dataset: Dataset, sample_rate: float, generator: torch.Generator, *,
                   num_groups: int | None = None, on_batch: Callable | None = None,
                   on_epoch: Callable | None = None, **loader_kwargs) -> DataLoader:
    """A DataLoader over ``dataset`` with Poisson sampling at rate ``sample_rate``.

    One epoch is ``round(1 / sample_rate)`` steps (each record is then seen once per
    epoch on average). ``loader_kwargs`` go to ``DataLoader`` (num_workers, pin_memory, ...);
    ``batch_size``, ``shuffle``, ``sampler`` and ``batch_sampler`` are set here.
    """
    for forbidden in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
        if forbidden in loader_kwargs:
            raise ValueError(
                f"engine.data_loader(...) sets {forbidden} itself (Poisson sampling); remove {forbidden}=."
            )
    steps = steps_per_epoch(sample_rate)  # the same formula the privacy plan uses for epochs
    sampler = PoissonBatchSampler(len(dataset), sample_rate, generator, steps, num_groups, on_batch, on_epoch)
    collate = loader_kwargs.pop("collate_fn", default_collate)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=empty_batch_collate(dataset, collate), **loader_kwargs)
