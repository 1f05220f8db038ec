"""What one training step did, as data: the input of every privacy rule.

A :class:`Mechanism` describes one step of DP-SGD with micro-batch clipping
completely, so that ``sensitivity.py`` can decide the noise the accountant sees
and a backend can compute epsilon from it alone:

* Each record of the dataset joins the step's batch independently with
  probability ``sample_rate`` (Poisson sampling, ``sampling="poisson"``).
* The sampled records are split into micro-batches (the *clipping unit*, as in
  TF Privacy's ``num_microbatches``; not a memory chunk as in Opacus'
  ``BatchMemoryManager`` or JAX Privacy) of about ``micro_batch_size`` records.
  ``grouping="keyed"`` assigns each record to a group independently of every
  other record; ``grouping="contiguous"`` slices the batch by position.
* Each micro-batch gradient is clipped to norm ``C`` (``clipping``), the
  clipped gradients are summed, and Gaussian noise of standard deviation
  ``noise_multiplier * C`` is added (none when ``noise_multiplier`` is None or
  0: the step is then not private at all).

``noise_multiplier`` is the engine's z, relative to the clipping bound C. The
accountant's z, relative to the sensitivity of the sum, may differ: see
``sensitivity.effective_noise_multiplier``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

ADJACENCIES = ("add_remove", "replace_one")
GROUPINGS = ("keyed", "contiguous", "user")
#: What one neighbouring dataset adds or removes: one example, or one user with all of their examples.
PRIVACY_UNITS = ("example", "user")
SAMPLINGS = ("poisson", "shuffle")
CLIPPINGS = ("fixed", "per_layer", "normalize", "adaptive")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}. Found {value!r}.")


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """One step of micro-batch DP-SGD, as the accountant needs to know it.

    Frozen and hashable, so that the ledger can merge identical consecutive
    steps and the engine can use it as a dictionary key. Numbers are stored as
    plain Python floats and ints (numpy scalars are converted), so that the
    ledger's ``state_dict`` is plain JSON.

    Args:
        sample_rate: probability q that each record joins a step's batch. The
            epsilon is only valid if the loader really samples this way; with
            a fixed batch size of B out of N records, q = B / N describes
            Poisson sampling with the same expected batch size, not your loader.
        noise_multiplier: the engine's z: noise std over the clipping bound C.
            None or 0 means the step adds no noise, which makes the whole
            run's epsilon infinite (not an error: the ledger records it).
        micro_batch_size: b, records per clipping unit. With b > 1 the
            sensitivity of the clipped sum is 2C, so the accountant is given
            z / 2 (see ``sensitivity.py``).
        adjacency: "add_remove" (neighbouring datasets differ by one record
            added or removed; the default and what Opacus reports) or
            "replace_one" (one record replaced by another).
        grouping: "keyed" (each record's group is drawn independently of the
            others; required for b > 1) or "contiguous" (slices by position:
            refused for DP with b > 1).
        sampling: "poisson" or "shuffle" (shuffled epochs: refused, they are
            not Poisson sampling).
        clipping: "fixed", "per_layer" or "normalize" (the engine scales the
            noise so z stays relative to the total sensitivity: same rule as
            fixed), or "adaptive" (data-dependent bound: refused for DP).
        privacy_unit: "example" (neighbours differ by one example) or "user"
            (by one user with all of their examples; then ``sample_rate`` is the
            rate at which users are sampled, ``grouping`` must be "user": each
            sampled user's examples form one micro-batch, and the sensitivity
            is C whatever b is).
        max_examples_per_user: k, the public bound on a sampled user's examples
            per step (required with ``privacy_unit="user"``, None otherwise).

    Raises:
        ValueError: a field is out of range or not one of its choices; the
            message names the value found and the range allowed.

    Example:
        >>> Mechanism(sample_rate=256 / 60000, noise_multiplier=1.1, micro_batch_size=8).is_private
        True
    """

    sample_rate: float
    noise_multiplier: float | None
    micro_batch_size: int = 1
    adjacency: str = "add_remove"
    grouping: str = "keyed"
    sampling: str = "poisson"
    clipping: str = "fixed"
    privacy_unit: str = "example"
    max_examples_per_user: int | None = None

    def __post_init__(self) -> None:
        q = self.sample_rate
        if not _is_real(q) or not 0 < q <= 1:
            raise ValueError(
                f"sample_rate must be in (0, 1]. Found {q!r}. Pass the probability that a record "
                "joins a batch, e.g. expected_batch_size / dataset_size."
            )
        z = self.noise_multiplier
        if z is not None and (not _is_real(z) or not math.isfinite(z) or z < 0):
            raise ValueError(
                f"noise_multiplier must be None (no noise) or a finite number >= 0. Found {z!r}."
            )
        b = self.micro_batch_size
        if not isinstance(b, numbers.Integral) or isinstance(b, bool) or b < 1:
            raise ValueError(f"micro_batch_size must be an integer >= 1. Found {b!r}.")
        _check_choice("adjacency", self.adjacency, ADJACENCIES)
        _check_choice("grouping", self.grouping, GROUPINGS)
        _check_choice("sampling", self.sampling, SAMPLINGS)
        _check_choice("clipping", self.clipping, CLIPPINGS)
        _check_choice("privacy_unit", self.privacy_unit, PRIVACY_UNITS)
        self._check_unit()
        # Normalise numpy scalars and ints so equality, hashing and JSON behave.
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "noise_multiplier", None if z is None else float(z))
        object.__setattr__(self, "micro_batch_size", int(b))

    def _check_unit(self) -> None:
        k = self.max_examples_per_user
        if self.privacy_unit == "user":
            if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
                raise ValueError(f"privacy_unit='user' needs max_examples_per_user, an integer >= 1. Found {k!r}.")
            object.__setattr__(self, "max_examples_per_user", int(k))
            if self.grouping != "user":
                raise ValueError(f"privacy_unit='user' needs grouping='user' (each sampled user's examples form one "
                                 f"micro-batch). Found grouping={self.grouping!r}.")
        elif k is not None or self.grouping == "user":
            raise ValueError("max_examples_per_user and grouping='user' describe user-level DP: pass "
                             "privacy_unit='user' with them, or leave both out for example-level DP.")

    @property
    def is_private(self) -> bool:
        """True when the step adds noise; a step without noise makes epsilon infinite."""
        return self.noise_multiplier is not None and self.noise_multiplier > 0

    def to_dict(self) -> dict:
        """Plain JSON-able fields, for ``Ledger.state_dict``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "Mechanism":
        """Inverse of :meth:`to_dict`; validates like the constructor.

        Raises:
            ValueError: unknown or missing fields, or invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - names
        if unknown:
            raise ValueError(
                f"Unknown Mechanism field(s) {sorted(unknown)}; expected a subset of {sorted(names)}. "
                "Was this state_dict written by another version of dp-microclip?"
            )
        return cls(**fields)
