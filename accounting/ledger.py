"""The step history of one training run, and its epsilon.

The ledger is the privacy record of a run, in the spirit of dp_accounting's
``PrivacyAccountant`` (its ``DpEventBuilder`` ledger): each step's
:class:`~accounting.mechanism.Mechanism` is validated before anything is
mutated, consecutive identical steps are merged (run-length), and epsilon is
computed from the whole history on demand by a backend. A step without noise
is recorded, not refused, and makes epsilon infinite from then on: the ledger
never reports the epsilon of the noisy steps alone.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from accounting import backends
from accounting.backends import AccountantSpec, Segment
from accounting.errors import PrivacyRefusal
from accounting.mechanism import Mechanism
from accounting.sensitivity import effective_noise_multiplier

STATE_FORMAT = "dp-microclip.accounting.ledger"
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """``steps`` consecutive identical steps.

    Attributes:
        effective_noise_multiplier: the z the accountant sees (z / 2 for
            b > 1), or None for a non-private step (no noise).
        sample_rate: Poisson sampling rate q of these steps.
        steps: how many steps.
        mechanism: the full description, as recorded.
    """

    effective_noise_multiplier: float | None
    sample_rate: float
    steps: int
    mechanism: Mechanism

    @property
    def is_private(self) -> bool:
        """Whether this entry's steps added noise (False makes epsilon infinite)."""
        return self.effective_noise_multiplier is not None

    def segment(self) -> Segment:
        """The entry as a backend segment."""
        return Segment(self.effective_noise_multiplier, self.sample_rate, self.steps)


def _entry(mechanism: Mechanism, steps: int) -> LedgerEntry:
    """Validate one mechanism and build its entry (raises before any mutation)."""
    if not isinstance(mechanism, Mechanism):
        raise TypeError(f"record() takes an accounting.Mechanism. Found {type(mechanism).__name__}.")
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1. Found {steps!r}.")
    z = effective_noise_multiplier(mechanism)  # raises PrivacyRefusal for a refused noisy step
    return LedgerEntry(
        effective_noise_multiplier=z if mechanism.is_private else None,
        sample_rate=mechanism.sample_rate,
        steps=int(steps),
        mechanism=mechanism,
    )


