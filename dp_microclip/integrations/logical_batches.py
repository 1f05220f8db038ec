"""One item per sampled logical batch for frameworks that count loader items as steps, and a collator order check.

``engine.data_loader(..., max_physical_batch_size=K)`` yields each Poisson-sampled logical batch as
its physical chunks, and the engine holds the update until the last chunk. A framework whose loop
counts every loader item as an optimizer step (the HuggingFace ``Trainer``) would then count chunks:
:class:`LogicalBatchLoader` hands it one :class:`LogicalBatch` (the list of the chunks) per step.

:func:`order_checked` wraps a collate function so that a collator that reorders rows (sorting by
length, say) is caught where it matters: in DP mode with ``micro_batch_size > 1`` each record's
micro-batch follows its row, and the engine's own check at the model input cannot see a reordering
done inside the loader.

Nothing here imports a framework.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..errors import ConfigurationError, PrivacyError
from ..sampling import PhysicalBatchSampler

__all__ = ["LogicalBatch", "LogicalBatchLoader", "order_checked"]


class LogicalBatch(list):
    """One Poisson-sampled logical batch: the list of its collated physical chunks, in the order the model sees them.

    :class:`LogicalBatchLoader` yields one per optimizer step, so a framework counts logical steps; an
    empty sampled batch is one chunk of zero rows (its step is noise-only in DP mode).
    """


class LogicalBatchLoader:
    """``engine.data_loader(..., max_physical_batch_size=K)`` regrouped: one :class:`LogicalBatch` per item.

    The engine's loader yields each logical batch as its chunks; this wrapper reads how many chunks
    each logical batch has from the loader's batch sampler (``PhysicalBatchSampler.chunk_counts``, kept
    in the main process, where the sampler always runs, so worker processes and prefetching do not
    matter) and yields them together. ``len()`` counts logical batches, as the engine's loader does.

    Attributes:
        loader: the engine's physical-batch loader.
        dataset: its dataset (the HF Trainer reads ``len(loader.dataset)`` for its reports).
    """

    def __init__(self, loader: torch.utils.data.DataLoader):
        if not isinstance(loader.batch_sampler, PhysicalBatchSampler):
            raise ConfigurationError("LogicalBatchLoader wraps engine.data_loader(..., max_physical_batch_size=K); "
                                     "this loader yields no physical chunks.")
        self.loader = loader
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        sampler = self.loader.batch_sampler
        assert isinstance(sampler, PhysicalBatchSampler)  # checked in __init__
        chunks = iter(self.loader)
        for first in chunks:
            # The sampler drew this logical batch (and counted its chunks) before it yielded the first one.
            count = sampler.chunk_counts.popleft()
            batch = LogicalBatch([first])
            batch.extend(next(chunks) for _ in range(count - 1))
            yield batch


def _row_matches(sample_value, row: torch.Tensor) -> bool:
    """Whether a collated row holds one sample's value: equal, or equal to its start or end (padding)."""
    value = torch.as_tensor(sample_value)
    if value.shape == row.shape:
        return bool(torch.equal(value.to(row.dtype), row))
    if value.dim() != 1 or row.dim() != 1 or value.numel() > row.numel():
        return False
    value = value.to(row.dtype)
    n = value.numel()
    return bool(torch.equal(value, row[:n]) or torch.equal(value, row[row.numel() - n:]))


def reorder_problem(samples: list, batch) -> str | None:
    """A message when ``batch`` (a collated dict) holds ``samples`` (dicts) in another row order; else None.

    Compared key by key where a row can be matched to its sample (the same values, or them padded on
    the right or the left); keys a collator transforms are skipped, so this catches reordering, not
    every transformation.
    """
    n = len(samples)
    if n < 2 or not isinstance(batch, Mapping) or not all(isinstance(s, Mapping) for s in samples):
        return None
    for key, column in batch.items():
        if not torch.is_tensor(column) or column.dim() == 0 or column.shape[0] != n:
            continue
        if not all(key in s and isinstance(s[key], (torch.Tensor, list, int, float)) for s in samples):
            continue
        try:
            in_order = [_row_matches(s[key], column[i]) for i, s in enumerate(samples)]
            if all(in_order):
                continue
            if n <= 256 and all(any(_row_matches(s[key], row) for row in column) for s in samples):
                return (
                    f"The data collator put the rows of a batch in another order than its samples (column {key!r}), "
                    "e.g. sorted by length. In DP mode with micro_batch_size > 1 each record's micro-batch follows "
                    "its row, so reordering makes it depend on the other records. Use a collator that keeps the rows "
                    "in order (transformers' collators do), or micro_batch_size=1."
                )
        except (RuntimeError, TypeError, ValueError):  # values a collator transforms: not comparable
            continue
    return None


class order_checked:  # noqa: N801  (used like a function: order_checked(collate))
    """``collate`` that raises :class:`~dp_microclip.errors.PrivacyError` when it reorders the rows of a batch.

    A class rather than a closure so that DataLoader workers started with ``spawn`` can pickle it.

    Attributes:
        collate: the wrapped collate function.
    """

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, samples):
        batch = self.collate(samples)
        problem = reorder_problem(list(samples), batch)
        if problem is not None:
            raise PrivacyError(problem)
        return batch
