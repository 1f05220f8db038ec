"""Which micro-batch (group) each example of a batch belongs to.

"Micro-batch" in this package is the *clipping unit* (as in TF Privacy's
``num_microbatches``), not a memory chunk (as in Opacus' BatchMemoryManager).

Two ways to form groups (docs/accounting.md explains which one DP needs):

* contiguous: examples ``[b*j, b*(j+1))`` form group ``j`` (the papers, TF Privacy).
  The batch size must be a multiple of ``b``.
* keyed: every example gets a group drawn uniformly and independently of every
  other example from the engine's own generator; ``M`` (the number of groups)
  is a public constant. Groups are ragged and may be empty. This is the only
  grouping with an example-level DP guarantee for ``b > 1`` after sampling.

Dimension letters: B examples, M groups, R = rows of the largest group.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .errors import BatchError, ConfigurationError


@dataclass(frozen=True)
class Groups:
    """The group of every example of one forward pass.

    Attributes:
        index: ``(B,)`` long tensor, the group of each example.
        num_groups: ``M``, the number of group slots (some may be empty in keyed mode).
        sizes: ``(M,)`` float tensor, examples per group.
        equal_size: ``b`` when every group holds exactly ``b`` consecutive examples
            (contiguous grouping), else ``None``; lets :meth:`pad` be a free reshape.
        largest: R, known on the host when the groups were drawn there (keyed groups, the sampler's draws),
            so that :meth:`max_size` need not read it back from an accelerator every pass; None: read
            from ``sizes`` when asked.
    """

    index: torch.Tensor
    num_groups: int
    sizes: torch.Tensor
    equal_size: int | None
    largest: int | None = None

    @property
    def batch_size(self) -> int:
        """B, the number of examples the groups cover."""
        return int(self.index.shape[0])

    def to(self, device: torch.device) -> "Groups":
        """The same groups on ``device`` (no copy when already there)."""
        if self.index.device == device:
            return self
        return Groups(self.index.to(device), self.num_groups, self.sizes.to(device), self.equal_size,
                      self.max_size() if self.index.device.type == "cpu" else self.largest)

    def max_size(self) -> int:
        """R, the size of the largest group (the padded group length): a read of ``sizes`` only when it is
        neither equal nor known on the host (groups drawn on an accelerator)."""
        if self.equal_size is not None:
            return self.equal_size
        if self.largest is not None:
            return self.largest
        return int(self.sizes.max().item())

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Rearrange rows ``(B, ...)`` into ``(M, R, ...)``, padding short groups with zeros.

        Zero rows add nothing to a group's sum, so every rule can work on the
        padded tensor as if groups were equal. Contiguous groups need no copy.
        """
        if self.equal_size is not None:
            return x.reshape(self.num_groups, self.equal_size, *x.shape[1:])  # (M, b, ...)
        slot = self._slot_in_group()
        out = x.new_zeros((self.num_groups, self.max_size(), *x.shape[1:]))  # (M, R, ...)
        out[self.index.to(x.device), slot.to(x.device)] = x
        return out

    def pad_like_first(self, x: torch.Tensor) -> torch.Tensor:
        """As :meth:`pad`, but fills the padding with copies of row 0 instead of zeros.

        Used for *inputs* of generic modules: a zero input may give a non-finite
        output (log, division), while the matching zero output-gradient row
        already makes the padding contribute nothing.
        """
        if self.equal_size is not None:
            return self.pad(x)
        slot = self._slot_in_group()
        out = x[:1].expand(self.num_groups * self.max_size(), *x.shape[1:]).clone()
        out = out.reshape(self.num_groups, self.max_size(), *x.shape[1:])
        out[self.index.to(x.device), slot.to(x.device)] = x
        return out

    def rows(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group values ``(M,)`` spread to their rows ``(B,)``: no kernel at all when ``b = 1``."""
        if self.equal_size == 1:
            return values
        if self.equal_size is not None:
            return values.repeat_interleave(self.equal_size)
        return values[self.index.to(values.device)]

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum rows ``(B, ...)`` per group into ``(M, ...)``: no kernel at all when ``b = 1``."""
        if self.equal_size == 1:
            return x
        if self.equal_size is not None:
            return x.reshape(self.num_groups, self.equal_size, *x.shape[1:]).sum(1)
        out = x.new_zeros((self.num_groups, *x.shape[1:]))
        return out.index_add_(0, self.index.to(x.device), x)

    def _slot_in_group(self) -> torch.Tensor:
        # Position of each example inside its group, in batch order: (B,)
        order = torch.argsort(self.index, stable=True)
        sorted_groups = self.index[order]
        starts = torch.zeros(self.num_groups + 1, dtype=torch.long, device=self.index.device)
        # From the sizes the groups carry: bincount on an accelerator would read the index's max back first.
        starts[1:] = torch.cumsum(self.sizes.to(torch.long), 0)
        slot_sorted = torch.arange(self.batch_size, device=self.index.device) - starts[sorted_groups]
        slot = torch.empty_like(slot_sorted)
        slot[order] = slot_sorted
        return slot


def contiguous_groups(batch_size: int, micro_batch_size: int, device=None) -> Groups:
    """Groups of ``b`` consecutive examples; raises if ``b`` does not divide ``B``."""
    if batch_size % micro_batch_size != 0:
        raise BatchError(
            f"micro_batch_size={micro_batch_size} does not divide the batch size {batch_size} "
            f'(grouping="contiguous"). Use a batch size that is a multiple of {micro_batch_size} '
            '(e.g. DataLoader(..., drop_last=True)), or grouping="keyed".'
        )
    return _contiguous(batch_size, micro_batch_size, None if device is None else torch.device(device))


@functools.lru_cache(maxsize=64)
def _contiguous(batch_size: int, micro_batch_size: int, device: torch.device | None) -> Groups:
    # Cached: the same batch shape gives the same groups, so a steady-state step launches no kernel for them.
    # The tensors are never written to (Groups is frozen and every consumer only reads them).
    num_groups = batch_size // micro_batch_size
    index = torch.arange(batch_size, device=device) // micro_batch_size
    sizes = torch.full((num_groups,), float(micro_batch_size), device=device)
    return Groups(index, num_groups, sizes, micro_batch_size)


def keyed_groups(batch_size: int, num_groups: int, generator: torch.Generator) -> Groups:
    """Every example drawn into one of ``num_groups`` groups, uniformly and independently.

    The draw uses only the engine's generator: an example's group does not
    depend on any other example, so adding or removing one example changes the
    contents of exactly one group (the property the 2C sensitivity rests on).
    The i-th draw goes to the i-th row, but since the draws are i.i.d. the
    joint law of (example -> group) does not depend on positions.
    """
    index = torch.randint(num_groups, (batch_size,), generator=generator, device=generator.device)
    return groups_from_index(index, num_groups)


def groups_from_index(index: torch.Tensor, num_groups: int) -> Groups:
    """Groups given by a precomputed ``(B,)`` index (drawn by the Poisson sampler, or keyed draws).

    An index on the host gets R computed here, where reading it waits for nothing; moved to an accelerator
    (:meth:`Groups.to`) the groups keep it, so no pass reads it back from the device."""
    counts = torch.bincount(index, minlength=num_groups)
    largest = int(counts.max()) if index.device.type == "cpu" and counts.numel() else None
    return Groups(index, num_groups, counts.to(torch.get_default_dtype()), None, largest)


def public_groups(expected_batch_size: float, micro_batch_size: int) -> int:
    """The public number of groups M = round(expected batch size / b), at least 1."""
    return max(1, round(expected_batch_size / micro_batch_size))


def missing_public_groups() -> ConfigurationError:
    """The error when DP mode meets a batch before the public number of groups is known."""
    return ConfigurationError(
        "DP mode needs the public number of groups before the first batch: build the loader with "
        "engine.data_loader(dataset), or pass expected_batch_size=... to attach()."
    )


def resolve_grouping(requested: str, micro_batch_size: int, dp: bool) -> str:
    """The one grouping decision: "user" stays; DP mode, b = 1 in DP mode and "keyed" give keyed groups
    (each record's group from its own coin; at b = 1 every example is its own group); else contiguous."""
    if requested == "user":
        return "user"
    if requested == "keyed" or dp:
        return "keyed"
    return "contiguous"


@dataclass
class GroupingPlan:
    """How the examples of each batch form micro-batches.

    Attributes:
        micro_batch_size: ``b``.
        requested: the ``grouping`` argument of ``attach`` ("auto", "contiguous" or "keyed"), or "user"
            (user-level DP: each sampled user's examples are one group, slots drawn by ``users.py``).
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
        self.mode = resolve_grouping(self.requested, self.micro_batch_size, self.dp)
        if self.public_num_groups is not None:
            self.num_groups = self.public_num_groups

    def use_loader(self, expected_batch_size: float) -> None:
        """``engine.data_loader`` with expected batch size ``q N``: DP fixes the public ``M``; noise-free
        ``"auto"`` switches to keyed groups (Poisson batches vary in size, so slices of ``b`` would not divide
        them)."""
        b = 1 if self.mode == "user" else self.micro_batch_size  # with users: the expected users per step
        if self.dp:
            public = public_groups(expected_batch_size, b)
            if self.public_num_groups is not None and self.public_num_groups != public:
                raise ConfigurationError(
                    f"expected_batch_size given to attach() implies {self.public_num_groups} groups, but the "
                    f"dataset and sample rate imply {public} (round(q N / b)). Make them agree."
                )
            self.public_num_groups = self.num_groups = public
        elif self.requested == "auto" and b > 1:
            self.mode = "keyed"
            if self.num_groups is None:
                self.num_groups = public_groups(expected_batch_size, b)

    @property
    def loader_groups(self) -> int | None:
        """``M`` for the sampler to draw keyed groups with, or None (each example its own group, or slices)."""
        return self.num_groups if self.mode == "keyed" and self.micro_batch_size > 1 else None

    def groups(self, batch_size: int, device, drawn: torch.Tensor | None,
               generator: torch.Generator) -> Groups:
        """The groups of one batch: slices, the sampler's draws, or fresh keyed draws from ``generator``."""
        b = self.micro_batch_size
        if self.mode == "user":  # the user slot of every row; a batch the user loader did not draw: one row each
            if drawn is None:
                return contiguous_groups(batch_size, 1, device)
            return groups_from_index(drawn, int(drawn.max()) + 1 if drawn.numel() else 1).to(torch.device(device))
        if self.mode == "contiguous" or b == 1:
            return contiguous_groups(batch_size, b, device)
        num_groups = self.num_groups
        if num_groups is None:
            if self.dp:
                raise missing_public_groups()
            num_groups = max(1, math.ceil(batch_size / b))
        if drawn is not None:  # the sampler's draws: grouped where they are, then moved (R stays on the host)
            return groups_from_index(drawn, num_groups).to(torch.device(device))
        return keyed_groups(batch_size, num_groups, generator)

    @property
    def fixed_divisor(self) -> bool:
        """Whether every batch is divided by the same ``M`` (the public one, or keyed groups' slots): the
        clipped means of the physical chunks of one logical batch then add up to the batch's mean."""
        return self.public_num_groups is not None or (self.mode == "keyed" and self.micro_batch_size > 1
                                                      and self.num_groups is not None)

    def divisor(self, groups: Groups) -> float:
        """``M`` of one batch: its number of groups, or the public constant in DP mode."""
        return float(self.public_num_groups if self.public_num_groups is not None else groups.num_groups)
