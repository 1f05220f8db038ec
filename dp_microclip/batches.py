"""Which micro-batches each batch forms, and which batches the engine's own sampler drew.

Two small pieces of state the engine owns, each with one job:

* :class:`GroupingPlan` decides grouping in one place: contiguous slices of
  ``b`` for your own batches, keyed groups (each record drawn into one of ``M``
  groups independently of the others) for ``engine.data_loader`` batches and in
  DP mode, and the divisor ``M`` of each step (the public constant in DP mode).
* :class:`SampledBatches` is the queue between ``engine.data_loader`` and the
  model's forward: every batch the Poisson sampler draws is announced with its
  records' groups and the sampler's state after the draw, and the forward that
  consumes it takes it off the queue (so the engine knows the batch was Poisson
  sampled, and where a checkpoint must resume the sampler).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import torch

from . import grouping
from .errors import BatchError, ConfigurationError


def missing_public_groups() -> ConfigurationError:
    """The error when DP mode meets a batch before the public number of groups is known."""
    return ConfigurationError(
        "DP mode needs the public number of groups before the first batch: build the loader with "
        "engine.data_loader(dataset), or pass expected_batch_size=... to attach()."
    )


@dataclass
class GroupingPlan:
    """How the examples of each batch form micro-batches.

    Attributes:
        micro_batch_size: ``b``.
        requested: the ``grouping`` argument of ``attach`` ("auto", "contiguous" or "keyed").
        dp: DP mode (keyed groups and a public divisor).
        num_groups: ``M`` of keyed groups (None: ``ceil(B / b)`` per batch, noise-free only).
        public_num_groups: the public divisor in DP mode, ``round(q N / b)``.
    """

    micro_batch_size: int
    requested: str
    dp: bool
    num_groups: int | None = None
    public_num_groups: int | None = None

    def __post_init__(self):
        self.mode = "keyed" if self.requested == "keyed" or self.dp else "contiguous"
        if self.public_num_groups is not None:
            self.num_groups = self.public_num_groups

    def use_loader(self, expected_batch_size: float) -> None:
        """``engine.data_loader`` with expected batch size ``q N``: DP fixes the public ``M``; noise-free
        ``"auto"`` switches to keyed groups (Poisson batches vary in size, so slices of ``b`` would not divide
        them)."""
        b = self.micro_batch_size
        if self.dp:
            public = grouping.public_groups(expected_batch_size, b)
            if self.public_num_groups is not None and self.public_num_groups != public:
                raise ConfigurationError(
                    f"expected_batch_size given to attach() implies {self.public_num_groups} groups, but the "
                    f"dataset and sample rate imply {public} (round(q N / b)). Make them agree."
                )
            self.public_num_groups = self.num_groups = public
        elif self.requested == "auto" and b > 1:
            self.mode = "keyed"
            if self.num_groups is None:
                self.num_groups = grouping.public_groups(expected_batch_size, b)

    @property
    def loader_groups(self) -> int | None:
        """``M`` for the sampler to draw keyed groups with, or None (each example its own group, or slices)."""
        return self.num_groups if self.mode == "keyed" and self.micro_batch_size > 1 else None

    def groups(self, batch_size: int, device, drawn: torch.Tensor | None,
               generator: torch.Generator) -> grouping.Groups:
        """The groups of one batch: slices, the sampler's draws, or fresh keyed draws from ``generator``."""
        b = self.micro_batch_size
        if self.mode == "contiguous" or b == 1:
            return grouping.contiguous_groups(batch_size, b, device)
        num_groups = self.num_groups
        if num_groups is None:
            if self.dp:
                raise missing_public_groups()
            num_groups = max(1, math.ceil(batch_size / b))
        if drawn is not None:
            return grouping.groups_from_index(drawn.to(device), num_groups)
        return grouping.keyed_groups(batch_size, num_groups, generator)

    def divisor(self, groups: grouping.Groups) -> float:
        """``M`` of one batch: its number of groups, or the public constant in DP mode."""
        return float(self.public_num_groups if self.public_num_groups is not None else groups.num_groups)


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
