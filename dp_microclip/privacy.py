"""The engine's side of DP: which mechanism each step ran, the ledger, the budget.

The rules (which noise the accountant sees, what is refused) live in
``accounting/`` only; this module describes each step to it and never decides
a sensitivity itself. See docs/privacy.md and docs/accounting.md.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


from accounting.calibrate import max_steps_within

from .errors import ConfigurationError, PrivacyError, user_stacklevel
from .grouping import missing_public_groups
from .history import HISTORY
from .loss_contract import loss_statement

#: Parameters that took DP steps under an engine in this process, by object and by value (history.py): a new
#: engine on a model holding them refuses epsilon until the old ledger is loaded (see ``check_history``).
DP_HISTORY = HISTORY


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
    privacy_unit: str = "example"  # "user": neighbours differ by one user (grouping "user", docs/user-level.md)
    max_examples_per_user: int | None = None  # k, the public contribution bound of a user per step
    require_verified_loss: bool = False  # refuse a step whose loss did not go through engine.loss


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
        self.unnoised_observed = False  # an observer opted in to un-noised statistics (add_observer)
        self.unverified_loss_steps = 0  # steps whose loss did not go through engine.loss (loss_contract.py)
        self._allowed: dict = {}  # mechanism -> total steps verified to stay within the target
        self.check_mechanism()

    @staticmethod
    def calibrate(*, target_epsilon, delta, sample_rate, steps, micro_batch_size, adjacency, sampling,
                  accountant, privacy_unit="example", max_examples_per_user=None) -> float:
        """The engine's noise multiplier that reaches ``target_epsilon`` after ``steps`` steps."""
        from accounting.calibrate import noise_multiplier_for_epsilon

        try:
            return noise_multiplier_for_epsilon(
                target_epsilon, delta, sample_rate=sample_rate, steps=steps, micro_batch_size=micro_batch_size,
                adjacency=adjacency, grouping="user" if privacy_unit == "user" else "keyed",
                sampling=_accounting_sampling(sampling), accountant=accountant, privacy_unit=privacy_unit,
                max_examples_per_user=max_examples_per_user,
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
            privacy_unit=s.privacy_unit,
            max_examples_per_user=s.max_examples_per_user,
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

    def before_step(self, noise_on: bool, sampled_by_engine: bool = True) -> None:
        """Raise before a step from a batch ``engine.data_loader`` did not draw (without a declared sampling),
        and before a step that would take epsilon past the target (budget enforcement)."""
        s = self.settings
        if not sampled_by_engine and s.sampling == "engine":
            raise PrivacyError(
                "This DP step's batch did not come from engine.data_loader(...), so the engine cannot vouch for "
                "the Poisson sampling epsilon is computed for (a shuffled DataLoader samples differently). Use "
                "engine.data_loader(dataset), or attach(..., privacy=DP(sampling=\"poisson\")) to declare that your "
                "own loader samples each record independently with probability sample_rate."
            )
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
        target, delta = s.target_epsilon, s.delta
        assert target is not None and delta is not None  # before_step checks target; attach requires delta with it
        def within(extra: int) -> bool:
            return self.ledger.epsilon_after(mech, extra, delta, accountant=s.accountant) <= target

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

    def after_step(self, noise_on: bool, sampled_by_engine: bool, loss_verified: bool = True) -> None:
        """Record one step on the ledger (noting a batch the engine did not sample, a loss it did not verify)."""
        if not sampled_by_engine and self.settings.sampling == "engine":
            self.unverified_steps += 1
        self.unverified_loss_steps += not loss_verified
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
        text += loss_statement(self.unverified_loss_steps, self.ledger.steps)
        if self.unnoised_observed:
            text += (" Un-noised statistics of the private batches (batch sizes, micro-batch gradient norms) were "
                     "observed (engine.add_observer(..., release_unnoised=True)); epsilon does not cover anything "
                     "released from them.")
        if public_num_groups is not None and s.privacy_unit == "user":
            text += (f" The number of users U{'' if dataset_size is None else f' = {dataset_size}'}, and with it "
                     f"the divisor M = round(q U) = {public_num_groups} (the expected users per step), are treated "
                     "as public; fix M from a public count with DP(expected_batch_size=...) otherwise.")
        elif public_num_groups is not None:
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
        return {"ledger": self.ledger.state_dict(), "unverified_steps": self.unverified_steps,
                "unnoised_observed": self.unnoised_observed, "unverified_loss_steps": self.unverified_loss_steps}

    def load_state_dict(self, state: dict, known_steps: int = 0) -> None:
        """Restore what :meth:`state_dict` saved; refuse a ledger shorter than ``known_steps`` or this one."""
        check_rewind(sum(int(e["steps"]) for e in state["ledger"]["entries"]), known_steps, self.ledger.steps)
        self.ledger.load_state_dict(state["ledger"])
        self.unverified_steps = int(state["unverified_steps"])
        self.unnoised_observed = self.unnoised_observed or bool(state.get("unnoised_observed", False))
        self.unverified_loss_steps = int(state.get("unverified_loss_steps", self.ledger.steps))  # older: unknown
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
                "for x, y in loader: optimizer.zero_grad(); engine.loss(loss_fn, model(x), y).backward(); "
                "optimizer.step()."
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


def check_history(inherited_steps: int, ledger_steps: int) -> None:
    """Refuse an epsilon that would leave out DP steps the model's parameters took under an earlier engine."""
    if inherited_steps > ledger_steps:
        raise PrivacyError(
            f"No epsilon: this model's parameters already took {inherited_steps} DP step(s) under an earlier "
            f"engine (the same parameters, or a copy of their values: a wrapper, nn.Sequential(*m), "
            f"copy.deepcopy or a loaded state dict), and this engine's ledger holds {ledger_steps}, so its epsilon "
            "would cover only part of the training. Carry the history: "
            "new_engine.load_state_dict(old_engine.state_dict())."
        )


def check_rewind(loaded_steps: int, inherited_steps: int, own_steps: int) -> None:
    """Refuse an engine state whose ledger holds fewer DP steps than this model or this engine already took."""
    known = max(inherited_steps, own_steps)
    if loaded_steps < known:
        raise PrivacyError(
            f"engine.load_state_dict: the state's ledger holds {loaded_steps} DP step(s), but this model's "
            f"parameters (or this engine) already took {known}: a stale state would rewind the ledger and "
            "under-report epsilon. Load the state saved after the latest step: "
            "new_engine.load_state_dict(old_engine.state_dict()) taken when training stopped."
        )


def check_unstepped(passes: int, forward_passes: int) -> None:
    """Refuse an epsilon while backward passes beyond one wait for a step (their batches trained nothing
    the ledger saw, or something other than the attached optimizer used them)."""
    if passes > 1 or forward_passes > 1:
        raise PrivacyError(
            f"No epsilon: {max(passes, forward_passes)} backward passes of sampled batches were consumed since "
            "the last engine step. Each sampled batch must reach the attached optimizer.step() (one forward and "
            "one backward per step): a batch used without an engine step is not on the ledger."
        )


def warn_seeded(seed, secure_rng: bool) -> None:
    """``seed=`` in DP mode: the noise is reproducible from it. With ``secure_rng`` a seed is refused."""
    if seed is None:
        return
    if secure_rng:
        raise ConfigurationError(
            f"attach(..., seed={seed!r}) with privacy=DP(secure_rng=True): the sampling and grouping coins would "
            "be predictable from the seed while the statement says the randomness is secure. Drop seed= "
            "(secure_rng draws the noise from the OS and seeds the coins from the OS)."
        )
    warnings.warn(
        f"attach(..., seed={seed!r}) in DP mode: the noise (and the sampling) is reproducible from the seed, so "
        "anyone who knows it can subtract the noise and the guarantee is void. Leave seed unset in real DP runs; "
        "privacy_statement() says the run was seeded.", UserWarning, stacklevel=user_stacklevel())


SEEDED_STATEMENT = (" The run was seeded (attach(..., seed=...)): the noise is reproducible from the seed, so the "
                    "guarantee holds only while the seed stays as secret as the data.")


def warn_large_delta(delta: float | None, dataset_size: int) -> None:
    """Warn when ``delta >= 1/N``: such a delta allows releasing a whole record."""
    if delta is not None and delta >= 1.0 / dataset_size:
        warnings.warn(
            f"delta={delta} is at least 1/N = 1/{dataset_size}: a mechanism that publishes one whole record at "
            f"random meets this delta. Use delta well below 1/N, e.g. privacy=DP(delta={_below(dataset_size)}).",
            UserWarning, stacklevel=user_stacklevel())


def _below(n: int) -> str:
    return f"{10.0 ** -math.ceil(math.log10(n) + 1):g}"


# ================================================================ what changes the parameters and buffers
class StateWatch:
    """DP mode's watch over the model's tensors, by their version counters (no value is read).

    * Between two engine steps only the attached optimizer may change a managed parameter:
      the versions are recorded after each step (the optimizer's step post-hook) and compared
      at the next step and at ``epsilon()``.
    * No forward pass may change a parameter or buffer in place (or replace one): the versions
      are recorded when the root forward starts (after the layout probe, which restores what it
      touched) and compared when it ends.
    * Every other optimizer's step on a managed parameter is refused when it starts.

    Args:
        model: the attached model.
        managed: the parameters the engine clips.
        names: ``id(param) -> name`` for messages.
        attached: the attached optimizer.
    """

    def __init__(self, model: torch.nn.Module, managed: list, names: dict, attached: torch.optim.Optimizer):
        self._modules = [(name or type(model).__name__, m) for name, m in model.named_modules()]
        self._managed, self._names = managed, names
        self._managed_ids = frozenset(id(p) for p in managed)
        self._attached = attached
        self._versions = self._param_versions()
        self._forward: list | None = None
        ref = weakref.ref(self)

        def other_optimizer(optimizer, args, kwargs):
            watch = ref()
            if watch is not None:
                watch.check_optimizer(optimizer)

        self._handle = register_optimizer_step_pre_hook(other_optimizer)

    def _param_versions(self) -> list[int]:
        return [p._version for p in self._managed]

    def check_params(self, when: str) -> None:
        """Raise if a managed parameter changed since the attached optimizer's last step (or attach)."""
        changed = [self._names.get(id(p), "?") for p, v in zip(self._managed, self._versions) if p._version != v]
        if changed:
            raise PrivacyError(
                f"DP mode: parameter(s) {changed} were changed {when} by something other than the attached "
                "optimizer (a manual update such as p -= lr * p.grad, a second optimizer, SAM's extra step, "
                "model.load_state_dict or copy_ after attach). That update is not clipped, noised or on the "
                "ledger. Update the parameters only with the attached optimizer.step(); load checkpoints "
                "into the model before attach()."
            )

    def params_stepped(self) -> None:
        """The attached optimizer just updated the parameters: their versions are the new reference."""
        self._versions = self._param_versions()

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse a step of an optimizer other than the attached one that holds a managed parameter."""
        if optimizer is self._attached:
            return
        held = [self._names.get(id(p), "?") for g in optimizer.param_groups for p in g["params"]
                if id(p) in self._managed_ids]
        if held:
            raise PrivacyError(
                f"DP mode: {type(optimizer).__name__}.step() would update {held[:5]}, parameters of a DP "
                "engine, but it is not the optimizer given to attach(): its update would use no clipped, "
                "noised gradient and no ledger entry (an optimizer re-created after attach, an LR finder, "
                "SAM, a second optimizer). Step only the attached optimizer, or engine.detach() and "
                "attach(model, new_optimizer, ...) with engine.load_state_dict(old_state) to carry the ledger."
            )

    def forward_started(self) -> None:
        """Record the version of every parameter and buffer as a DP forward pass starts."""
        self._forward = [(name, kind, tensors, key, t, t._version) for name, m in self._modules
                         for kind, tensors in (("parameter", m._parameters), ("buffer", m._buffers))
                         for key, t in tensors.items() if t is not None]

    def forward_ended(self) -> None:
        """Raise naming each module whose parameter or buffer the forward changed or replaced."""
        recorded, self._forward = self._forward, None
        if recorded is None:
            return
        changed = [f"{name} ({kind} {key!r})" for name, kind, tensors, key, t, version in recorded
                   if tensors.get(key) is not t or t._version != version]
        if changed:
            raise PrivacyError(
                f"DP mode: the forward pass changed the model's state in place: {changed}. State updated from a "
                "batch (running statistics, a hand-written running normaliser, Embedding(max_norm=...) "
                "renormalising rows) is released without noise in model.state_dict(). Compute it without "
                "updating state in a training forward (e.g. register it as a constant, or update it only under "
                "torch.no_grad() on public data), or use a module that keeps no batch state (nn.GroupNorm)."
            )

    def remove(self) -> None:
        """Stop watching other optimizers (``detach``)."""
        self._handle.remove()


def check_distributed_sampling(sampling: str) -> None:
    """Under several processes in DP mode only the distributed loader's sampling is accepted."""
    if sampling != "engine":
        raise PrivacyError(
            f"privacy=DP(sampling={sampling!r}) under dp_microclip.distributed: each rank running its own loader "
            "samples its own batch, so a record can be in several ranks' shares of one step and its inclusion "
            "probability is not the sample_rate the ledger records. Remove sampling= (the default \"engine\") and "
            "draw batches with engine.data_loader(dataset) (dp_microclip.distributed.data_loader), which gives "
            "each rank its share of one global Poisson batch."
        )
