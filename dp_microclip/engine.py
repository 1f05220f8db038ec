"""The ``Engine``: micro-batch clipping on an unchanged model and optimizer (built by ``attach``, configure.py).

The engine only adds hooks (module hooks, one optimizer step pre-hook) and
switches the ``requires_grad`` flag of the parameters it computes itself, so
autograd does not compute an unclipped weight gradient it would throw away.
``detach()`` undoes all of it. docs/engine.md maps the files; docs/privacy.md
states the privacy rules the engine enforces.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import dp_microclip
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> engine = dp_microclip.attach(model, opt, micro_batch_size=2, max_grad_norm=1.0)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> nn.functional.cross_entropy(model(x), y).backward()
    >>> opt.step()
    >>> engine.detach()
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from . import grouping
from .batches import GroupingPlan, SampledBatches, missing_public_groups
from .aggregate import Autotuner, PassResult, clip_and_sum, merge_means
from .errors import BatchError, ConfigurationError, PrivacyError
from .grads import ForwardContext, HookSet, Record, Unit, join_multi_output
from .verify import compare_with_autograd
from .noise import NoiseSource, SecureNoiseSource
from .settings import EngineSettings, check_positive_finite, is_real

#: Models that trained DP steps under an engine in this process, with how many (see ``attach``).
_DP_HISTORY: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


class Engine:
    """Owns every hook, flag change and per-step state of one attachment. Create it with :func:`attach`.

    Settings that change the mechanism are read-only (``micro_batch_size``,
    ``max_grad_norm``, ``clipping``, ``grouping``, ``noise_multiplier``,
    ``sample_rate``): assigning one raises. The noise multiplier changes only
    through :meth:`set_noise_multiplier`, which the ledger records; noise is
    toggled with ``engine.noise``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, settings: EngineSettings,
                 units: list[Unit], managed: list[nn.Parameter], root_batch_dim: int, privacy=None,
                 noise_multiplier: float | None = None, sample_rate: float | None = None,
                 public_num_groups: int | None = None, verify_steps: int = 1):
        self.model = model
        self.optimizer = optimizer
        self._settings = settings
        self._privacy = privacy
        self._noise_multiplier = noise_multiplier
        self._sample_rate = sample_rate
        self._noise_on = privacy is not None
        self._plan = GroupingPlan(settings.clip.micro_batch_size, settings.grouping, privacy is not None,
                                  settings.num_groups, public_num_groups)
        self._dataset_size: int | None = None

        self._noise_source = SecureNoiseSource() if settings.secure_rng else NoiseSource(settings.seed)
        base_seed = NoiseSource(settings.seed).seed if settings.secure_rng else self._noise_source.seed
        self._group_generator = torch.Generator().manual_seed(base_seed ^ 0x5DEECE66D)
        self._sampling_generator = torch.Generator().manual_seed(base_seed ^ 0x2545F491)
        self._sampled = SampledBatches(self._sampling_generator)

        self._enabled = True
        self._replaying = False
        self._context: ForwardContext | None = None
        self._records: list[Record] = []
        self._callback_queued = False
        self._warned: set[str] = set()
        self._problems: list[str] = []  # found during backward; raised at the step
        self._observers: list = []  # diagnostics (see add_observer)
        self._step_reducer = None  # set by dp_microclip.distributed: (managed, sums, groups, min_norm) -> same
        self._reset_step()
        self._steps_taken = 0
        self.nonfinite_groups = 0
        self.last_group_norms: torch.Tensor | None = None
        self.last_groups: grouping.Groups | None = None
        self.last_strategies: dict[str, str] = {}
        self._inherited_steps = _DP_HISTORY.get(model, 0) if privacy is not None else 0

        self._units = units
        self._managed = managed
        self._managed_ids = {id(p) for p in managed}
        self._names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self._tuner = Autotuner()
        self._check_optimizer_parameters()

        self._original_requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        self._hooks = HookSet(self, root_batch_dim, probe_failure_is_error=privacy is not None)
        for unit in units:
            self._hooks.install_unit(unit)
        self._hooks.install_root(model)
        self._verify_left = int(verify_steps)
        self._autograd_grads: dict[int, torch.Tensor] = {}
        self._param_handles: list = []
        if self._verify_left > 0:
            for p in managed:  # the first steps keep autograd's own gradient, to check the engine against it
                self._param_handles.append(p.register_hook(self._autograd_grad_hook(id(p))))
        else:
            self._switch_off_weight_grads()
        self._step_handle = optimizer.register_step_pre_hook(self._before_step)

    # ================================================================ settings (read-only)
    @property
    def settings(self) -> EngineSettings:
        """The frozen settings ``attach`` validated."""
        return self._settings

    @property
    def steps_taken(self) -> int:
        """Optimizer steps taken through this engine (restored by ``load_state_dict``)."""
        return self._steps_taken

    @property
    def micro_batch_size(self) -> int:
        """``b``: examples per micro-batch (the clipping unit)."""
        return self._settings.clip.micro_batch_size

    @property
    def max_grad_norm(self) -> float:
        """``C``; for per-layer clipping the bound of the whole vector, ``sqrt(sum C_l^2)``."""
        return self._settings.clip.max_grad_norm

    @property
    def clipping(self) -> str:
        """The clipping mode: "fixed", "adaptive", "per_layer" or "normalize"."""
        return self._settings.clip.mode

    @property
    def grouping(self) -> str:
        """How examples form micro-batches now: "contiguous" or "keyed"."""
        return self._plan.mode

    @property
    def dp(self) -> bool:
        """Whether the engine runs in DP mode (noise, a ledger, refusals)."""
        return self._privacy is not None

    @property
    def noise_multiplier(self) -> float | None:
        """``z``: noise std over the clipping bound. Change it with :meth:`set_noise_multiplier`."""
        return self._noise_multiplier

    @property
    def sample_rate(self) -> float | None:
        """``q``: the probability that a record joins a batch of ``engine.data_loader``."""
        return self._sample_rate

    def __setattr__(self, name, value):
        if name in _READ_ONLY and "_settings" in self.__dict__:
            fix = " Use engine.set_noise_multiplier(z)." if name == "noise_multiplier" else (
                " Detach and attach again with the new value (engine.state_dict() carries the privacy ledger).")
            if name == "steps_taken":
                raise AttributeError("engine.steps_taken is read-only: the engine counts its own steps "
                                     "(engine.load_state_dict(...) restores the count of a resumed run).")
            if name in ("model", "optimizer"):
                raise AttributeError(
                    f"engine.{name} is read-only: the engine's hooks and flags belong to the {name} given to attach(), "
                    "and detach() restores that one. Detach, then attach to the other one.")
            raise AttributeError(f"engine.{name} is read-only: it is part of the mechanism the ledger records.{fix}")
        super().__setattr__(name, value)

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Change ``z`` from the next step on (a noise schedule); the ledger records every step's ``z``.

        Raises:
            ConfigurationError: noise-free engines have no ``z``; ``z`` must be finite and > 0
                (``engine.noise = False`` is the way to train without noise, which makes epsilon infinite).
        """
        if self._privacy is None:
            raise ConfigurationError(
                "This engine is noise-free (no ledger). Attach with noise_multiplier=... or target_epsilon=... for "
                "DP training."
            )
        z = check_positive_finite("noise_multiplier", noise_multiplier)
        self._privacy.set_noise_multiplier(z)
        self._noise_multiplier = z

    # ================================================================ public API
    def add_observer(self, observer) -> "_ObserverHandle":
        """Call ``observer.on_pass(engine, records, result)`` after every backward pass and
        ``observer.on_step(engine)`` after every step (either method may be missing).

        The seam for diagnostics (``dp_microclip.tools.diagnostics``): ``records`` are the pass's
        captured layer calls, ``result`` its :class:`~dp_microclip.aggregate.PassResult` (group
        norms, clip factors). Observers must not change either. Returns a handle with ``remove()``.
        """
        self._observers.append(observer)
        return _ObserverHandle(self._observers, observer)

    @property
    def noise(self) -> bool:
        """Whether the next steps add Gaussian noise. A step without noise makes epsilon infinite."""
        return self._noise_on

    @noise.setter
    def noise(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ConfigurationError(f"engine.noise takes True or False. Found {value!r}.")
        if value and not self._noise_multiplier:
            raise ConfigurationError(
                "engine.noise = True needs a noise multiplier: attach(..., noise_multiplier=z) or "
                "attach(..., target_epsilon=eps, ...)."
            )
        self._noise_on = value

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped sum (before dividing by the number of groups)."""
        if not self._noise_multiplier:
            return 0.0
        return self._noise_multiplier * self.max_grad_norm

    def data_loader(self, dataset, batch_size: int | None = None, *, collate_keeps_order: bool | None = None,
                    **loader_kwargs):
        """A DataLoader with Poisson sampling at the engine's ``sample_rate``: the sampling epsilon is computed for.

        Each record joins each batch independently with probability ``q``; one
        epoch is ``round(1/q)`` steps; batches are ragged and may be empty. In DP
        mode this also fixes the public number of groups ``M = round(q N / b)``.
        Each record's micro-batch is drawn from its own coin, so the rows of a
        batch must reach the model in the order of their indices: a custom
        ``collate_fn`` that reorders rows (sorting by length) would move records
        between micro-batches. In DP mode with ``b > 1`` a custom ``collate_fn``
        is therefore refused unless you declare ``collate_keeps_order=True``.

        Args:
            dataset: a map-style dataset of ``N`` records.
            batch_size: the expected batch size ``q N``; needed only when attach() got no
                sample_rate (noise-free), otherwise checked against it.
            collate_keeps_order: your ``collate_fn`` keeps rows in the order of the samples it gets.
            **loader_kwargs: passed to ``DataLoader`` (num_workers, collate_fn, ...).
        """
        from .data import poisson_loader

        n = len(dataset)
        if n == 0:
            raise ConfigurationError("engine.data_loader(dataset): the dataset is empty.")
        q = self._sample_rate
        if q is None:
            if batch_size is None:
                raise ConfigurationError("engine.data_loader(dataset, batch_size=...) needs the expected batch size.")
            if not is_real(batch_size) or not 0 < batch_size <= n:
                raise ConfigurationError(f"batch_size must be in (0, len(dataset)={n}]. Found {batch_size!r}.")
            q = batch_size / n
            self._sample_rate = q
        elif batch_size is not None and abs(batch_size - q * n) > 0.5:
            raise ConfigurationError(
                f"batch_size={batch_size} disagrees with sample_rate={q} x len(dataset)={n} = {q * n:.1f}. "
                f"Pass batch_size={round(q * n)} or omit it."
            )
        keeps_order = collate_keeps_order if collate_keeps_order is not None else self._settings.collate_keeps_order
        if (self.dp and self.micro_batch_size > 1 and "collate_fn" in loader_kwargs and not keeps_order):
            raise PrivacyError(
                "engine.data_loader(..., collate_fn=...) in DP mode with micro_batch_size > 1: each record's "
                "micro-batch follows its row, so a collate_fn that reorders rows (e.g. sorting by length) would "
                "move records between micro-batches depending on the other records. Use a collate_fn that keeps "
                "the rows in order and declare it with collate_keeps_order=True, or sort inside the model."
            )
        self._plan.use_loader(q * n)
        self._dataset_size = n
        return poisson_loader(
            dataset, q, self._sampling_generator, num_groups=self._plan.loader_groups,
            on_batch=self._sampled.on_batch, on_epoch=self._sampled.on_epoch, **loader_kwargs,
        )

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
        self._check_history()
        return self._privacy.epsilon(delta, accountant)

    def privacy_statement(self, delta: float | None = None) -> str:
        """A plain-language statement of the guarantee (adjacency, sampling, grouping, micro-batching)."""
        if self._privacy is None:
            return ("Noise-free training: no differential-privacy guarantee (epsilon is infinite). "
                    "Attach with noise_multiplier=... or target_epsilon=... for DP training.")
        self._check_history()
        text = self._privacy.statement(delta, self._dataset_size, self._plan.public_num_groups)
        if self._settings.secure_rng:
            text += " Noise was drawn from the operating system's cryptographically secure generator."
        return text

    def detach(self) -> None:
        """Remove every hook and restore every ``requires_grad`` flag; the model then trains as before.

        A graph built before ``detach()`` still holds tensor hooks; they see the
        engine disabled and do nothing.
        """
        if not self._enabled:
            return
        object.__setattr__(self, "_enabled", False)
        self._hooks.remove()
        self._step_handle.remove()
        for handle in self._param_handles:
            handle.remove()
        self._param_handles.clear()
        for p in self.model.parameters():
            if id(p) in self._original_requires_grad:
                p.requires_grad_(self._original_requires_grad[id(p)])
        self._records.clear()
        self._reset_step()

    def summary(self) -> str:
        """One line per hooked unit: module path, type, path taken, parameters."""
        lines = [
            f"dp_microclip engine: micro_batch_size={self.micro_batch_size}, clipping={self.clipping!r}, "
            f"grouping={self.grouping!r}, grad_mode={self._settings.clip.grad_mode!r}, "
            f"noise={'on' if self.noise else 'off'}"
        ]
        for unit in self._units:
            path = {"rule": "rule", "attention": "attention capture + Linear rule", "generic": "generic torch.func"}
            names = ", ".join(unit.params)
            lines.append(f"  {unit.path or '<root>'}: {type(unit.module).__name__} -> {path[unit.kind]} [{names}]")
        generic = [u.path or "<root>" for u in self._units if u.kind == "generic"]
        if generic:
            lines.append("  generic torch.func path (exact only if the module treats examples independently): "
                         + ", ".join(generic))
        return "\n".join(lines)

    def state_dict(self, include_rng_state: bool = False) -> dict:
        """What a resumed run needs: the step count, the noise setting, the privacy ledger, the loader's position.

        Args:
            include_rng_state: also save the states of the noise, grouping and sampling
                generators, so that a resumed run is bitwise the same as an uninterrupted
                one. Those states predict every future noise draw: a checkpoint that holds
                them must stay as secret as the training data. Without them (default) a
                resumed run draws fresh randomness, which is just as private.
        """
        state = {
            "steps_taken": self.steps_taken,
            "noise_on": self._noise_on,
            "noise_multiplier": self._noise_multiplier,
            "epoch_position": self._sampled.epoch_position,
            "privacy": None if self._privacy is None else self._privacy.state_dict(),
            "rng": None,
        }
        if include_rng_state:
            if self._settings.secure_rng:
                raise ConfigurationError(
                    "include_rng_state=True with secure_rng=True: secure noise has no state to save. Save without it."
                )
            state["rng"] = {
                "noise": self._noise_source.state_dict(),
                "group_generator": self._group_generator.get_state(),
                "sampling_generator": self._sampled.sampler_state.clone(),
            }
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from :meth:`state_dict`: the ledger (epsilon continues), the noise setting, the loader's position.

        Call it before iterating a new ``engine.data_loader(...)``: its first epoch then
        continues where the saved run stopped.
        """
        if (state["privacy"] is None) != (self._privacy is None):
            raise ConfigurationError("This state_dict comes from an engine with a different DP mode.")
        self._steps_taken = int(state["steps_taken"])
        self._noise_on = bool(state["noise_on"])
        if self._privacy is not None:
            self._privacy.load_state_dict(state["privacy"])
            if state.get("noise_multiplier") is not None and state["noise_multiplier"] != self._noise_multiplier:
                self.set_noise_multiplier(state["noise_multiplier"])
            self._inherited_steps = 0  # the ledger now carries the history
        self._sampled.resume_position = int(state.get("epoch_position", 0))
        rng = state.get("rng")
        if rng is not None:
            self._noise_source.load_state_dict(rng["noise"])
            self._group_generator.set_state(rng["group_generator"])
            self._sampling_generator.set_state(rng["sampling_generator"])
            self._sampled.sampler_state = rng["sampling_generator"].clone()

    @contextlib.contextmanager
    def silenced(self):
        """Run forward and backward passes the engine does not capture (diagnostics' own probes).

        Inside, the hooks record nothing and no micro-batch is drawn; gradients that reach
        ``p.grad`` there are the caller's business, not a training step.
        """
        with self._replay():
            yield

    # ============================================================ hook callbacks (private protocol of grads.py)
    def _hooks_active(self) -> bool:
        return self._enabled and not self._replaying

    @contextlib.contextmanager
    def _replay(self):
        previous = self._replaying
        object.__setattr__(self, "_replaying", True)
        try:
            yield
        finally:
            object.__setattr__(self, "_replaying", previous)

    def _current_context(self) -> ForwardContext | None:
        return self._context

    def _open_context(self, batch_size: int, device: torch.device, signature) -> None:
        groups, drawn = self._make_groups(batch_size, device)
        self._context = ForwardContext(batch_size, groups, drawn_by_engine=drawn, signature=signature)
        self.last_groups = self._context.groups

    def _close_context(self) -> None:
        self._context = None

    def _emit(self, record: Record) -> None:
        self._records.append(record)
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_pass)

    # ================================================================ grouping
    def _make_groups(self, batch_size: int, device) -> tuple[grouping.Groups, bool]:
        """The batch's groups, and whether engine.data_loader drew this batch."""
        from_loader, drawn = self._sampled.take(batch_size)
        self._last_batch_size = batch_size
        return self._plan.groups(batch_size, device, drawn, self._group_generator), from_loader

    # ================================================================ backward and step
    def _autograd_grad_hook(self, pid: int):
        def hook(grad: torch.Tensor):
            if self._enabled:
                previous = self._autograd_grads.get(pid)
                self._autograd_grads[pid] = grad.detach().clone() if previous is None else previous + grad
            return None

        return hook

    def _switch_off_weight_grads(self) -> None:
        for handle in self._param_handles:
            handle.remove()
        self._param_handles.clear()
        self._autograd_grads.clear()
        for p in self._managed:
            p.requires_grad_(False)

    def _finish_pass(self) -> None:
        records, self._records = self._records, []
        self._callback_queued = False
        autograd_grads, self._autograd_grads = self._autograd_grads, {}
        if not self._enabled or not records:
            return
        records = join_multi_output(records)
        # Only batches that reach a backward pass count: an evaluation forward outside torch.no_grad()
        # does not make the step unverified.
        if not all(r.ctx.drawn_by_engine for r in records):
            self._step_unsampled = True
        self._step_contexts.update(r.ctx.id for r in records)
        if self._verify_left > 0:
            self._verify(records, autograd_grads)
        result = clip_and_sum(records, self._settings.clip, self._replay, self._divisor_of, self._tuner)
        self._accumulate(result)
        for observer in list(self._observers):
            if hasattr(observer, "on_pass"):
                observer.on_pass(self, records, result)

    def _verify(self, records: list[Record], autograd_grads: dict) -> None:
        """The first steps' check against autograd (``verify.py``); problems are raised at the step."""
        self._problems += compare_with_autograd(records, autograd_grads, self._names, self._replay)

    def _divisor_of(self, ctx: ForwardContext) -> float:
        """M of one batch: its number of groups, or the public constant in DP mode."""
        return self._plan.divisor(ctx.groups)

    def _accumulate(self, result: PassResult) -> None:
        self._sums, self._groups_seen = merge_means(self._sums, self._groups_seen, result.sums, result.num_groups)
        self._min_norm = min(self._min_norm, result.min_norm)
        self._passes += 1
        self.nonfinite_groups += result.nonfinite_groups
        if result.group_norms:
            self.last_group_norms = torch.cat(result.group_norms)
        self.last_strategies = result.strategies

    def _reset_step(self) -> None:
        self._sums: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self._groups_seen = 0.0
        self._min_norm = float("inf")
        self._passes = 0
        self._step_contexts: set[int] = set()
        self._step_unsampled = False
        self._last_batch_size = None

    def _check_optimizer_parameters(self) -> None:
        """Every parameter the optimizer may update is the engine's, or the step raises naming it."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._managed_ids:
                    continue
                if p.requires_grad or p.grad is not None:
                    name = self._names.get(id(p))
                    what = f"parameter {name!r}" if name else f"a parameter of shape {tuple(p.shape)} not in the model"
                    raise ConfigurationError(
                        f"The optimizer updates {what}, which the engine does not clip (it was frozen at attach(), "
                        "added later with optimizer.add_param_group, or belongs to another model): its gradient "
                        "would be the raw, unclipped and un-noised one. Decide which parameters train before "
                        "attach(), or detach() and attach() again after changing them."
                    )

    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self._enabled:
            return
        if kwargs.get("closure") is not None or any(callable(a) for a in args):
            raise ConfigurationError(
                "optimizer.step(closure) is not supported: the optimizer would run the closure's backward pass "
                "after the engine has written the gradients. Call loss.backward() yourself, then "
                "optimizer.step() without a closure."
            )
        self._check_optimizer_parameters()
        if self._problems:
            problems, self._problems = self._problems, []
            self._reset_step()
            raise ConfigurationError("dp_microclip refused this step:\n" + "\n".join(f"  - {p}" for p in problems))
        empty_batch = self._passes == 0 and self._last_batch_size == 0
        if self._passes == 0 and not (self.dp and empty_batch):
            if self.dp:
                raise PrivacyError(
                    "optimizer.step() was called with no backward pass since the last step; in DP mode "
                    "every step must come from a sampled batch. Call loss.backward() first."
                )
            if self._step_reducer is None:
                return  # like plain PyTorch with no gradients: the optimizer has nothing to do
            # Several processes: the other ranks may have gradients; this rank joins their reduction with none.
        if self.dp:
            self._check_dp_step()
            self._privacy.before_step(self._noise_on)
            if empty_batch:
                self._groups_seen = float(self._plan.public_num_groups)
        if self._step_reducer is not None:
            # Several processes (dp_microclip.distributed): combine the clipped means, the group counts and
            # the smallest group norm of every rank before noise is added, so every rank takes the same step.
            self._sums, self._groups_seen, self._min_norm = self._step_reducer(
                self._managed, self._sums, self._groups_seen, self._min_norm)
        rho = 1.0
        if self.clipping == "adaptive":
            rho = 0.0 if math.isinf(self._min_norm) else self._min_norm
            if rho == 0.0:
                self._warn_once(
                    "zero_rho",
                    "Adaptive clipping: the smallest micro-batch gradient norm is 0, so the bound rho is 0 "
                    "and this step is zero. A micro-batch whose gradient vanishes stops training; consider "
                    'clipping="fixed".', RuntimeWarning,
                )
        # self._sums holds means over the step's groups (the 1/M is already applied).
        std = self.noise_std / self._groups_seen if self._noise_on else 0.0
        for p in self._managed:
            entry = self._sums.get(id(p))
            if entry is None and std == 0.0:
                p.grad = None  # unused this step, as in plain PyTorch
                continue
            total = torch.zeros_like(p, dtype=torch.float32 if p.dtype in _LOW else p.dtype) if entry is None \
                else entry[1]
            if rho != 1.0:
                total.mul_(rho)
            if std > 0.0:
                total.add_(self._noise_source.gaussian_like(total, std))
            p.grad = total if total.dtype == p.dtype else total.to(p.dtype)
        self._after_step()
        self._reset_step()
        self._steps_taken += 1
        for observer in list(self._observers):
            if hasattr(observer, "on_step"):
                observer.on_step(self)
        if self._verify_left > 0:
            self._verify_left -= 1
            if self._verify_left == 0:
                self._switch_off_weight_grads()

    def _check_dp_step(self) -> None:
        if self._passes > 1:
            raise PrivacyError(
                f"{self._passes} backward passes before one optimizer.step() in DP mode: each step must be "
                "one Poisson-sampled batch with one backward pass (gradient accumulation would change the "
                "public normaliser). Use a larger sample_rate instead of accumulation."
            )
        if len(self._step_contexts) > 1:
            raise PrivacyError(
                f"{len(self._step_contexts)} forward passes of the model contributed to one step in DP mode. Each "
                "step must be one forward pass of one sampled batch: two batches in one step double each record's "
                "chance to be in the step, and two views of the same record (augmentations, each its own "
                "model() call) each get their own clipping budget, so one record moves the sum by more than the "
                "sensitivity the epsilon assumes. Compute all views of a record inside ONE call of the attached "
                "model (e.g. a wrapper module that runs the network on every view and averages), so each record "
                "stays one example with one clipped gradient."
            )
        if self._plan.public_num_groups is None:
            raise missing_public_groups()

    def _after_step(self) -> None:
        """Record the step with the accountant (DP mode), noting whether our sampler drew its batch."""
        if self._privacy is None:
            return
        self._privacy.after_step(self._noise_on, not self._step_unsampled)
        _DP_HISTORY[self.model] = _DP_HISTORY.get(self.model, 0) + 1

    def _check_history(self) -> None:
        if self._inherited_steps:
            raise PrivacyError(
                f"No epsilon: this model already took {self._inherited_steps} DP step(s) under an earlier engine, "
                "and this engine's ledger does not hold them, so its epsilon would cover only part of the "
                "training. Carry the history: new_engine.load_state_dict(old_engine.state_dict())."
            )

    def _warn_once(self, key: str, message: str, category=UserWarning) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=4)


class _ObserverHandle:
    """Removes one observer from its engine."""

    def __init__(self, observers: list, observer):
        self._observers, self._observer = observers, observer

    def remove(self) -> None:
        """Stop calling the observer (idempotent)."""
        if self._observer in self._observers:
            self._observers.remove(self._observer)


_READ_ONLY = frozenset({"model", "optimizer", "steps_taken", "micro_batch_size", "max_grad_norm", "clipping", "grouping", "noise_multiplier",
                        "sample_rate", "settings", "dp", "noise_std"})
_LOW = (torch.float16, torch.bfloat16)
