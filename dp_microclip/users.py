"""User-level sampling: Poisson sampling of users, at most ``k`` examples each, one micro-batch per user.

With ``DP(privacy_unit="user", max_examples_per_user=k)`` neighbouring datasets
differ by one user with all of their examples. Every step, each of the ``U``
users joins the batch independently with probability ``q`` (one coin per user
from the engine's sampling generator); a sampled user with more than ``k``
examples contributes ``k`` of them, chosen uniformly at random without
replacement (from the same generator), and all the examples a user contributes
form that user's micro-batch: the group index of each row is its user's slot
among the sampled users. Adding or removing a user adds or removes one clipped
term and changes no other group, so the sensitivity is ``C`` (docs/user-level.md).

:class:`UserSampling` is the engine's part: it turns ``engine.data_loader(dataset,
user_ids=...)`` into a loader (the example-level loader of ``sampling.py`` when
the unit is the example) and remembers each dataset's user ids, so that a later
epoch cannot silently regroup examples under other users.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Sampler

from .errors import ConfigurationError, PrivacyError
from .grouping import GroupingPlan
from .settings import PRIVACY_UNITS, check_choice
from .sampling import SampledBatches, check_physical_batch_size, make_loader, poisson_loader

__all__ = ["SampledBatches", "UserIndex", "UserPoissonBatchSampler", "UserSampling", "check_privacy_unit",
           "sample_users"]


def check_privacy_unit(privacy_unit, max_examples_per_user, micro_batch_size: int, grouping: str,
                       sampling: str) -> str:
    """Validate ``DP(privacy_unit=..., max_examples_per_user=...)`` at ``attach``; returns the grouping to use.

    Raises:
        ConfigurationError: an unknown unit, ``k`` not an integer >= 1, ``k`` without users,
            ``micro_batch_size != k``, or a grouping other than ``"auto"`` with users.
        PrivacyError: users with a loader the engine does not sample (``sampling`` other than ``"engine"``).
    """
    check_choice("privacy_unit", privacy_unit, PRIVACY_UNITS)
    k = max_examples_per_user
    if privacy_unit == "example":
        if k is not None:
            raise ConfigurationError(
                f"max_examples_per_user={k!r} bounds a user's examples, but privacy_unit='example'. Pass "
                "DP(privacy_unit='user', max_examples_per_user=k) for user-level DP, or drop max_examples_per_user."
            )
        return grouping
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigurationError(
            f"privacy_unit='user' needs max_examples_per_user, an integer >= 1 (at most k examples of a sampled "
            f"user per step). Found {k!r}. Pass e.g. DP(privacy_unit='user', max_examples_per_user=8)."
        )
    if micro_batch_size != k:
        raise ConfigurationError(
            f"privacy_unit='user': a micro-batch is one user's examples, at most max_examples_per_user={k}, but "
            f"micro_batch_size={micro_batch_size}. Pass attach(..., micro_batch_size={k})."
        )
    if grouping != "auto":
        raise ConfigurationError(
            f"privacy_unit='user' groups examples by user; grouping={grouping!r} does not apply. Leave grouping out."
        )
    if sampling != "engine":
        raise PrivacyError(
            f"privacy_unit='user' with sampling={sampling!r}: users are sampled by engine.data_loader(dataset, "
            "user_ids=...), which knows each example's user. Use DP(sampling='engine') (the default)."
        )
    return "user"


class UserIndex:
    """The examples of every user, validated once: users numbered ``0..U-1``, examples grouped by user.

    Attributes:
        user_of_example: ``(N,)`` long tensor, the user number of each example.
        num_users: ``U``.
        order: ``(N,)`` example indices sorted by user (ascending within a user).
        starts: ``(U + 1,)`` where each user's examples start in ``order``.
        key: the user ids as given, normalised (a tuple or a tensor), to recognise a changed list.
    """

    def __init__(self, user_ids, num_examples: int):
        ids = _as_ids(user_ids)
        if len(ids) != num_examples:
            raise ConfigurationError(
                f"user_ids has {len(ids)} entries but the dataset has {num_examples} examples: give one user id per "
                "example, in the dataset's order (engine.data_loader(dataset, user_ids=ids) with "
                "len(ids) == len(dataset))."
            )
        if torch.is_tensor(ids):
            _, inverse = torch.unique(ids, return_inverse=True)
        else:
            numbers: dict = {}
            try:
                inverse = torch.tensor([numbers.setdefault(u, len(numbers)) for u in ids], dtype=torch.long)
            except TypeError as err:
                raise ConfigurationError(f"user_ids must be hashable (ints or strings): {err}.") from None
        self.key = ids
        self.user_of_example = inverse.long().reshape(-1)
        self.num_users = int(self.user_of_example.max()) + 1 if num_examples else 0
        self.order = torch.argsort(self.user_of_example, stable=True)
        counts = torch.bincount(self.user_of_example, minlength=self.num_users)
        self.starts = torch.zeros(self.num_users + 1, dtype=torch.long)
        self.starts[1:] = torch.cumsum(counts, 0)

    def same_ids(self, other: "UserIndex") -> bool:
        """Whether ``other`` was built from the same user ids (same values, same order)."""
        a, b = self.key, other.key
        if torch.is_tensor(a) and torch.is_tensor(b):
            return a.shape == b.shape and bool(torch.equal(a, b))
        return not torch.is_tensor(a) and not torch.is_tensor(b) and a == b


def _as_ids(user_ids):
    """One id per example as a 1-D integer tensor (tensors, integer arrays) or a tuple of hashables."""
    if not torch.is_tensor(user_ids) and hasattr(user_ids, "dtype") and hasattr(user_ids, "tolist"):  # numpy, pandas
        kind = getattr(user_ids.dtype, "kind", "O")
        user_ids = torch.tensor(user_ids.tolist()) if kind in "iu" else tuple(user_ids.tolist())
    if torch.is_tensor(user_ids):
        if user_ids.dim() != 1 or user_ids.is_floating_point() or user_ids.is_complex():
            raise ConfigurationError(
                f"user_ids as a tensor must be 1-D with an integer dtype (one id per example). Found shape "
                f"{tuple(user_ids.shape)}, dtype {user_ids.dtype}. Pass ids.long().flatten(), or a list."
            )
        return user_ids.detach().cpu().long().clone()
    if isinstance(user_ids, (str, bytes)) or not hasattr(user_ids, "__iter__"):
        raise ConfigurationError(
            f"user_ids must be a sequence or a 1-D tensor with one user id per example. Found "
            f"{type(user_ids).__name__}. For a dataset with a user column pass the column, e.g. "
            "user_ids=dataset['author']."
        )
    return tuple(user_ids)


def sample_users(index: UserIndex, sample_rate: float, max_per_user: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of user-level Poisson sampling.

    Each user joins with probability ``q`` (one float64 coin per user); each sampled
    user keeps ``min(k, n_u)`` of its ``n_u`` examples, chosen uniformly without
    replacement (uniform keys, the ``k`` smallest). Both draws use ``generator`` only.

    Returns:
        ``(indices, slots)``: the sampled example indices (ascending) and, for each, the slot
        ``0..S-1`` of its user among the ``S`` sampled users (users in ascending number).
    """
    coins = torch.rand(index.num_users, generator=generator, dtype=torch.float64)
    users = (coins < sample_rate).nonzero().flatten()
    counts = index.starts[users + 1] - index.starts[users]
    slot = torch.repeat_interleave(torch.arange(users.numel()), counts)  # (candidates,)
    first = torch.cumsum(counts, 0) - counts  # where each sampled user's candidates start
    position = index.starts[users][slot] + torch.arange(slot.numel()) - first[slot]
    candidates = index.order[position]
    if counts.numel() and int(counts.max()) > max_per_user:
        keys = torch.rand(slot.numel(), generator=generator, dtype=torch.float64)
        by_key = torch.argsort(keys)
        ranked = by_key[torch.argsort(slot[by_key], stable=True)]  # each user's candidates in random order
        rank = torch.empty_like(ranked)
        rank[ranked] = torch.arange(ranked.numel()) - first[slot[ranked]]
        keep = rank < max_per_user
        candidates, slot = candidates[keep], slot[keep]
    ascending = torch.argsort(candidates)
    return candidates[ascending], slot[ascending]


class UserPoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps_per_epoch`` batches of user-level Poisson samples (see :func:`sample_users`).

    ``on_batch(indices, slots)`` is told about every batch as it is drawn (the engine's
    queue of sampled batches), ``on_epoch()`` when an epoch starts (how many batches a
    resumed run already consumed), as for the example-level sampler.
    """

    def __init__(self, index: UserIndex, max_per_user: int, sample_rate: float, generator: torch.Generator,
                 steps_per_epoch: int, on_batch: Callable | None = None, on_epoch: Callable | None = None,
                 share: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.index, self.max_per_user, self.sample_rate = index, max_per_user, sample_rate
        self.generator, self.steps_per_epoch = generator, steps_per_epoch
        self.on_batch, self.on_epoch, self.share = on_batch, on_epoch, share

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        start = (self.on_epoch() or 0) if self.on_epoch is not None else 0
        for _ in range(start, self.steps_per_epoch):
            indices, slots = sample_users(self.index, self.sample_rate, self.max_per_user, self.generator)
            if self.share is not None:  # several processes: the same draw everywhere, each keeps its users
                mine = self.share(slots)
                indices, slots = indices[mine], slots[mine]
            if self.on_batch is not None:
                self.on_batch(indices, slots)
            yield indices.tolist()


class UserSampling:
    """The engine's loaders: example-level Poisson sampling, or users with their ids remembered per dataset.

    Args:
        privacy_unit: ``"example"`` or ``"user"`` (the DP settings'; ``"example"`` when noise-free).
        max_per_user: ``k`` with users, else None.
    """

    def __init__(self, privacy_unit: str = "example", max_per_user: int | None = None):
        self.privacy_unit, self.max_per_user = privacy_unit, max_per_user
        self.indexes: dict[int, tuple[object, UserIndex]] = {}  # id(dataset) -> (the dataset, its user index)

    @classmethod
    def for_privacy(cls, settings) -> "UserSampling":
        """The loaders of an engine with these privacy settings (None: noise-free, example-level)."""
        return cls() if settings is None else cls(settings.privacy_unit, settings.max_examples_per_user)

    def make_loader(self, dataset, user_ids, sample_rate: float | None, batch_size: int | None,
                    generator: torch.Generator, sampled: SampledBatches, plan: GroupingPlan, *, dp: bool,
                    micro_batch_size: int, keeps_order: bool, sampler_factory: Callable | None = None,
                    share: Callable[[torch.Tensor], torch.Tensor] | None = None, **loader_kwargs):
        """``engine.data_loader``: returns ``(loader, q, size)`` where ``size`` counts examples, or users."""
        if self.privacy_unit != "user":
            if user_ids is not None:
                raise ConfigurationError(
                    "engine.data_loader(..., user_ids=...) needs user-level DP: attach with privacy=DP(..., "
                    "privacy_unit='user', max_examples_per_user=k) (and micro_batch_size=k), or drop user_ids."
                )
            loader, q = make_loader(dataset, sample_rate, batch_size, generator, sampled, plan, dp=dp,
                                    micro_batch_size=micro_batch_size, keeps_order=keeps_order,
                                    sampler_factory=sampler_factory, **loader_kwargs)
            return loader, q, len(dataset)
        k = self.max_per_user
        if k is None or sample_rate is None:  # attach validates both in user mode
            raise ConfigurationError("privacy_unit='user' needs DP(sample_rate=q, max_examples_per_user=k).")
        if user_ids is None:
            raise ConfigurationError(
                "privacy_unit='user' needs each example's user id: engine.data_loader(dataset, user_ids=ids) with "
                "one id per example (a list, a 1-D integer tensor, or a dataset column such as dataset['author'])."
            )
        if sampler_factory is not None and share is None:
            raise ConfigurationError(
                "privacy_unit='user' with several processes needs dp_microclip.distributed.attach (its loader keeps "
                "each sampled user's examples on one rank)."
            )
        physical = check_physical_batch_size(loader_kwargs.pop("max_physical_batch_size", None), False)
        if physical is not None and physical < k:
            raise ConfigurationError(
                f"max_examples_per_user={k} is larger than max_physical_batch_size={physical}: a user's micro-batch "
                "is clipped as a whole, so it must fit one physical chunk. Use max_physical_batch_size >= "
                f"{k}, or a smaller max_examples_per_user."
            )
        if batch_size is not None:
            raise ConfigurationError(
                "engine.data_loader(..., batch_size=...) with privacy_unit='user': the expected number of users "
                "per step is q U, set by DP(sample_rate=q). Drop batch_size."
            )
        if k > 1 and "collate_fn" in loader_kwargs and not keeps_order:
            raise PrivacyError(
                "engine.data_loader(..., collate_fn=...) with privacy_unit='user': each row's user slot follows "
                "its row, so a collate_fn that reorders rows would move examples between users' micro-batches. "
                "Use a collate_fn that keeps rows in order and declare it with collate_keeps_order=True."
            )
        index = self._index(dataset, user_ids)
        if index.num_users == 0:
            raise ConfigurationError("engine.data_loader(dataset): the dataset is empty.")
        plan.use_loader(sample_rate * index.num_users)  # the public divisor M = round(q U)

        def factory(num_records, q, gen, steps, num_groups, on_batch, on_epoch):
            return UserPoissonBatchSampler(index, k, q, gen, steps, on_batch, on_epoch, share=share)

        # Physical chunks keep every user's rows together (sampling.plan_chunks keeps whole groups): each chunk's
        # clipped mean is over the public M, so the chunks of one sampled batch add up to its one-shot step.
        sampled.max_physical = physical
        loader = poisson_loader(dataset, sample_rate, generator, on_batch=sampled.on_batch,
                                on_epoch=sampled.on_epoch, sampler_factory=factory,
                                physical=sampled if physical is not None else None, **loader_kwargs)
        return loader, float(sample_rate), index.num_users

    def _index(self, dataset, user_ids) -> UserIndex:
        """The dataset's user index; refuses ids that differ from an earlier call's for the same dataset."""
        if isinstance(user_ids, str):  # a column name
            try:
                user_ids = dataset[user_ids]
            except Exception as err:
                raise ConfigurationError(
                    f"user_ids={user_ids!r}: the dataset has no such column ({type(err).__name__}: {err}). Pass the "
                    "ids themselves, one per example."
                ) from None
        index = UserIndex(user_ids, len(dataset))
        earlier = self.indexes.get(id(dataset))
        if earlier is not None and earlier[0] is dataset and not earlier[1].same_ids(index):
            raise PrivacyError(
                "engine.data_loader(dataset, user_ids=...) was given other user ids for this dataset than before. "
                "With privacy_unit='user' a person must stay one user for the whole training: examples moved to "
                "another id (or split between ids) would be clipped in several micro-batches, beyond the "
                "sensitivity C the epsilon assumes. Pass the same user ids in every epoch."
            )
        self.indexes[id(dataset)] = (dataset, index)
        return index
