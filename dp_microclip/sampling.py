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
import numbers
from typing import Callable, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from accounting.epochs import steps_per_epoch

from .contract import batch_fingerprints, row_order_problem
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


def plan_chunks(indices: torch.Tensor, groups: torch.Tensor | None, max_size: int) -> list:
    """Split one sampled logical batch into physical chunks of at most ``max_size`` rows.

    With keyed groups the rows are ordered by group (stably) and a chunk holds whole groups
    only, so every micro-batch is clipped as a whole, exactly as in the one-shot step: a
    record's group comes from its own coin and never depends on the chunking. A group
    larger than ``max_size`` gets a chunk of its own (larger than ``max_size``). An empty
    logical batch is one empty chunk (its step is noise-only).

    Returns:
        ``[(indices, groups or None), ...]``, one pair per chunk, in the order the model must see them.
    """
    if groups is None:
        return [(indices[i:i + max_size], None) for i in range(0, max(1, indices.numel()), max_size)]
    order = torch.argsort(groups, stable=True)
    indices, groups = indices[order], groups[order]
    chunks, start, sizes = [], 0, torch.bincount(groups).tolist() if groups.numel() else []
    end = 0
    for size in sizes:  # whole groups, in group order
        if size and end > start and end + size - start > max_size:
            chunks.append((indices[start:end], groups[start:end]))
            start = end
        end += size
    chunks.append((indices[start:end], groups[start:end]))
    return chunks


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


class Chunk(NamedTuple):
    """One physical chunk of a drawn logical batch (the whole batch when it is not split)."""

    size: int
    groups: torch.Tensor | None
    state_after: torch.Tensor  # the sampling generator's state after the logical batch was drawn
    first: bool  # the logical batch's first chunk
    last: bool  # its last chunk: the optimizer step then takes the whole logical batch


class SampledBatches:
    """The batches ``engine.data_loader`` drew and the model has not consumed yet, and the sampler's position.

    With physical batches (``max_physical``) each drawn logical batch is queued as its chunks
    (:func:`plan_chunks`); ``chunk_lists`` holds their index lists for the loader to yield, and
    the position (``epoch_position``, ``sampler_state``) moves only when a logical batch's last
    chunk is consumed, so a checkpoint taken between chunks resumes at that logical batch's start.
    """

    def __init__(self, generator: torch.Generator):
        self.generator = generator
        self.pending: collections.deque = collections.deque()  # Chunk entries, in the order the model needs them
        self.sampler_state = generator.get_state()  # as of the last batch a forward consumed
        self.epoch_position = 0  # batches of the current epoch consumed
        self.resume_position = 0  # set by a checkpoint: the next epoch starts there
        self.fingerprints: collections.deque = collections.deque()  # rows of yielded batches (DP, b > 1)
        self.max_physical: int | None = None  # physical batch size (None: one chunk per logical batch)
        self.chunk_lists: collections.deque = collections.deque()  # chunk index lists the loader has to yield
        self.last_taken: Chunk | None = None  # the chunk the latest forward consumed

    def on_yield(self, batch) -> None:
        """The loader yielded ``batch`` (DP mode, ``b > 1``): keep its rows' fingerprints to check their order."""
        leading = [t.shape[0] for t in _tensors(batch) if t.dim() > 0]
        self.fingerprints.append(batch_fingerprints(batch, leading[0]) if leading else [])

    def on_batch(self, indices: torch.Tensor, groups) -> None:
        """The sampler drew a batch (called by the loader's batch sampler)."""
        state = self.generator.get_state()
        if self.max_physical is None:
            self.pending.append(Chunk(int(indices.numel()), groups, state, True, True))
            return
        chunks = plan_chunks(indices, groups, self.max_physical)
        for i, (chunk_indices, chunk_groups) in enumerate(chunks):
            self.pending.append(Chunk(int(chunk_indices.numel()), chunk_groups, state, i == 0, i == len(chunks) - 1))
            self.chunk_lists.append(chunk_indices.tolist())

    def on_epoch(self) -> int:
        """A loader epoch starts; returns how many of its batches a resumed run already consumed."""
        self.pending.clear()
        self.fingerprints.clear()
        self.chunk_lists.clear()
        start, self.resume_position = self.resume_position, 0
        self.epoch_position = start
        return start

    def next_is_empty(self) -> int:
        """0 when the next drawn batch is empty (``engine.take_empty_batch`` then takes it); raises otherwise."""
        if not self.pending or self.pending[0].size != 0:
            raise BatchError(
                "engine.take_empty_batch(): the next batch of engine.data_loader is not an empty one (or none was "
                "drawn). Call it only for a batch of zero examples from engine.data_loader, instead of its forward."
            )
        return 0

    def take(self, batch_size: int, inputs=None, batch_dim: int = 0) -> tuple[bool, torch.Tensor | None]:
        """(whether the sampler drew this batch, its records' groups or None); checks the size and, where the
        loader fingerprinted its rows, that ``inputs`` (the model's arguments) hold them in the same order."""
        if not self.pending:
            self.last_taken = None
            return False, None
        chunk = self.last_taken = self.pending.popleft()
        expected = self.fingerprints.popleft() if self.fingerprints else None
        problem = None
        if expected and chunk.size == batch_size:
            problem = row_order_problem(expected, inputs, batch_dim, batch_size)
        if problem is not None:
            self.pending.clear()
            self.fingerprints.clear()
            raise PrivacyError(problem)
        if chunk.size != batch_size:
            self.pending.clear()
            self.fingerprints.clear()
            raise BatchError(
                f"The batch has {batch_size} examples, but engine.data_loader drew {chunk.size} for it: batches "
                "reached the model out of order, or not every drawn batch was used. Feed each batch of "
                "engine.data_loader(...) to the model exactly once, in order (forward passes under "
                "torch.no_grad() do not count)."
            )
        if chunk.last:
            self.sampler_state = chunk.state_after
            self.epoch_position += 1
        return True, chunk.groups


