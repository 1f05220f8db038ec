"""The engine's side of DP: which mechanism each step ran, the ledger, the budget.

The rules (which noise the accountant sees, what is refused) live in
``accounting/`` only; this module describes each step to it and never decides
a sensitivity itself. See docs/privacy.md and docs/accounting.md.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

from accounting.epochs import steps_for_epochs as steps_from_epochs  # noqa: F401  (one definition)
from accounting.epochs import steps_per_epoch  # noqa: F401

from accounting.calibrate import max_steps_within

from .errors import ConfigurationError, PrivacyError
from .grouping import missing_public_groups

#: Models that took DP steps under an engine in this process, with how many: a new engine on the same
#: model refuses epsilon until the old ledger is loaded (see ``check_history``).
DP_HISTORY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class PrivacySettings:
    """The DP mechanism and the guarantee asked for, validated by ``attach``; frozen so that
    nothing changes the mechanism without the ledger seeing it."""

    micro_batch_size: int
    clipping: str
    grouping: str
    sample_rate: float
    noise_multiplier: float
    delta: float | None
    target_epsilon: float | None
    planned_steps: int | None
    sampling: str  # "engine" (engine.data_loader) | "poisson" (declared by the user) | "shuffle"
    adjacency: str
    accountant: str
    enforce_budget: bool
    calibrated: bool = False  # noise_multiplier came from calibrate() for exactly planned_steps and this accountant


def _refusal_to_error(err: Exception) -> PrivacyError:
    message = str(err)
    return PrivacyError(message if message.startswith("No epsilon") else f"No privacy guarantee: {message}")


class PrivacyState:
    """Owns the ledger of one DP engine and answers epsilon / budget questions."""

    def __init__(self, settings: PrivacySettings):
        import accounting

        self.settings = settings
        self._accounting = accounting
        self.ledger = accounting.Ledger()
        self.unverified_steps = 0  # steps whose batch did not come from engine.data_loader
        self._allowed: dict = {}  # mechanism -> total steps verified to stay within the target
        self.check_mechanism()

    @staticmethod
    def calibrate(*, target_epsilon, delta, sample_rate, steps, micro_batch_size, adjacency, sampling,
                  accountant) -> float:
        """The engine's noise multiplier that reaches ``target_epsilon`` after ``steps`` steps."""
        from accounting.calibrate import noise_multiplier_for_epsilon

        try:
            return noise_multiplier_for_epsilon(
                target_epsilon, delta, sample_rate=sample_rate, steps=steps, micro_batch_size=micro_batch_size,
                adjacency=adjacency, grouping="keyed", sampling=_accounting_sampling(sampling),
                accountant=accountant,
            )
        except ValueError as err:
            raise _refusal_to_error(err) from err

    def mechanism(self, noise_on: bool):
        """The accounting ``Mechanism`` of one step with the current settings."""
        s = self.settings
        return self._accounting.Mechanism(
            sample_rate=s.sample_rate,
            noise_multiplier=s.noise_multiplier if noise_on else None,
            micro_batch_size=s.micro_batch_size,
            adjacency=s.adjacency,
            grouping=s.grouping,
            sampling=_accounting_sampling(s.sampling),
            clipping=s.clipping,
        )

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Use ``noise_multiplier`` from the next step on; every later ledger entry records it."""
        # A changed z is no longer the calibrated one: the budget is then checked by computation again.
        self.settings = dataclasses.replace(self.settings, noise_multiplier=float(noise_multiplier), calibrated=False)
        self._allowed.clear()
        self.check_mechanism()

    def check_mechanism(self) -> None:
        """Raise PrivacyError now if the accountant would refuse this mechanism with its noise on."""
        try:
            self._accounting.effective_noise_multiplier(self.mechanism(noise_on=True))
        except ValueError as err:
            raise _refusal_to_error(err) from err

    def before_step(self, noise_on: bool) -> None:
        """Budget enforcement: raise before a step that would take epsilon past the target."""
        s = self.settings
        if not (s.enforce_budget and s.target_epsilon is not None):
            return
        if not noise_on:
            raise PrivacyError(
                f"Budget enforcement: a step with engine.noise = False makes epsilon infinite, above the target "
                f"{s.target_epsilon}. Turn noise back on, or attach with enforce_budget=False to allow it."
            )
        if self.ledger.steps + 1 > self._allowed_steps():
            raise PrivacyError(
                f"Privacy budget exhausted: one more step would take epsilon above target_epsilon="
                f"{s.target_epsilon} at delta={s.delta} ({self.ledger.steps} steps taken). Stop training, or "
                "attach with a larger target_epsilon or enforce_budget=False."
            )

    def _allowed_steps(self) -> int:
        """Total steps (history included) within the target under the current mechanism, cached."""
        s = self.settings
        mech = self.mechanism(noise_on=True)
        key = (mech, self.ledger.steps if self.ledger.first_nonprivate_step is not None else None)
        if key in self._allowed and self._allowed[key] > self.ledger.steps:
            return self._allowed[key]
        def within(extra: int) -> bool:
            return self.ledger.epsilon_after(mech, extra, s.delta, accountant=s.accountant) <= s.target_epsilon

        if s.planned_steps is not None and s.planned_steps > self.ledger.steps and self._plan_holds():
            # A z the engine calibrated itself (same accountant, same planned steps, every step so far on the
            # planned mechanism) was verified to reach at most the target by calibrate(): no second, slow epsilon
            # computation at the first step. A z the user chose is checked, not trusted: one computation.
            if s.calibrated or within(s.planned_steps - self.ledger.steps):
                self._allowed[key] = s.planned_steps
                return s.planned_steps

        lo = max_steps_within(within)
        self._allowed[key] = self.ledger.steps + lo
        return self._allowed[key]

    def _plan_holds(self) -> bool:
        """True while every step so far ran the calibrated mechanism (so the calibration covers them)."""
        entries = self.ledger.entries
        planned = self.mechanism(noise_on=True)
        return all(e.mechanism == planned for e in entries)

    def after_step(self, noise_on: bool, sampled_by_engine: bool) -> None:
        """Record one step on the ledger (noting a batch the engine did not sample)."""
        if not sampled_by_engine and self.settings.sampling == "engine":
            self.unverified_steps += 1
        self.ledger.record(self.mechanism(noise_on))

    def epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        """Epsilon of the ledger at ``delta``, or PrivacyError where no valid number exists."""
        s = self.settings
        delta = self._delta(delta)
        self._check_sampling_verified()
        try:
            return float(self.ledger.epsilon(delta, accountant=accountant or s.accountant))
        except ValueError as err:
            raise _refusal_to_error(err) from err

    def statement(self, delta: float | None = None, dataset_size: int | None = None,
                  public_num_groups: int | None = None) -> str:
        """The plain-language statement; refuses (like :meth:`epsilon`) where no epsilon can be reported."""
        from accounting.statement import privacy_statement

        s = self.settings
        delta = self._delta(delta)
        self._check_sampling_verified()  # the same refusal as epsilon(), before any number is written
        try:
            text = privacy_statement(
                self.ledger, delta, accountant=s.accountant, sampling_declared_by_user=s.sampling == "poisson",
                dataset_size=dataset_size,
            )
        except ValueError as err:
            raise _refusal_to_error(err) from err
        if public_num_groups is not None:
            size = f"N = {dataset_size}" if dataset_size is not None else "N"
            text += (
                f" The dataset size {size}, and with it the public number of micro-batches M = {public_num_groups} "
                "that divides the noisy sum, are treated as public (as Opacus treats N): neighbouring datasets "
                "would give the same M only if M is fixed in advance, e.g. with attach(..., "
                "privacy=DP(expected_batch_size=...)) "
                "from a public size."
            )
        return text

    def _delta(self, delta: float | None) -> float:
        """The delta asked for, or attach's; refuses when neither was given."""
        delta = self.settings.delta if delta is None else delta
        if delta is None:
            raise ConfigurationError("epsilon needs a delta: engine.epsilon(delta=1e-5), or attach(..., "
                                     "privacy=DP(delta=1e-5)).")
        return delta

    def _check_sampling_verified(self) -> None:
        if self.unverified_steps:
            raise PrivacyError(
                f"No epsilon: {self.unverified_steps} step(s) used batches that did not come from "
                "engine.data_loader(...), so the engine cannot vouch for Poisson sampling. Use "
                "engine.data_loader(dataset), or attach(..., privacy=DP(sampling=\"poisson\")) to declare that your "
                "own "
                "loader samples each record independently with probability sample_rate."
            )

    def state_dict(self) -> dict:
        """The ledger and the count of unverified steps (plain data)."""
        return {"ledger": self.ledger.state_dict(), "unverified_steps": self.unverified_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.ledger.load_state_dict(state["ledger"])
        self.unverified_steps = int(state["unverified_steps"])
        self._allowed.clear()


def _accounting_sampling(sampling: str) -> str:
    return "shuffle" if sampling == "shuffle" else "poisson"


# ================================================================ the DP step guards
def check_dp_step(passes: int, forward_passes: int, public_num_groups: int | None, *, chunks: int = 1,
                  logical_batches: int = 1, most_passes_per_forward: int = 1, foreign: bool = False) -> None:
    """Refuse a DP step that is not one forward and one backward pass of one sampled batch, or of each
    physical chunk of one sampled batch (``engine.data_loader(..., max_physical_batch_size=...)``).

    Args:
        passes: backward passes since the last step.
        forward_passes: distinct forward passes those backward passes came from.
        public_num_groups: the public ``M`` (None: not known yet).
        chunks: physical chunks of the step's logical batch the model consumed.
        logical_batches: sampled logical batches that began since the last step.
        most_passes_per_forward: the most backward passes any one forward pass reached.
        foreign: some backward pass came from a batch ``engine.data_loader`` did not draw.

    Raises:
        PrivacyError: gradient accumulation or several forward passes in one step (chunks of one sampled
            batch excepted: each in one forward and one backward pass), several sampled batches in one step.
        ConfigurationError: the public number of groups is not known.
    """
    if chunks > 1:
        if logical_batches > 1:
            raise PrivacyError(
                f"{logical_batches} sampled batches of engine.data_loader reached the model before one "
                "optimizer.step() in DP mode: each step must be one Poisson-sampled batch (accumulating batches "
                "would change the public normaliser). Call optimizer.step() after every chunk the loader yields."
            )
        if foreign or most_passes_per_forward > 1 or forward_passes != chunks:
            raise PrivacyError(
                f"A DP step of a sampled batch in {chunks} physical chunks got {forward_passes} forward pass(es) "
                f"with a backward pass{', one of them backpropagated twice' if most_passes_per_forward > 1 else ''}"
                f"{', and a batch not drawn by engine.data_loader' if foreign else ''}. Each chunk must reach the "
                "model in exactly one forward and one backward pass, and nothing else may join the step: "
                "for x, y in loader: optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()."
            )
        if public_num_groups is None:
            raise missing_public_groups()
        return
    if passes > 1:
        raise PrivacyError(
            f"{passes} backward passes before one optimizer.step() in DP mode: each step must be "
            "one Poisson-sampled batch with one backward pass (gradient accumulation would change the "
            "public normaliser). Use a larger sample_rate instead of accumulation."
        )
    if forward_passes > 1:
        raise PrivacyError(
            f"{forward_passes} forward passes of the model contributed to one step in DP mode. Each "
            "step must be one forward pass of one sampled batch: two batches in one step double each record's "
            "chance to be in the step, and two views of the same record (augmentations, each its own "
            "model() call) each get their own clipping budget, so one record moves the sum by more than the "
            "sensitivity the epsilon assumes. Compute all views of a record inside ONE call of the attached "
            "model (e.g. a wrapper module that runs the network on every view and averages), so each record "
            "stays one example with one clipped gradient."
        )
    if public_num_groups is None:
        raise missing_public_groups()


def check_history(inherited_steps: int) -> None:
    """Refuse an epsilon that would leave out DP steps the model took under an earlier engine."""
    if inherited_steps:
        raise PrivacyError(
            f"No epsilon: this model already took {inherited_steps} DP step(s) under an earlier engine, "
            "and this engine's ledger does not hold them, so its epsilon would cover only part of the "
            "training. Carry the history: new_engine.load_state_dict(old_engine.state_dict())."
        )
