"""The ``Engine``: micro-batch clipping on an unchanged model and optimizer (built by ``attach``, configure.py).

The engine only adds hooks (module hooks, one optimizer step pre-hook) and
switches the ``requires_grad`` flag of the parameters it computes itself, so
autograd does not compute an unclipped weight gradient it would throw away.
``detach()`` undoes all of it. See DESIGN.md for the algorithm and the rules.

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

import collections
import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import grouping
from .aggregate import Autotuner, ClipSettings, PassResult, clip_and_sum, merge_means
from .errors import BatchError, ConfigurationError, PrivacyError, UnsupportedModuleError
from .grads import ForwardContext, HookSet, Record, Unit
from .layers.attention import check_attention_supported
from .layers.registry import rule_for
from .noise import NoiseSource

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _declared_batch_first(module: nn.Module) -> bool | None:
    """The batch layout a module declares, if any (MHA, RNNs, transformer layers)."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return _declared_batch_first(module.layers[0])
    if isinstance(getattr(module, "batch_first", None), bool):
        return module.batch_first
    return None


class Engine:
    """Owns every hook, flag change and per-step state of one attachment. Create it with :func:`attach`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
        self.model = model
        self.optimizer = optimizer
        self._cfg = config
        self.micro_batch_size: int = config["micro_batch_size"]
        self.clipping: str = config["clipping"]
        self.grouping: str = config["grouping"]
        self.dp: bool = config["dp"]
        self._noise_source = NoiseSource(config["seed"])
        self._group_generator = torch.Generator().manual_seed(self._noise_source.seed ^ 0x5DEECE66D)
        self._noise_on = self.dp
        self.noise_multiplier: float | None = config["noise_multiplier"]
        self._privacy = None  # PrivacyState in DP mode (set by attach)
        self._sampling_generator = torch.Generator().manual_seed(self._noise_source.seed ^ 0x2545F491)
        self._pending_batches: collections.deque = collections.deque()  # (indices, groups) drawn by data_loader
        self._step_unsampled = False  # a batch of this step did not come from engine.data_loader
        self._last_batch_size: int | None = None
        self._enabled = True
        self._replaying = False
        self._context: ForwardContext | None = None
        self._records: list[Record] = []
        self._callback_queued = False
        self._warned: set[str] = set()
        self._reset_step()
        self.steps_taken = 0
        self.last_group_norms: torch.Tensor | None = None
        self.last_groups: grouping.Groups | None = None
        self.last_strategies: dict[str, str] = {}

        self._units = self._discover_units()
        self._managed = self._managed_parameters()
        self._settings = self._clip_settings()
        self._tuner = Autotuner()
        self._check_optimizer()

        self._original_requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        self._hooks = HookSet(self, self._root_batch_dim())
        for unit in self._units:
            self._hooks.install_unit(unit)
        self._hooks.install_root(model, self._root_batch_dim())
        for p in self._managed:
            p.requires_grad_(False)
        self._step_handle = optimizer.register_step_pre_hook(self._before_step)

    # ================================================================ public API
    @property
    def noise(self) -> bool:
        """Whether the next steps add Gaussian noise. A step without noise makes epsilon infinite."""
        return self._noise_on

    @noise.setter
    def noise(self, value: bool) -> None:
        if value and not self.noise_multiplier:
            raise ConfigurationError(
                "engine.noise = True needs a noise multiplier: attach(..., noise_multiplier=z) or "
                "attach(..., target_epsilon=eps, ...)."
            )
        self._noise_on = bool(value)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped sum (before dividing by the number of groups)."""
        if not self.noise_multiplier:
            return 0.0
        return self.noise_multiplier * self._sensitivity_scale()

    @property
    def sample_rate(self) -> float | None:
        return self._cfg["sample_rate"]

    def data_loader(self, dataset, batch_size: int | None = None, **loader_kwargs):
        """A DataLoader with Poisson sampling at the engine's ``sample_rate``: the sampling epsilon is computed for.

        Each record joins each batch independently with probability ``q``; one
        epoch is ``round(1/q)`` steps; batches are ragged and may be empty. In DP
        mode this also fixes the public number of groups ``M = round(q N / b)``.

        Args:
            dataset: a map-style dataset of ``N`` records.
            batch_size: the expected batch size ``q N``; needed only when attach() got no
                sample_rate (noise-free), otherwise checked against it.
            **loader_kwargs: passed to ``DataLoader`` (num_workers, collate_fn, ...).
        """
        from .data import poisson_loader

        n = len(dataset)
        q = self._cfg["sample_rate"]
        if q is None:
            if batch_size is None:
                raise ConfigurationError("engine.data_loader(dataset, batch_size=...) needs the expected batch size.")
            q = batch_size / n
            self._cfg["sample_rate"] = q
        elif batch_size is not None and abs(batch_size - q * n) > 0.5:
            raise ConfigurationError(
                f"batch_size={batch_size} disagrees with sample_rate={q} x len(dataset)={n} = {q * n:.1f}. "
                f"Pass batch_size={round(q * n)} or omit it."
            )
        if self.dp:
            public = grouping.public_groups(q * n, self.micro_batch_size)
            current = self._cfg["public_num_groups"]
            if current is not None and current != public:
                raise ConfigurationError(
                    f"expected_batch_size given to attach() implies {current} groups, but this dataset "
                    f"(N={n}, q={q}) implies {public}. Make them agree."
                )
            self._cfg["public_num_groups"] = self._cfg["num_groups"] = public
        self._dataset_size = n

        def on_batch(indices, groups) -> None:
            self._pending_batches.append((int(indices.numel()), groups))

        if not self.dp and self._cfg["grouping_auto"] and self.micro_batch_size > 1 and self.grouping != "keyed":
            # grouping="auto": Poisson batches vary in size, so contiguous slices of b would not divide them;
            # draw keyed groups instead, about b examples each.
            self.grouping = "keyed"
            if self._cfg["num_groups"] is None:
                self._cfg["num_groups"] = grouping.public_groups(q * n, self.micro_batch_size)
        keyed = self.grouping == "keyed" and self.micro_batch_size > 1
        return poisson_loader(
            dataset, q, self._sampling_generator, num_groups=self._cfg["num_groups"] if keyed else None,
            on_batch=on_batch, on_epoch=self._pending_batches.clear, **loader_kwargs,
        )

    def epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        """Epsilon of everything trained so far at ``delta`` (default: attach's delta).

        ``inf`` when the engine trains noise-free or any step ran with noise off.

        Raises:
            PrivacyError: when no valid number exists (e.g. batches not from
                ``engine.data_loader`` without a declaration); never a guess.
        """
        if self._privacy is None:
            return math.inf
        return self._privacy.epsilon(delta, accountant)

    def privacy_statement(self, delta: float | None = None) -> str:
        """A plain-language statement of the guarantee (adjacency, sampling, grouping, micro-batching)."""
        if self._privacy is None:
            return ("Noise-free training: no differential-privacy guarantee (epsilon is infinite). "
                    "Attach with noise_multiplier=... or target_epsilon=... for DP training.")
        return self._privacy.statement(delta, getattr(self, "_dataset_size", None))

    def detach(self) -> None:
        """Remove every hook and restore every ``requires_grad`` flag; the model then trains as before.

        A graph built before ``detach()`` still holds tensor hooks; they see the
        engine disabled and do nothing.
        """
        if not self._enabled:
            return
        self._enabled = False
        self._hooks.remove()
        self._step_handle.remove()
        for p in self.model.parameters():
            if id(p) in self._original_requires_grad:
                p.requires_grad_(self._original_requires_grad[id(p)])
        self._records.clear()
        self._reset_step()

    def summary(self) -> str:
        """One line per hooked unit: module path, type, path taken, parameters."""
        lines = [
            f"dp_microclip engine: micro_batch_size={self.micro_batch_size}, clipping={self.clipping!r}, "
            f"grouping={self.grouping!r}, grad_mode={self._cfg['grad_mode']!r}, "
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

    def state_dict(self) -> dict:
        """Noise generator states, the grouping generator and step count (and the privacy ledger in DP mode)."""
        return {
            "noise": self._noise_source.state_dict(),
            "group_generator": self._group_generator.get_state(),
            "steps_taken": self.steps_taken,
            "noise_on": self._noise_on,
            "sampling_generator": self._sampling_generator.get_state(),
            "privacy": None if self._privacy is None else self._privacy.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self._noise_source.load_state_dict(state["noise"])
        self._group_generator.set_state(state["group_generator"])
        self.steps_taken = int(state["steps_taken"])
        self._noise_on = bool(state["noise_on"])
        self._sampling_generator.set_state(state["sampling_generator"])
        if (state["privacy"] is None) != (self._privacy is None):
            raise ConfigurationError("This state_dict comes from an engine with a different DP mode.")
        if self._privacy is not None:
            self._privacy.load_state_dict(state["privacy"])

    # ============================================================ hook callbacks
    def active(self) -> bool:
        return self._enabled and not self._replaying

    @contextlib.contextmanager
    def _replay(self):
        previous, self._replaying = self._replaying, True
        try:
            yield
        finally:
            self._replaying = previous

    @property
    def replaying(self):
        return self._replay()

    def current_context(self) -> ForwardContext | None:
        return self._context

    def open_context(self, batch_size: int, device: torch.device) -> None:
        groups, drawn = self._make_groups(batch_size, device)
        self._context = ForwardContext(batch_size, groups, drawn_by_engine=drawn)
        self.last_groups = self._context.groups

    def close_context(self) -> None:
        self._context = None

    def emit(self, record: Record) -> None:
        self._records.append(record)
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_pass)

    # ================================================================ internals
    def _make_groups(self, batch_size: int, device) -> tuple[grouping.Groups, bool]:
        """The batch's groups, and whether engine.data_loader drew this batch."""
        b = self.micro_batch_size
        self._last_batch_size = batch_size
        from_loader, drawn = self._take_pending_batch(batch_size)
        if self.grouping == "contiguous" or b == 1:
            return grouping.contiguous_groups(batch_size, b, device), from_loader
        num_groups = self._cfg["num_groups"]
        if num_groups is None:
            if self.dp:
                raise _missing_public_groups()
            num_groups = max(1, math.ceil(batch_size / b))
        if drawn is not None:
            return grouping.groups_from_index(drawn.to(device), num_groups), from_loader
        return grouping.keyed_groups(batch_size, num_groups, self._group_generator), False

    def _take_pending_batch(self, batch_size: int) -> tuple[bool, torch.Tensor | None]:
        """(whether engine.data_loader drew this batch, its examples' groups or None); checks the size."""
        if not self._pending_batches:
            return False, None
        size, groups = self._pending_batches.popleft()
        if size != batch_size:
            self._pending_batches.clear()
            raise BatchError(
                f"The batch has {batch_size} examples, but engine.data_loader drew {size} for it: batches reached "
                "the model out of order, or not every drawn batch was used. Feed each batch of "
                "engine.data_loader(...) to the model exactly once, in order (forward passes under "
                "torch.no_grad() do not count)."
            )
        return True, groups

    def _finish_pass(self) -> None:
        records, self._records = self._records, []
        self._callback_queued = False
        if not self._enabled or not records:
            return
        # Only batches that reach a backward pass count: an evaluation forward outside torch.no_grad()
        # does not make the step unverified.
        if not all(r.ctx.drawn_by_engine for r in records):
            self._step_unsampled = True
        result = clip_and_sum(records, self._settings, self._replay, self._divisor_of, self._tuner)
        self._accumulate(result)

    def _divisor_of(self, ctx: ForwardContext) -> float:
        """M of one batch: its number of groups, or the public constant in DP mode."""
        public = self._cfg["public_num_groups"]  # in DP mode round(q N / b); b = 1: the expected batch size
        return float(public) if public is not None else float(ctx.groups.num_groups)

    def _accumulate(self, result: PassResult) -> None:
        self._sums, self._groups_seen = merge_means(self._sums, self._groups_seen, result.sums, result.num_groups)
        self._min_norm = min(self._min_norm, result.min_norm)
        self._passes += 1
        if result.group_norms:
            self.last_group_norms = torch.cat(result.group_norms)
        self.last_strategies = result.strategies

    def _reset_step(self) -> None:
        self._sums: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self._groups_seen = 0.0
        self._min_norm = float("inf")
        self._passes = 0

    def _before_step(self, optimizer, args, kwargs) -> None:
        if not self._enabled:
            return
        empty_batch = self._passes == 0 and self._last_batch_size == 0
        if self._passes == 0 and not (self.dp and empty_batch):
            if self.dp:
                raise PrivacyError(
                    "optimizer.step() was called with no backward pass since the last step; in DP mode "
                    "every step must come from a sampled batch. Call loss.backward() first."
                )
            return  # like plain PyTorch with no gradients: the optimizer has nothing to do
        if self.dp:
            if self._passes > 1:
                raise PrivacyError(
                    f"{self._passes} backward passes before one optimizer.step() in DP mode: each step must be "
                    "one Poisson-sampled batch with one backward pass (gradient accumulation would change the "
                    "public normaliser). Use a larger sample_rate instead of accumulation."
                )
            if self._cfg["public_num_groups"] is None:
                raise _missing_public_groups()
            self._privacy.before_step(self._noise_on)
            if empty_batch:
                self._groups_seen = float(self._cfg["public_num_groups"])
        rho = 1.0
        if self.clipping == "adaptive":
            rho = 0.0 if math.isinf(self._min_norm) else self._min_norm
            if rho == 0.0 and "zero_rho" not in self._warned:
                self._warned.add("zero_rho")
                warnings.warn(
                    "Adaptive clipping: the smallest micro-batch gradient norm is 0, so the bound rho is 0 "
                    "and this step is zero. A micro-batch whose gradient vanishes stops training; consider "
                    'clipping="fixed".', RuntimeWarning, stacklevel=3,
                )
        # self._sums holds means over the step's groups (the 1/M is already applied).
        std = self.noise_std / self._groups_seen if self._noise_on else 0.0
        for p in self._managed:
            entry = self._sums.get(id(p))
            if entry is None and std == 0.0:
                p.grad = None  # unused this step, as in plain PyTorch
                continue
            total = torch.zeros_like(p) if entry is None else entry[1]
            if rho != 1.0:
                total.mul_(rho)
            if std > 0.0:
                total.add_(self._noise_source.gaussian_like(p, std))
            p.grad = total if total.dtype == p.dtype else total.to(p.dtype)
        self._after_step()
        self._reset_step()
        self.steps_taken += 1

    def _after_step(self) -> None:
        """Record the step with the accountant (DP mode), noting whether our sampler drew its batch."""
        self._last_batch_size = None
        if self._privacy is None:
            return
        sampled_by_engine = not self._step_unsampled
        self._step_unsampled = False
        self._privacy.after_step(self._noise_on, sampled_by_engine)

    # ------------------------------------------------------------- discovery
    def _sensitivity_scale(self) -> float:
        if self.clipping == "per_layer":
            return math.sqrt(sum(c * c for c in self._settings.per_param_bound.values()))
        return float(self._cfg["max_grad_norm"])

    def _batch_dim_of(self, path: str) -> int | None:
        """The batch dimension declared by the module at ``path`` or its nearest declaring ancestor."""
        parts = path.split(".") if path else []
        for depth in range(len(parts), -1, -1):
            declared = _declared_batch_first(self.model.get_submodule(".".join(parts[:depth])))
            if declared is not None:
                return 0 if declared else 1
        return None

    def _root_batch_dim(self) -> int:
        forced = self._cfg["batch_first"]
        if forced is not None:
            return 0 if forced else 1
        declared = self._batch_dim_of("")
        return 0 if declared is None else declared

    def _discover_units(self) -> list[Unit]:
        units: list[Unit] = []
        skip_paths: set[str] = set()
        fallback = self._cfg["fallback"]
        for path, module in self.model.named_modules():
            if path in skip_paths:
                continue
            if isinstance(module, _BATCHNORMS) and any(p.requires_grad for p in module.parameters()):
                if self.dp:
                    raise UnsupportedModuleError(
                        f"{path} is nn.{type(module).__name__}, which mixes examples across micro-batches. "
                        "Replace it with nn.GroupNorm (opacus.validators.ModuleValidator.fix(model) does "
                        "this) before attach()."
                    )
                self._warn_once(
                    f"bn:{path}",
                    f"{path} is nn.{type(module).__name__}: its statistics cover the whole batch, so "
                    "micro-batches are not independent and the result differs from clipping each "
                    "micro-batch on its own. Consider nn.GroupNorm.",
                )
            if isinstance(module, nn.MultiheadAttention):
                check_attention_supported(module, path)
                owned = {}
                for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
                    p = module.get_parameter(name) if _has_param(module, name) else None
                    if p is not None and p.requires_grad:
                        owned[name] = p
                skip_paths.add(f"{path}.out_proj" if path else "out_proj")
                if owned:
                    units.append(Unit(path, module, "attention", None, owned, self._batch_dim_of(path)))
                continue
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            rule = rule_for(module)
            if isinstance(module, nn.Embedding) and (module.sparse or module.scale_grad_by_freq):
                raise UnsupportedModuleError(
                    f"{path} is nn.Embedding with sparse=True or scale_grad_by_freq=True; the first gives "
                    "sparse gradients, the second mixes examples (frequencies over the whole batch). "
                    "Create it with sparse=False, scale_grad_by_freq=False."
                )
            if rule is not None:
                units.append(Unit(path, module, "rule", rule, own, self._batch_dim_of(path)))
                continue
            where = path or "<root module>"
            if fallback == "error" or (self.dp and fallback != "generic"):
                reason = " In DP mode the generic path must be allowed explicitly." if self.dp else ""
                raise UnsupportedModuleError(
                    f"{where} ({type(module).__name__}) has trainable parameters "
                    f"{sorted(own)} and no dp_microclip rule.{reason} Register a rule with "
                    "dp_microclip.register_rule(...), or pass fallback=\"generic\" to use torch.func per "
                    "micro-batch (exact only if the module treats examples independently)."
                )
            self._warn_once(
                f"generic:{path}",
                f"{where} ({type(module).__name__}) has no rule: its parameters {sorted(own)} use the generic "
                "torch.func path (slower; exact only if the module treats examples independently).",
            )
            units.append(Unit(path, module, "generic", None, own, self._batch_dim_of(path)))
        return units

    def _managed_parameters(self) -> list[nn.Parameter]:
        seen, managed = set(), []
        for unit in self._units:
            for p in unit.params.values():
                if id(p) not in seen:
                    seen.add(id(p))
                    managed.append(p)
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in seen]
        if missing:  # cannot happen with the discovery above; guard against silent skips
            raise UnsupportedModuleError(f"Parameters {missing} are not covered by any hooked module.")
        return managed

    def _check_optimizer(self) -> None:
        managed = {id(p) for p in self._managed}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in managed:
                    raise ConfigurationError(
                        f"The optimizer holds a trainable parameter of shape {tuple(p.shape)} that is not in "
                        "the attached model; its gradient would not be clipped. Attach the engine to the model "
                        "that owns every optimised parameter."
                    )

    def _clip_settings(self) -> ClipSettings:
        bounds = {}
        if self.clipping == "per_layer":
            bounds = self._per_param_bounds(self._cfg["max_grad_norm_raw"])
        return ClipSettings(
            mode=self.clipping,
            max_grad_norm=float(self._cfg["max_grad_norm"]),
            per_param_bound=bounds,
            gamma=float(self._cfg["normalize_gamma"]),
            loss_reduction=self._cfg["loss_reduction"],
            grad_mode=self._cfg["grad_mode"],
        )

    def _per_param_bounds(self, raw) -> dict[int, float]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        managed_names = [names[id(p)] for p in self._managed]
        if isinstance(raw, Mapping):
            unknown = set(raw) - set(managed_names)
            missing = set(managed_names) - set(raw)
            if unknown or missing:
                raise ConfigurationError(
                    f'clipping="per_layer": max_grad_norm must give a bound for every trainable parameter '
                    f"name. Missing: {sorted(missing)}; unknown: {sorted(unknown)}."
                )
            bounds = {id(p): float(raw[names[id(p)]]) for p in self._managed}
        elif isinstance(raw, Sequence) and not isinstance(raw, str):
            if len(raw) != len(self._managed):
                raise ConfigurationError(
                    f'clipping="per_layer": got {len(raw)} bounds for {len(self._managed)} trainable '
                    f"parameters ({managed_names}). Give one per parameter, a dict by name, or one float C "
                    "(split as C/sqrt(number of parameters) so the total bound is C)."
                )
            bounds = {id(p): float(c) for p, c in zip(self._managed, raw)}
        else:
            share = float(raw) / math.sqrt(len(self._managed))
            bounds = {id(p): share for p in self._managed}
        if any(c <= 0 for c in bounds.values()):
            raise ConfigurationError('clipping="per_layer": every bound must be > 0.')
        return bounds

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)


def _missing_public_groups() -> ConfigurationError:
    return ConfigurationError(
        "DP mode needs the public number of groups before the first batch: build the loader with "
        "engine.data_loader(dataset), or pass expected_batch_size=... to attach()."
    )


def _has_param(module: nn.Module, dotted: str) -> bool:
    try:
        return module.get_parameter(dotted) is not None
    except AttributeError:
        return False