class PhysicalBatchSampler(Sampler[list[int]]):
    """Yields the physical chunks of every logical batch ``inner`` draws (``engine.data_loader(...,
    max_physical_batch_size=...)``); ``len()`` counts logical batches, i.e. optimizer updates.

    ``chunk_counts`` (main process, this iteration) holds how many chunks each logical batch drawn and
    not yet regrouped has, in order: a wrapper that hands a framework one logical batch per item
    (``integrations.logical_batches.LogicalBatchLoader``) pops one count per logical batch.
    """

    def __init__(self, inner: Sampler, sampled: SampledBatches):
        self.inner, self.sampled = inner, sampled
        self.chunk_counts: collections.deque[int] = collections.deque()

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]  # a batch sampler has a length

    def __iter__(self):
        self.chunk_counts.clear()
        for _ in self.inner:  # the inner sampler reported the logical batch to sampled.on_batch first
            self.chunk_counts.append(len(self.sampled.chunk_lists))
            while self.sampled.chunk_lists:
                yield self.sampled.chunk_lists.popleft()


def poisson_loader(dataset: Dataset, sample_rate: float, generator: torch.Generator, *,
                   num_groups: int | None = None, on_batch: Callable | None = None,
                   on_epoch: Callable | None = None, sampler_factory: Callable | None = None,
                   physical: SampledBatches | None = None, **loader_kwargs) -> DataLoader:
    """A DataLoader over ``dataset`` with Poisson sampling at rate ``sample_rate``.

    One epoch is ``round(1 / sample_rate)`` steps (each record is then seen once per
    epoch on average). ``loader_kwargs`` go to ``DataLoader`` (num_workers, pin_memory, ...);
    ``batch_size``, ``shuffle``, ``sampler`` and ``batch_sampler`` are set here.
    ``sampler_factory`` (multi-process training) builds the batch sampler instead of
    :class:`PoissonBatchSampler`, from the same arguments. ``physical`` (the queue of an engine
    whose ``max_physical`` is set) makes the loader yield each logical batch as its physical chunks.
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
    if physical is not None:
        sampler = PhysicalBatchSampler(sampler, physical)
    collate = loader_kwargs.pop("collate_fn", default_collate)
    on_yield = loader_kwargs.pop("on_yield", None)
    if on_yield is not None:
        return RowCheckedLoader(dataset, batch_sampler=sampler, collate_fn=empty_batch_collate(dataset, collate),
                                on_yield=on_yield, **loader_kwargs)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=empty_batch_collate(dataset, collate), **loader_kwargs)


class RowCheckedLoader(DataLoader):
    """A DataLoader that reports every batch it yields (in the main process) to ``on_yield``.

    DP mode with ``b > 1``: the engine fingerprints each batch's rows here and checks at the model's
    input that they arrive in the same order (``contract.row_order_problem``).
    """

    def __init__(self, *args, on_yield: Callable, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_yield = on_yield

    def __iter__(self):
        for batch in super().__iter__():
            self._on_yield(batch)
            yield batch


def _tensors(batch) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(batch)
    return [x for x in leaves if torch.is_tensor(x)]


def make_loader(dataset, sample_rate: float | None, batch_size: int | None, generator: torch.Generator,
                sampled: SampledBatches, plan: GroupingPlan, *, dp: bool, micro_batch_size: int,
                keeps_order: bool, sampler_factory: Callable | None = None,
                max_physical_batch_size: int | None = None, **loader_kwargs) -> tuple[DataLoader, float]:
    """``engine.data_loader``: check the arguments, fix ``q`` and the grouping plan, build the loader.

    Returns the loader and the sample rate ``q`` it samples with (``batch_size / N`` when the
    engine had none).
    """
    max_physical_batch_size = check_physical_batch_size(max_physical_batch_size, sampler_factory is not None)
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
    if dp and micro_batch_size > 1:
        loader_kwargs["on_yield"] = sampled.on_yield
    b = micro_batch_size
    if max_physical_batch_size is not None and plan.loader_groups is None and max_physical_batch_size % b:
        raise ConfigurationError(
            f"max_physical_batch_size={max_physical_batch_size} is not a multiple of micro_batch_size={b} "
            f'(grouping="contiguous"): a chunk would cut a micro-batch in two. Use a multiple of {b}, or '
            'grouping="keyed".'
        )
    sampled.max_physical = max_physical_batch_size
    loader = poisson_loader(dataset, q, generator, num_groups=plan.loader_groups, on_batch=sampled.on_batch,
                            on_epoch=sampled.on_epoch, sampler_factory=sampler_factory,
                            physical=sampled if max_physical_batch_size is not None else None, **loader_kwargs)
    return loader, float(q)


def check_physical_batch_size(max_physical_batch_size, several_processes: bool) -> int | None:
    """``max_physical_batch_size`` as an int, or None; refuses a non-int, a value < 1, several processes."""
    if max_physical_batch_size is None:
        return None
    if isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, numbers.Integral) \
            or max_physical_batch_size < 1:
        raise ConfigurationError(
            f"max_physical_batch_size must be an int >= 1 (the most examples one forward and backward pass "
            f"holds), or None for one pass per sampled batch. Found {max_physical_batch_size!r}."
        )
    if several_processes:
        raise ConfigurationError(
            "max_physical_batch_size is not supported with several processes yet (each rank's chunks would "
            "finish at different times). Leave it out, or lower each rank's share with more processes."
        )
    return int(max_physical_batch_size)
