"""Typed, frozen settings: what ``attach`` validated once and the engine only reads.

Every setting that changes the mechanism (b, C, clipping, grouping, the noise
multiplier, the sample rate) lives in a frozen dataclass, so that
``engine.settings.micro_batch_size = 4`` raises instead of silently changing
what the ledger believes. The one setting with a legitimate schedule, the noise
multiplier, changes through :meth:`dp_microclip.Engine.set_noise_multiplier`,
which records the new mechanism on the ledger.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from accounting.mechanism import CLIPPINGS as CLIPPING_MODES  # noqa: F401  (re-exported: one list of clipping modes)

from .errors import ConfigurationError

#: How batches are sampled: "engine" (engine.data_loader), or the accounting module's declared samplings.
SAMPLINGS = ("engine", "poisson", "shuffle")
GRAD_MODES = ("auto", "bookkeeping", "materialize", "func")
GROUPINGS = ("auto", "contiguous", "keyed")
LOSS_REDUCTIONS = ("mean", "sum")
FALLBACKS = (None, "generic", "error")
#: What DP protects: one example, or one user with all of their examples (docs/user-level.md).
PRIVACY_UNITS = ("example", "user")
NONFINITE_POLICIES = ("skip", "raise")


#: Share of the device's free memory the engine's own per-group tensors may take when no budget is given.
DEFAULT_FREE_FRACTION = 0.5


@dataclass(frozen=True)
class MemoryBudget:
    """How much memory the engine's own per-group tensors may hold in one backward pass (``attach(memory_budget=)``).

    The engine computes each layer's clipped gradient by one of several exact routes (``routes.py``); they
    differ only in speed and in what they build: per-group gradients ``(M, *param.shape)``, Gram matrices
    ``(M, N, N)`` of the ghost norms, scaled copies of the output gradients. Before it times anything, the
    engine plans each route's peak from the tensors' shapes (``planner.py``) and never builds one that
    would exceed the budget. When no route of a layer fits, it takes the leanest exact one and warns (or
    raises with ``strict=True``); the fix is a smaller physical batch,
    ``engine.data_loader(..., max_physical_batch_size=...)``.

    Give at most one of ``max_bytes`` and ``fraction_of_free``. With neither (the default) the budget is the
    size of everything the pass captured (the engine at most doubles what it holds), capped at half of the
    device's free memory.

    Attributes:
        max_bytes: an absolute budget in bytes (an int >= 1).
        fraction_of_free: a share in (0, 1] of the device's free memory, read at the first backward pass
            on each device (CUDA: ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of ``/proc/meminfo``).
        lean: hold as little as possible: per layer the route with the smallest planned peak, no timing, the
            captured tensors released as soon as they are used, and the weighted sums done in row chunks.
            Slower on layers where materialised group gradients would be faster; for models that barely fit.
        strict: raise :class:`dp_microclip.errors.ConfigurationError` instead of warning when even the
            leanest exact route of a layer exceeds the budget.

    Example:
        >>> MemoryBudget(max_bytes=2 * 2**30).max_bytes
        2147483648
    """

    max_bytes: int | None = None
    fraction_of_free: float | None = None
    lean: bool = False
    strict: bool = False

    def __post_init__(self):
        if self.max_bytes is not None and self.fraction_of_free is not None:
            raise ConfigurationError(
                "MemoryBudget: give max_bytes or fraction_of_free, not both (the budget is one number)."
            )
        if self.max_bytes is not None:
            if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, numbers.Integral) \
                    or self.max_bytes < 1:
                raise ConfigurationError(
                    f"MemoryBudget(max_bytes=...) must be a whole number of bytes >= 1. Found {self.max_bytes!r}; "
                    "e.g. max_bytes=4 * 2**30 for 4 GiB, or fraction_of_free=0.25."
                )
        if self.fraction_of_free is not None:
            f = self.fraction_of_free
            if not is_real(f) or not math.isfinite(float(f)) or not 0 < float(f) <= 1:
                raise ConfigurationError(
                    f"MemoryBudget(fraction_of_free=...) must be a number in (0, 1]. Found {f!r}; e.g. 0.25 for a "
                    "quarter of the device's free memory, or max_bytes=... for an absolute budget."
                )
        for name in ("lean", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"MemoryBudget({name}=...) must be True or False. "
                                         f"Found {getattr(self, name)!r}.")

    @property
    def explicit(self) -> bool:
        """Whether the user set a limit (otherwise the captured size, capped by half the free memory)."""
        return self.max_bytes is not None or self.fraction_of_free is not None


def memory_budget(value) -> MemoryBudget:
    """``attach(memory_budget=...)`` as a :class:`MemoryBudget`: None (the default), a MemoryBudget, ``"lean"``,
    an int (bytes) or a float in (0, 1] (a fraction of free device memory); anything else raises, naming the forms."""
    if value is None:
        return MemoryBudget()
    if isinstance(value, MemoryBudget):
        return value
    if isinstance(value, str):
        if value == "lean":
            return MemoryBudget(lean=True)
        raise ConfigurationError(f"memory_budget={value!r} is not understood. Use \"lean\", a number of bytes "
                                 "(an int), a fraction of free device memory (a float in (0, 1]) or MemoryBudget(...).")
    if isinstance(value, bool) or not is_real(value):
        raise ConfigurationError(
            f"memory_budget must be None, \"lean\", an int (bytes), a float in (0, 1] (a fraction of free device "
            f"memory) or a dp_microclip.MemoryBudget(...). Found {value!r}."
        )
    if isinstance(value, numbers.Integral):
        return MemoryBudget(max_bytes=int(value))
    return MemoryBudget(fraction_of_free=float(value))


def check_choice(name: str, value, allowed) -> None:
    """Raise a ConfigurationError naming the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ConfigurationError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def is_real(value) -> bool:
    """True for a real number that is not a bool (``True`` is an int in Python)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (bools refused), or ConfigurationError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}. Found {value!r}.")
    return int(value)


def check_positive_finite(name: str, value) -> float:
    """``value`` as a float, or a ConfigurationError when it is not a finite number > 0 (NaN and inf included)."""
    if not is_real(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ConfigurationError(f"{name} must be a finite number > 0. Found {value!r}.")
    return float(value)


def total_bound(raw) -> tuple[float, tuple[float, ...] | Mapping[str, float] | float]:
    """Validate ``max_grad_norm`` (a number, a list or a dict of per-parameter bounds).

    Returns ``(C, raw)`` where ``C = sqrt(sum C_l^2)`` is the bound of the whole
    clipped vector (the sensitivity for per-layer clipping), parsed once.
    """
    if isinstance(raw, Mapping):
        values = list(raw.values())
    elif isinstance(raw, Sequence) and not isinstance(raw, str):
        values = list(raw)
    else:
        return check_positive_finite("max_grad_norm", raw), float(raw)
    if not values:
        raise ConfigurationError("max_grad_norm: an empty list or dict of bounds. Give one bound per parameter.")
    for v in values:
        check_positive_finite("max_grad_norm (every per-parameter bound)", v)
    return math.sqrt(sum(float(v) ** 2 for v in values)), (dict(raw) if isinstance(raw, Mapping) else tuple(raw))


@dataclass(frozen=True)
class ClipSettings:
    """How each micro-batch gradient is clipped and how the engine computes it (validated by ``attach``).

    Attributes:
        micro_batch_size: ``b``, examples per micro-batch (the clipping unit).
        mode: ``"fixed"``, ``"adaptive"``, ``"per_layer"`` or ``"normalize"``.
        max_grad_norm: ``C``; for ``per_layer`` the bound of the whole vector, ``sqrt(sum C_l^2)``.
        per_param_bound: ``id(param) -> C_l`` (``per_layer`` only), filled once the units are known.
        gamma: the ``gamma`` of ``normalize``.
        loss_reduction: ``"mean"`` or ``"sum"`` of per-example losses.
        grad_mode: ``"auto"``, ``"bookkeeping"``, ``"materialize"`` or ``"func"``.
        on_nonfinite: ``"skip"`` (a group with a NaN/inf gradient contributes zero, counted) or ``"raise"``.
        memory: the :class:`MemoryBudget` the route choice keeps to.
    """

    micro_batch_size: int
    mode: str
    max_grad_norm: float
    per_param_bound: Mapping[int, float]
    gamma: float
    loss_reduction: str
    grad_mode: str
    on_nonfinite: str = "skip"
    memory: MemoryBudget = MemoryBudget()


@dataclass(frozen=True)
class EngineSettings:
    """Everything ``attach`` decided that is not clipping arithmetic.

    Attributes:
        clip: the :class:`ClipSettings`.
        raw_max_grad_norm: ``max_grad_norm`` as given (a dict/list for per-layer bounds).
        grouping: ``"contiguous"``, ``"keyed"`` or ``"auto"`` (contiguous for your own loader,
            keyed for ``engine.data_loader`` batches and in DP mode).
        num_groups: ``M`` for keyed grouping of your own batches (None: ``ceil(B / b)``).
        fallback: ``"generic"`` / ``"error"`` / None (generic noise-free, error in DP mode).
        batch_first: the model input's layout (None: dimension 0 unless the root declares one).
        seed: the seed of the engine's generators, or None (drawn from the OS).
        secure_rng: draw noise from the OS's cryptographically secure generator.
        collate_keeps_order: the user declares that a custom ``collate_fn`` keeps rows in index order.
    """

    clip: ClipSettings
    raw_max_grad_norm: object
    grouping: str
    num_groups: int | None
    fallback: str | None
    batch_first: bool | None
    seed: int | None
    secure_rng: bool
    collate_keeps_order: bool


@dataclass(frozen=True)
class DP:
    """Differential-privacy settings, as one object: ``attach(model, opt, ..., privacy=DP(...))``.

    Giving ``privacy`` turns on DP mode: Poisson sampling (``engine.data_loader``),
    keyed micro-batches, noise, a ledger, and refusals of anything without a valid
    guarantee. Use ``micro_batch_size=1`` for DP: with ``b > 1`` the sensitivity is
    ``2C`` (the accountant is given ``z / 2``), so the same ``z`` buys a larger epsilon.

    Attributes:
        noise_multiplier: ``z``; the clipped sum gets ``N(0, (z C)^2)`` noise per coordinate.
            Give it, or ``target_epsilon`` (with ``delta`` and ``steps`` or ``epochs``) to calibrate it.
        target_epsilon: the epsilon to reach after the planned steps; with ``enforce_budget``
            a step that would exceed it raises.
        delta: the delta of the guarantee (below ``1 / N``).
        sample_rate: ``q``, the probability that a record joins a batch (required).
        expected_batch_size: the public ``q N``; the number of micro-batches is ``round(q N / b)``
            (otherwise set by ``engine.data_loader`` from the dataset size, treated as public).
        steps: the planned length of training in steps.
        epochs: or in epochs (an epoch is ``round(1/q)`` steps).
        sampling: ``"engine"`` (batches must come from ``engine.data_loader``), ``"poisson"``
            (you declare that your loader samples each record independently with rate ``q``),
            ``"shuffle"`` (no epsilon).
        adjacency: ``"add_remove"`` or ``"replace_one"`` (where the accountant supports it).
        accountant: ``"prv"`` (Opacus PRV), ``"rdp"`` or ``"pld"`` (dp_accounting).
        enforce_budget: with ``target_epsilon``, raise before a step that would exceed it.
        secure_rng: draw the noise from the OS's cryptographically secure generator.
        collate_keeps_order: declare that a custom ``collate_fn`` keeps rows in order.
        privacy_unit: ``"example"`` (default) or ``"user"``: user-level DP, where neighbouring
            datasets differ by one user with all of their examples. ``engine.data_loader(dataset,
            user_ids=...)`` then samples users at rate ``q``, each sampled user's examples form one
            micro-batch (clipped to C: sensitivity C), and the divisor is ``round(q U)`` for ``U`` users;
            ``expected_batch_size`` then counts users. See docs/user-level.md.
        max_examples_per_user: ``k``, the public contribution bound of user-level DP: a sampled user
            contributes at most ``k`` examples per step, chosen uniformly among theirs. Required with
            ``privacy_unit="user"``; pass ``micro_batch_size=k`` to ``attach``.
        require_verified_loss: refuse a step whose loss did not go through ``engine.loss(loss_fn, ...)``, which
            checks that each example's loss depends on that example only (epsilon assumes it, and a coupled loss
            such as a class-weighted mean would make it wrong without a symptom). On by default, the safe side;
            ``False`` lets a loop that backpropagates its own loss run, with the known patterns still checked,
            one warning, and a privacy statement that says the loss was not verified (docs/privacy.md).

    Example:
        >>> from dp_microclip import DP
        >>> DP(target_epsilon=3.0, delta=1e-5, sample_rate=0.01, epochs=30).accountant
        'prv'
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    sample_rate: float | None = None
    expected_batch_size: float | None = None
    steps: int | None = None
    epochs: float | None = None
    sampling: str = "engine"
    adjacency: str = "add_remove"
    accountant: str = "prv"
    enforce_budget: bool = True
    secure_rng: bool = False
    collate_keeps_order: bool = False
    privacy_unit: str = "example"
    max_examples_per_user: int | None = None
    require_verified_loss: bool = True


#: The DP keywords ``attach`` still accepts directly (the fields of :class:`DP`), for existing code.


# ================================================================ the engine's read-only attributes
_MECHANISM_RO = "engine.{name} is read-only: it is part of the mechanism the ledger records."
_REATTACH_RO = " Detach and attach again with the new value (engine.state_dict() carries the privacy ledger)."
#: Public attributes that cannot be assigned, each with the message that says what to do instead.
ENGINE_READ_ONLY = {
    **{name: _MECHANISM_RO + _REATTACH_RO for name in ("micro_batch_size", "max_grad_norm", "clipping", "grouping",
                                                  "sample_rate", "settings", "dp", "noise_std", "last_groups")},
    "noise_multiplier": _MECHANISM_RO + " Use engine.set_noise_multiplier(z).",
    "steps_taken": "engine.steps_taken is read-only: the engine counts its own steps (engine.load_state_dict(...) "
                   "restores the count of a resumed run).",
    **{name: f"engine.{name} is read-only: the engine's hooks and flags belong to the {name} given to attach(), "
             "and detach() restores that one. Detach, then attach to the other one."
       for name in ("model", "optimizer")},
}