class Ledger:
    """Records every step of a run and answers epsilon for it.

    One ledger reports one adjacency: recording a step whose adjacency
    differs from the steps already recorded is refused.

    Example:
        >>> ledger = Ledger()
        >>> ledger.record(Mechanism(sample_rate=0.01, noise_multiplier=1.0), steps=100)
        >>> ledger.steps, round(ledger.epsilon(1e-5, accountant="rdp"), 2)
        (100, 1.21)
    """

    def __init__(self) -> None:
        self._entries: list[LedgerEntry] = []
        # The last answer and what it was for: a statement right after epsilon() (engine, CLI) costs one
        # PRV/PLD computation, not two. The key holds the whole history, so a new step never hits it.
        self._last_answer: tuple | None = None

    # ----------------------------------------------------------------- recording
    def record(self, mechanism: Mechanism, steps: int = 1) -> None:
        """Append ``steps`` steps of ``mechanism``, merged with the last entry if identical.

        Args:
            mechanism: what each step did. noise_multiplier None or 0 records
                non-private steps (epsilon becomes infinite), not an error.
            steps: how many steps (>= 1).

        Raises:
            PrivacyRefusal: a noisy step of a shape with no guarantee, or an
                adjacency other than the one already recorded. The ledger is
                unchanged.
            ValueError: ``steps`` is not an integer >= 1.
        """
        entry = _entry(mechanism, steps)
        self._check_adjacency(entry.mechanism.adjacency)
        self._check_unit(entry.mechanism.privacy_unit)
        last = self._entries[-1] if self._entries else None
        if last is not None and last.mechanism == entry.mechanism:
            self._entries[-1] = dataclasses.replace(last, steps=last.steps + entry.steps)
        else:
            self._entries.append(entry)

    def _check_adjacency(self, adjacency: str) -> None:
        if self._entries and adjacency != self.adjacency:
            raise PrivacyRefusal(
                f'This ledger holds steps under adjacency="{self.adjacency}"; a step under '
                f'adjacency="{adjacency}" cannot be composed with them into one guarantee. Record every step '
                f'with adjacency="{self.adjacency}", or start a new Ledger().'
            )

    def _check_unit(self, unit: str) -> None:
        if self._entries and unit != self.privacy_unit:
            raise PrivacyRefusal(
                f'This ledger holds steps with privacy_unit="{self.privacy_unit}"; a step with privacy_unit="{unit}" '
                "protects another unit, so the two cannot be composed into one guarantee. Train with one privacy "
                "unit throughout, or start a new Ledger()."
            )

    # ---------------------------------------------------------------- inspection
    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """The history, run-length merged, oldest first."""
        return tuple(self._entries)

    @property
    def steps(self) -> int:
        """Total number of steps recorded, private or not."""
        return sum(e.steps for e in self._entries)

    @property
    def adjacency(self) -> str:
        """The adjacency of the recorded steps ("add_remove" when empty)."""
        return self._entries[0].mechanism.adjacency if self._entries else "add_remove"

    @property
    def privacy_unit(self) -> str:
        """What the recorded steps protect: "example" or "user" ("example" when empty)."""
        return self._entries[0].mechanism.privacy_unit if self._entries else "example"

    @property
    def first_nonprivate_step(self) -> int | None:
        """0-based index of the first step taken without noise, or None if every step was noisy."""
        done = 0
        for e in self._entries:
            if not e.is_private:
                return done
            done += e.steps
        return None

    def history(self) -> tuple[Segment, ...]:
        """The history as backend segments (accountant's z, q, steps)."""
        return tuple(e.segment() for e in self._entries)

    # ------------------------------------------------------------------- epsilon
    def epsilon(self, delta: float, accountant: AccountantSpec = "prv") -> float:
        """Epsilon at ``delta`` of every step recorded so far.

        Args:
            delta: target delta in (0, 1); take it below 1 / dataset_size.
            accountant: "prv" (default, tight), "pld" (tight, dp_accounting),
                "rdp" (fast upper bound), "rdp_google", or a backend object
                such as ``PldBackend(value_discretization_interval=1e-3)``.

        Returns:
            0.0 with no steps; ``math.inf`` if any step was taken without
            noise (see ``first_nonprivate_step``); otherwise the backend's
            epsilon for the whole history.

        Raises:
            ValueError: delta out of range, or an unknown accountant.
            PrivacyRefusal: the backend cannot analyse this ledger's adjacency.
        """
        backends.check_delta(delta)
        backend = backends.resolve(accountant)
        if self.first_nonprivate_step is not None:
            return math.inf
        key = (self.history(), self.adjacency, float(delta), accountant)
        if self._last_answer is not None and self._last_answer[0] == key:
            return self._last_answer[1]
        eps = backend.epsilon(key[0], delta, adjacency=self.adjacency)
        self._last_answer = (key, eps)
        return eps

    def epsilon_after(
        self, mechanism: Mechanism, extra_steps: int, delta: float, accountant: AccountantSpec = "prv"
    ) -> float:
        """Epsilon if ``extra_steps`` more steps of ``mechanism`` were taken (for budget checks).

        The ledger itself is not changed. ``extra_steps=0`` gives the current
        epsilon.

        Raises:
            PrivacyRefusal, ValueError: as :meth:`record` and :meth:`epsilon`.
        """
        if not isinstance(extra_steps, numbers.Integral) or isinstance(extra_steps, bool) or extra_steps < 0:
            raise ValueError(f"extra_steps must be an integer >= 0. Found {extra_steps!r}.")
        future = self.copy()
        if extra_steps:
            future.record(mechanism, extra_steps)
        else:
            _entry(mechanism, 1)  # still refuse a mechanism that could never be recorded
        return future.epsilon(delta, accountant)

    def copy(self) -> "Ledger":
        """An independent ledger with the same history."""
        other = Ledger()
        other._entries = list(self._entries)
        return other

    # ------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """The history as plain JSON-able data (``json.dumps`` works on it)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "entries": [{"mechanism": e.mechanism.to_dict(), "steps": e.steps} for e in self._entries],
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the history with one from :meth:`state_dict`.

        Every entry is validated (the rules may have become stricter since it
        was written) before the ledger is changed.

        Raises:
            ValueError: not a ledger state of a known version, or an invalid entry.
            PrivacyRefusal: an entry is a noisy step the current rules refuse.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"Not a ledger state_dict (expected format {STATE_FORMAT!r}). Pass the dict returned by "
                "Ledger.state_dict()."
            )
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"Ledger state_dict version {state.get('version')!r} is not supported (this version reads "
                f"{STATE_VERSION}). Load it with the dp-microclip version that wrote it."
            )
        fresh = Ledger()
        for raw in state.get("entries", []):
            fresh.record(Mechanism.from_dict(raw["mechanism"]), raw["steps"])
        self._entries = fresh._entries

    @classmethod
    def from_state_dict(cls, state: dict) -> "Ledger":
        """A new ledger holding the history of ``state``."""
        ledger = cls()
        ledger.load_state_dict(state)
        return ledger

    def __repr__(self) -> str:
        return f"Ledger(steps={self.steps}, entries={len(self._entries)}, adjacency={self.adjacency!r})"
