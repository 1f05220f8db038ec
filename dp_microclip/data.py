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


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps_per_epoch`` batches of independently Poisson-sampled indices."""

    def __init__(self, num_records: int, sample_rate: float, generator: torch.Generator,
                 steps_per_epoch: int, on_batch: Callable[[int], None] | None = None):
        self.num_records = num_records
        self.sample_rate = sample_rate
        self.generator = generator
        self.steps_per_epoch = steps_per_epoch
        self.on_batch = on_batch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        for _ in range(self.steps_per_epoch):
            mask = torch.rand(self.num_records, generator=self.generator) < self.sample_rate
            indices = mask.nonzero().flatten().tolist()
            if self.on_batch is not None:
                self.on_batch(len(indices))
            yield indices


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


def poisson_loader(dataset: Dataset, sample_rate: float, generator: torch.Generator,
                   on_batch: Callable[[int], None] | None = None, **loader_kwargs) -> DataLoader:
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
    steps = max(1, round(1.0 / sample_rate))
    sampler = PoissonBatchSampler(len(dataset), sample_rate, generator, steps, on_batch)
    collate = loader_kwargs.pop("collate_fn", default_collate)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=empty_batch_collate(dataset, collate), **loader_kwargs)
