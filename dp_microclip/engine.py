"""The ``Engine``: micro-batch clipping on an unchanged model and optimizer (built by ``attach``, attach.py).

The engine coordinates; owned parts do the work (docs/engine.md maps them):
the hooks (``hooks.py``) capture into a sink (``capture.py``), each backward
pass becomes clipped means (``aggregate.py``, ``routes.py``), the step writes
``p.grad`` (``step.py``), DP state and guards live in ``privacy.py``, sampling
in ``sampling.py``. Multi-process training plugs its parts in through the
constructor (:class:`ProcessParts`), never by writing attributes.

The engine only adds hooks and switches ``requires_grad`` off on the parameters it
computes itself (autograd would compute an unclipped weight gradient and throw it
away); ``detach()`` undoes all of it. docs/privacy.md states the rules it enforces.

Example:
    >>> import torch, dp_microclip
    >>> model = torch.nn.Linear(4, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=1.0)
    >>> model(torch.randn(8, 4)).square().mean().backward(); opt.step(); engine.detach()
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from . import privacy as dp_rules
from .aggregate import EarlyReduction, clip_and_sum, joined_norms
from .capture import CaptureSink
from .errors import ConfigurationError, PrivacyError
from .fused import NonfiniteCount
from .grouping import Groups, GroupingPlan
from .hooks import HookSet
from .observers import ObserverHandle, check_observer
from .noise import SECURE_STATEMENT, NoiseLike, NoiseSource, SecureNoiseSource
from .records import Record, Unit, join_multi_output
from .routes import Autotuner
from .settings import ENGINE_READ_ONLY as _READ_ONLY
from .settings import EngineSettings, check_positive_finite
from .loss_contract import LossContract
from .step import ProcessParts, StepAccumulator, hold_update, refuse_closure, step_bound, write_gradients
from .units import check_optimizer_parameters, summarize
from .users import SampledBatches, UserSampling
from .verify import FirstStepCheck, compare_with_autograd


class Engine:
    """Owns every hook, flag change and per-step state of one attachment. Create it with :func:`attach`.

    Settings that change the mechanism are read-only (``micro_batch_size``,
    ``max_grad_norm``, ``clipping``, ``grouping``, ``noise_multiplier``,
    ``sample_rate``): assigning one raises. The noise multiplier changes only
    through :meth:`set_noise_multiplier`, which the ledger records; noise is
    toggled with ``engine.noise``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: EngineSettings,
                 units: list[Unit], managed: list[nn.Parameter], root_batch_dim: int | None,
                 privacy: dp_rules.PrivacyState | None = None, sample_rate: float | None = None,
                 public_num_groups: int | None = None, verify_steps: int = 1, parts: ProcessParts | None = None):
        self._model, self._optimizer, self._settings, self._privacy = model, optimizer, settings, privacy
        self._parts, self._sample_rate, self._noise_on = parts or ProcessParts(), sample_rate, privacy is not None
        self._plan = GroupingPlan(settings.clip.micro_batch_size, settings.grouping, privacy is not None,
                                  settings.num_groups, public_num_groups)
        self._dataset_size: int | None = None

        inner = SecureNoiseSource() if settings.secure_rng else NoiseSource(settings.seed)
        base_seed = NoiseSource(settings.seed).seed if inner.seed is None else inner.seed  # None: secure_rng
        self._noise: NoiseLike = self._parts.wrap_noise(inner) if self._parts.wrap_noise else inner
        self._group_generator = torch.Generator().manual_seed(base_seed ^ 0x5DEECE66D)
        self._sampling_generator = torch.Generator().manual_seed(base_seed ^ 0x2545F491)
        self._sampled = SampledBatches(self._sampling_generator)
        self._loaders = UserSampling.for_privacy(None if privacy is None else privacy.settings)

        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        # DP mode: version counters of the model's tensors (privacy.StateWatch) and the parameters' history.
        self._watch = dp_rules.StateWatch(model, managed, self._names, optimizer) if privacy is not None else None
        self._tuner = Autotuner()  # lean mode reduces some records as they arrive: while nothing reads them later
        self._sink = CaptureSink(self._make_groups, self._finish_pass, self._watch, EarlyReduction(
            settings.clip, self._tuner, lambda: not (self._check.running or self._observers)))
        self._observers: list = []
        self._acc = StepAccumulator()
        self._steps_taken = 0
        self._nonfinite = NonfiniteCount()  # counted when read: no host read and no launch per step
        self._last_norms: list = []  # ((M,) norms, scale) per context of the latest pass
        self.last_strategies: dict[str, str] = {}
        self._inherited_steps = dp_rules.DP_HISTORY.steps_of(model.parameters()) if privacy is not None else 0
        self._tracker = dp_rules.DP_HISTORY.tracker(managed) if privacy is not None else None

        self._units, self._managed = units, managed
        self._managed_ids = {id(p) for p in managed}
        check_optimizer_parameters(optimizer, self._managed_ids, self._names)

        self._original_requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        self._hooks = HookSet(self._sink, root_batch_dim, probe_failure_is_error=privacy is not None)
        for unit in units:
            self._hooks.install_unit(unit)
        self._hooks.install_root(model)
        self._check = FirstStepCheck(managed, verify_steps, lambda: self._sink.enabled, self.dp, self._parts.placement)
        self._loss = LossContract.for_engine(settings.clip, privacy.settings if privacy else None, self._sink.warn_once)
        self._step_handles = (optimizer.register_step_pre_hook(self._before_step),
                              optimizer.register_step_post_hook(self._after_step))

    # ================================================================ settings (read-only)
    model = property(lambda self: self._model, doc="The attached model (read-only: detach, then attach another).")
    optimizer = property(lambda self: self._optimizer, doc="The attached optimizer (read-only).")
    settings = property(lambda self: self._settings, doc="The frozen settings ``attach`` validated.")
    steps_taken = property(lambda self: self._steps_taken,
                           doc="Optimizer steps taken through this engine (restored by ``load_state_dict``).")
    micro_batch_size = property(lambda self: self._settings.clip.micro_batch_size,
                                doc="``b``: examples per micro-batch (the clipping unit).")
    max_grad_norm = property(lambda self: self._settings.clip.max_grad_norm,
                             doc="``C``; for per-layer clipping the bound of the whole vector, ``sqrt(sum C_l^2)``.")
    clipping = property(lambda self: self._settings.clip.mode,
                        doc='The clipping mode: "fixed", "adaptive", "per_layer" or "normalize".')
    grouping = property(lambda self: self._plan.mode,
                        doc='How examples form micro-batches now: "contiguous" or "keyed".')
    dp = property(lambda self: self._privacy is not None,
                  doc="Whether the engine runs in DP mode (noise, a ledger, refusals).")
    sample_rate = property(lambda self: self._sample_rate,
                           doc="``q``: the probability that a record joins a batch of ``engine.data_loader``.")
    last_groups = property(lambda self: self._sink.last_groups,
                           doc="The groups of the latest forward pass (which micro-batch each row joined).")
    nonfinite_groups = property(lambda self: self._nonfinite.value(), doc="Micro-batches with a NaN/inf gradient "
                                "so far (each contributed zero): a 0-d device tensor once a pass ran; reading waits.")

    @property
    def last_group_norms(self) -> torch.Tensor | None:
        """The micro-batch gradient norms of the latest backward pass (joined on access, not every step)."""
        return joined_norms(self._last_norms)

    @property
    def noise_multiplier(self) -> float | None:
        """``z``: noise std over the clipping bound. Change it with :meth:`set_noise_multiplier`."""
        return None if self._privacy is None else self._privacy.settings.noise_multiplier

    def __setattr__(self, name, value):
        if name in _READ_ONLY and "_settings" in self.__dict__:
            raise AttributeError(_READ_ONLY[name].format(name=name))
        super().__setattr__(name, value)

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Change ``z`` from the next step on (a noise schedule); the ledger records every step's ``z``.

        Raises:
            ConfigurationError: noise-free engines have no ``z``; ``z`` must be finite and > 0
                (``engine.noise = False`` is the way to train without noise, which makes epsilon infinite).
        """
        if self._privacy is None:
            raise ConfigurationError(
                "This engine is noise-free (no ledger). Attach with privacy=dp_microclip.DP(noise_multiplier=...) "
                "or DP(target_epsilon=...) for DP training."
            )
        self._privacy.set_noise_multiplier(check_positive_finite("noise_multiplier", noise_multiplier))

    # ================================================================ public API
    def add_observer(self, observer, *, release_unnoised: bool = False) -> ObserverHandle:
        """Call ``observer.on_pass(engine, records, result)`` after every backward pass and
        ``observer.on_step(engine)`` after every step (either method may be missing).

        The seam for diagnostics (``dp_microclip.tools.diagnostics``): ``records`` are the pass's
        captured layer calls, ``result`` its :class:`~dp_microclip.aggregate.PassResult` (group
        norms, clip factors). Observers must not change either. Returns a handle with ``remove()``.
        In DP mode they see un-noised statistics: refused unless ``release_unnoised=True``, which the
        privacy statement then reports (``observers.py``).
        """
        check_observer(observer, self.dp, release_unnoised)
        if self._privacy is not None:
            self._privacy.unnoised_observed = True
        self._observers.append(observer)
        return ObserverHandle(self._observers, observer)

    def loss(self, loss_fn: Callable, *args, **kwargs) -> torch.Tensor:
        """``loss_fn(*args, **kwargs)``, one loss per example ``(B,)``, reduced by ``loss_reduction``: the scalar
        to call ``.backward()`` on. The reduction cannot mismatch, and DP mode checks on the first batch of each
        signature that each example's loss depends on that example only (``loss_contract.py``, docs/privacy.md).

        Example: ``engine.loss(F.cross_entropy, model(x), y, reduction="none").backward()``.
        """
        return self._loss.reduce(loss_fn, args, kwargs, self._acc.last_batch_size, self._sink.last_groups)

    @contextlib.contextmanager
    def silenced(self) -> Iterator[None]:
        """Run forward and backward passes the engine does not capture (diagnostics' own probes).

        Inside, the hooks record nothing and no micro-batch is drawn; gradients that reach
        ``p.grad`` there are the caller's business, not a training step.
        """
        with self._sink.replay():
            yield

    @property
    def noise(self) -> bool:
        """Whether the next steps add Gaussian noise. A step without noise makes epsilon infinite."""
        return self._noise_on

    @noise.setter
    def noise(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ConfigurationError(f"engine.noise takes True or False. Found {value!r}.")
        if value and not self.noise_multiplier:
            raise ConfigurationError(
                "engine.noise = True needs a noise multiplier: attach(..., privacy=dp_microclip.DP("
                "noise_multiplier=z, ...)) or DP(target_epsilon=eps, ...)."
            )
        self._noise_on = value

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped sum (before dividing by the number of groups)."""
        return (self.noise_multiplier or 0.0) * self.max_grad_norm

    def data_loader(self, dataset, batch_size: int | None = None, *, user_ids=None,
                    collate_keeps_order: bool | None = None, max_physical_batch_size: int | None = None,
                    **loader_kwargs) -> torch.utils.data.DataLoader:
        """A DataLoader with Poisson sampling at the engine's ``sample_rate``: the sampling epsilon is computed for.

        Each record joins each batch independently with probability ``q``; one epoch is ``round(1/q)`` steps;
        batches are ragged, maybe empty. DP mode fixes the public number of groups ``M = round(q N / b)``; rows
        must reach the model in index order (with ``b > 1`` a custom ``collate_fn`` needs ``collate_keeps_order=
        True``). ``DP(privacy_unit="user")`` samples users instead: at most ``k`` examples, one micro-batch each.

        Args:
            dataset: a map-style dataset of ``N`` records.
            batch_size: the expected batch size ``q N``; needed only without a sample rate (noise-free).
            user_ids: with ``privacy_unit="user"``, one user id per example (list, tensor, column name).
            collate_keeps_order: your ``collate_fn`` keeps rows in the order of the samples it gets.
            max_physical_batch_size: at most this many examples (whole micro-batches) per forward pass; the
                update waits for a sampled batch's last chunk (docs/privacy.md). ``len(loader)`` counts batches.
            **loader_kwargs: passed to ``DataLoader`` (num_workers, collate_fn, ...).
        """
        keeps_order = collate_keeps_order if collate_keeps_order is not None else self._settings.collate_keeps_order
        loader, q, size = self._loaders.make_loader(
            dataset, user_ids, self._sample_rate, batch_size, self._sampling_generator, self._sampled, self._plan,
            dp=self.dp, micro_batch_size=self.micro_batch_size, keeps_order=keeps_order,
            sampler_factory=self._parts.sampler_factory, share=self._parts.share,
            max_physical_batch_size=max_physical_batch_size, **loader_kwargs,
        )
        self._sample_rate, self._dataset_size = q, size
        if self._privacy is not None:
            dp_rules.warn_large_delta(self._privacy.settings.delta, size)
        return loader

    def take_empty_batch(self) -> None:
        """Take an empty batch of ``engine.data_loader`` without a forward (HF models cannot run on 0 rows)."""
        self._make_groups(self._sampled.next_is_empty(), torch.device("cpu"))  # then optimizer.step(): noise only

    def epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        """Epsilon of everything trained so far at ``delta`` (default: attach's delta).

        ``inf`` when the engine trains noise-free or any step ran with noise off.

        Raises:
            PrivacyError: when no valid number exists (e.g. batches not from
                ``engine.data_loader`` without a declaration, or a model that trained
                under an earlier engine whose ledger was not loaded); never a guess.
        """
        if self._privacy is None:
            return math.inf
        self._check_claim()
        return self._privacy.epsilon(delta, accountant)

    def privacy_statement(self, delta: float | None = None) -> str:
        """A plain-language statement of the guarantee (adjacency, sampling, grouping, micro-batching)."""
        if self._privacy is None:
            return ("Noise-free training: no differential-privacy guarantee (epsilon is infinite). "
                    "Attach with privacy=dp_microclip.DP(...) for DP training.")
        self._check_claim()
        text = self._privacy.statement(delta, self._dataset_size, self._plan.public_num_groups)
        text += SECURE_STATEMENT if self._settings.secure_rng else ""
        seeded = self._settings.seed is not None and not self._parts.seed_is_secret
        return text + (dp_rules.SEEDED_STATEMENT if seeded else "")

    def _check_claim(self) -> None:
        """Refuse a claim the ledger does not cover: history not carried, parameters changed outside the
        attached optimizer, sampled batches used without an engine step."""
        assert self._privacy is not None and self._watch is not None  # DP mode only
        dp_rules.check_history(self._inherited_steps, self._privacy.ledger.steps)
        if self._sink.enabled:
            self._watch.check_params("after the last engine step")
        dp_rules.check_unstepped(self._acc.passes, len(self._acc.contexts))

    def detach(self) -> None:
        """Remove every hook and restore every ``requires_grad`` flag; the model then trains as before.

        A graph built before ``detach()`` still holds tensor hooks; they see the
        engine disabled and do nothing.
        """
        if not self._sink.enabled:
            return
        self._sink.enabled = False
        self._hooks.remove()
        for handle in self._step_handles:
            handle.remove()
        if self._watch is not None:
            self._watch.remove()
        self._check.remove()
        self._loss.dp = False  # the model trains as before: engine.loss only reduces
        for p in self._model.parameters():
            if id(p) in self._original_requires_grad:
                p.requires_grad_(self._original_requires_grad[id(p)])
        self._acc = StepAccumulator()

    def summary(self) -> str:
        """One line per hooked unit: module path, type, path taken, parameters."""
        return summarize(self._units, f"dp_microclip engine: micro_batch_size={self.micro_batch_size}, clipping="
                         f"{self.clipping!r}, grouping={self.grouping!r}, grad_mode={self._settings.clip.grad_mode!r}, "
                         f"noise={'on' if self.noise else 'off'}")

    def state_dict(self, include_rng_state: bool = False) -> dict:
        """What a resumed run needs: the step count, the noise setting, the privacy ledger, the loader's position.

        Args:
            include_rng_state: also save the states of the noise, grouping and sampling generators, so that a
                resumed run is bitwise the same as an uninterrupted one. Those states predict every future noise
                draw: a checkpoint that holds them must stay as secret as the training data. Without them
                (default) a resumed run draws fresh randomness, which is just as private.
        """
        state = {
            "steps_taken": self._steps_taken, "noise_on": self._noise_on, "noise_multiplier": self.noise_multiplier,
            "epoch_position": self._sampled.epoch_position,
            "privacy": None if self._privacy is None else self._privacy.state_dict(), "rng": None,
        }
        if include_rng_state:
            if self._settings.secure_rng:
                raise ConfigurationError(
                    "include_rng_state=True with secure_rng=True: secure noise has no state to save. Save without it."
                )
            state["rng"] = {"noise": self._noise.state_dict(), "group_generator": self._group_generator.get_state(),
                            "sampling_generator": self._sampled.sampler_state.clone()}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict`: the ledger (epsilon continues), the noise setting, the loader's position.

        Call it before iterating a new ``engine.data_loader(...)``: its first epoch continues where the run stopped.
        """
        if (state["privacy"] is None) != (self._privacy is None):
            raise ConfigurationError("This state_dict comes from an engine with a different DP mode.")
        self._steps_taken = int(state["steps_taken"])
        self._noise_on = bool(state["noise_on"])
        if self._privacy is not None:
            # The model may hold a checkpoint's values now (loaded after attach): its history is looked up again,
            # and a state whose ledger is shorter than the steps already known would rewind it: refused.
            self._inherited_steps = max(self._inherited_steps, dp_rules.DP_HISTORY.steps_of(self._model.parameters()))
            self._privacy.load_state_dict(state["privacy"], known_steps=self._inherited_steps)
            assert self._watch is not None  # DP mode
            self._watch.params_stepped()  # the resume point: the loaded values are the reference
            if state.get("noise_multiplier") is not None and state["noise_multiplier"] != self.noise_multiplier:
                self.set_noise_multiplier(state["noise_multiplier"])
        self._sampled.resume_position = int(state.get("epoch_position", 0))
        rng = state.get("rng")
        if rng is not None:
            self._noise.load_state_dict(rng["noise"])
            self._group_generator.set_state(rng["group_generator"])
            self._sampling_generator.set_state(rng["sampling_generator"])
            self._sampled.sampler_state = rng["sampling_generator"].clone()

    # ================================================================ backward passes (called by the sink)
    def _make_groups(self, batch_size: int, device: torch.device, inputs=None) -> tuple[Groups, bool]:
        """The batch's groups, and whether engine.data_loader drew this batch (its rows in their order)."""
        from_loader, drawn = self._sampled.take(batch_size, inputs, self._hooks.root_batch_dim)
        self._acc.new_forward(batch_size, self._sampled.last_taken, self.dp)
        return self._plan.groups(batch_size, device, drawn, self._group_generator), from_loader

    def _finish_pass(self, records: list[Record]) -> None:
        autograd_grads = self._check.take()
        records = join_multi_output(records)
        # Only batches that reach a backward pass count: an evaluation forward outside torch.no_grad()
        # does not make the step unverified.
        drawn = self._acc.note_contexts(records)
        if self._check.running:
            for problem in compare_with_autograd(records, autograd_grads, self._names, self._sink.replay):
                self._sink.report(problem)
        result = clip_and_sum(records, self._settings.clip, self._sink.replay,  # observers read the records
                              lambda ctx: self._plan.divisor(ctx.groups), self._tuner, not self._observers)
        self._acc.add(result, chunk=drawn and self._acc.batch_chunks > 0, fixed_divisor=self._plan.fixed_divisor)
        self._nonfinite.add(result.nonfinite_masks)
        if result.norm_parts:
            self._last_norms = result.norm_parts
        self.last_strategies = result.strategies
        for observer in list(self._observers):
            if hasattr(observer, "on_pass"):
                observer.on_pass(self, records, result)

    # ================================================================ the step
    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self._sink.enabled:
            return
        refuse_closure(args, kwargs)
        check_optimizer_parameters(self._optimizer, self._managed_ids, self._names)
        acc = self._acc
        problems = self._sink.take_problems()
        if problems:
            self._acc = StepAccumulator()
            raise ConfigurationError("dp_microclip refused this step:\n" + "\n".join(f"  - {p}" for p in problems))
        if not acc.finish_batch():  # a physical chunk: the update waits for the logical batch's last chunk
            return hold_update(self._managed)
        empty_batch = acc.passes == 0 and acc.last_batch_size == 0
        if acc.passes == 0 and not (self.dp and empty_batch):
            if self.dp:
                raise PrivacyError(
                    "optimizer.step() was called with no backward pass since the last step; in DP mode "
                    "every step must come from a sampled batch. Call loss.backward() first."
                )
            if self._parts.reducer is None:
                return  # like plain PyTorch with no gradients: the optimizer has nothing to do
            # Several processes: the other ranks may have gradients; this rank joins their reduction with none.
        if self._privacy is not None and self._watch is not None:
            self._watch.check_params("since the last engine step")
            dp_rules.check_dp_step(acc.passes, len(acc.contexts), self._plan.public_num_groups, **acc.chunk_facts())
            loss_verified = self._loss.step_verified(acc.passes)
            self._privacy.before_step(self._noise_on, not acc.unsampled)
            if empty_batch:
                assert self._plan.public_num_groups is not None  # check_dp_step refuses a step without it
                acc.groups_seen = float(self._plan.public_num_groups)
        if self._parts.reducer is not None:
            # Several processes: combine the clipped means, the group counts and the smallest group norm of
            # every rank before noise is added, so every rank takes the same step.
            global_groups = (self._plan.mode == "keyed" and self.micro_batch_size > 1
                             and self._plan.num_groups is not None)
            self._parts.reducer(self._managed, acc, self.dp, global_groups)
        rho = step_bound(self.clipping, acc, self._sink.warn_once)
        write_gradients(self._managed, acc, rho=rho, noise_std=self.noise_std if self._noise_on else 0.0,
                        noise=self._noise, placement=self._parts.placement)
        if self._privacy is not None:
            self._privacy.after_step(self._noise_on, not acc.unsampled, loss_verified)
        self._acc = StepAccumulator()
        self._steps_taken += 1
        for observer in list(self._observers):
            if hasattr(observer, "on_step"):
                observer.on_step(self)
        self._check.step_done()

    def _after_step(self, optimizer, args, kwargs) -> None:
        """DP mode, after the attached optimizer's update: its versions are the reference; record the history."""
        if self._privacy is not None and self._sink.enabled and self._watch and self._tracker:
            self._watch.params_stepped()
            self._tracker.record(self._privacy.ledger.steps)


