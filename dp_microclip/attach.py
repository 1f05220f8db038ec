"""``attach(model, optimizer, ...) -> Engine``: turn the user's choices into frozen settings and build the engine.

Everything a user can get wrong at set-up is checked here, before any hook is
installed, with an error that names the argument and the fix; DP choices are
checked against the rules in ``accounting/`` (``_dp_setup``). The engine itself
(``engine.py``) then trusts its configuration.
"""

from __future__ import annotations

import math
import warnings
from types import MappingProxyType
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .engine import Engine, ProcessParts
from .errors import ConfigurationError, PrivacyError, user_stacklevel
from .privacy import DP_HISTORY, warn_seeded
from .grouping import public_groups, resolve_grouping
from .layout import declared_batch_first
from .settings import (
    DP, SAMPLINGS, CLIPPING_MODES, FALLBACKS, GRAD_MODES, GROUPINGS, LOSS_REDUCTIONS, NONFINITE_POLICIES, ClipSettings,
    EngineSettings, MemoryBudget, check_choice, check_int, check_positive_finite, is_real, total_bound,
)
from .settings import memory_budget as memory_budget_of
from .units import find_units, managed_parameters
from accounting.mechanism import ADJACENCIES

_choice = check_choice


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    micro_batch_size: int,
    max_grad_norm: float | Sequence[float] | Mapping[str, float],
    clipping: str = "fixed",
    privacy: DP | None = None,
    grouping: str = "auto",
    num_groups: int | None = None,
    loss_reduction: str = "mean",
    grad_mode: str = "auto",
    fallback: str | None = None,
    normalize_gamma: float = 0.01,
    batch_first: bool | None = None,
    seed: int | None = None,
    on_nonfinite: str = "skip",
    verify_steps: int = 1,
    memory_budget: MemoryBudget | int | float | str | None = None,
    process_parts: ProcessParts | None = None,
) -> Engine:
    """Attach micro-batch clipping to an unchanged model and optimizer.

    After ``attach``, ``loss.backward(); optimizer.step()`` applies, per step,
    ``p.grad = (sum_j clip(g_j) + noise) / M``, where ``g_j`` is the mean gradient
    of micro-batch ``j`` (``micro_batch_size`` examples) and ``M`` the number of
    micro-batches. "Micro-batch" is the clipping unit (TF Privacy's meaning),
    not a memory chunk.

    Args:
        model: the model; it stays the same object (hooks only).
        optimizer: any torch optimizer over the model's parameters; the engine
            writes ``p.grad`` in a step pre-hook.
        micro_batch_size: ``b``. 1 is per-example clipping (DP-SGD); the batch
            size is ordinary clipping of the whole batch.
        max_grad_norm: the bound ``C``. With ``clipping="per_layer"``: one float
            (split equally, ``C/sqrt(K)`` per parameter), a list (one per trainable
            parameter, in ``model.named_parameters()`` order) or a dict by name.
        clipping: ``"fixed"`` (min(1, C/||g_j||)), ``"adaptive"`` (the bound is the
            smallest micro-batch norm: Wang, Algorithm 1; not DP), ``"per_layer"``,
            or ``"normalize"`` (C g_j / (||g_j|| + normalize_gamma)).
        privacy: ``dp_microclip.DP(...)`` turns on DP mode (noise, Poisson sampling through
            ``engine.data_loader``, keyed groups, a public normaliser, a ledger, refusals of
            anything without a valid guarantee); ``None`` trains noise-free, with no privacy
            claim. See :class:`dp_microclip.DP` for its fields. With ``micro_batch_size > 1``
            the sensitivity is 2C, so the accountant is given ``z / 2``.
        grouping: ``"contiguous"`` (examples ``[b j, b (j+1))``; the batch size must
            be a multiple of b), ``"keyed"`` (each example drawn into one of M groups
            independently of the others), or ``"auto"`` (contiguous when noise-free, keyed for
            batches of ``engine.data_loader`` and in DP mode).
        num_groups: M for keyed grouping (default ``ceil(B / b)`` per batch).
        loss_reduction: ``"mean"`` if your loss averages per-example losses over
            the batch (default), ``"sum"`` if it sums them. A loss that averages over
            tokens of the whole batch couples examples: use a per-example mean.
        grad_mode: ``"auto"`` picks per layer from its shapes; ``"bookkeeping"``
            (ghost norms + one weighted matmul where a rule supports it),
            ``"materialize"`` (per-group gradients), ``"func"`` (torch.func for every layer).
        fallback: for modules with parameters and no rule: ``"generic"`` (torch.func
            per micro-batch, with a warning) or ``"error"``. Default: generic when
            noise-free, error in DP mode.
        normalize_gamma: the ``gamma`` of ``clipping="normalize"``.
        batch_first: declare the batch dimension (0 if True, 1 if False) of the model's
            first input; the layout probe checks it and refuses a contradiction. Default:
            what the root module declares (``batch_first`` of MHA / transformer layers),
            else learned (dimension 0, or 1 when the probe shows a sequence-first model).
            Each layer's own batch dimension is always learned by the probe.
        seed: seeds the engine's own noise and grouping generators (default: a
            random seed from the OS; torch's global RNG is never used). For DP runs
            leave it unset: anyone who knows the seed can regenerate the noise.
        on_nonfinite: ``"skip"`` (default: a micro-batch whose gradient has a NaN or inf
            contributes zero, counted in ``engine.nonfinite_groups``, a 0-d tensor on the device, so
            that no step waits for the host) or ``"raise"`` (reads the count each pass: a host sync).
        verify_steps: for this many first steps autograd also computes each parameter's
            ordinary gradient and the engine checks its own per-example sums against it;
            a difference (a parameter read outside its module, a penalty term in the
            loss) raises instead of being silently dropped. 0 turns the check off.
        memory_budget: what the engine's own per-group tensors may take in one backward pass, respected
            before any route is timed (:class:`dp_microclip.MemoryBudget`): an int (bytes), a float in
            (0, 1] (a fraction of the device's free memory), ``"lean"`` (the leanest exact route everywhere,
            for models that barely fit) or a ``MemoryBudget(...)``. Default: the size of what the pass
            captured, capped at half the free memory. Only speed and memory change: every route is exact.
        process_parts: what several processes plug in (a reducer, a noise wrapper, a batch
            sampler); set by :func:`dp_microclip.distributed.attach`, leave it None otherwise.

    Returns:
        The :class:`Engine`. ``engine.detach()`` removes it.

    Raises:
        ConfigurationError: an invalid argument (the message names the fix).
        UnsupportedModuleError: a module cannot be handled exactly (named).
    """
    dp, p = _privacy_settings(privacy)
    noise_multiplier, target_epsilon, delta = p.noise_multiplier, p.target_epsilon, p.delta
    sample_rate, expected_batch_size, steps, epochs = p.sample_rate, p.expected_batch_size, p.steps, p.epochs
    sampling, adjacency, accountant, enforce_budget = p.sampling, p.adjacency, p.accountant, p.enforce_budget
    secure_rng, collate_keeps_order = p.secure_rng, p.collate_keeps_order
    unit = dict(privacy_unit=p.privacy_unit, max_examples_per_user=p.max_examples_per_user)
    if not isinstance(p.require_verified_loss, bool):
        raise ConfigurationError(f"DP(require_verified_loss=...) takes True or False. Found "
                                 f"{p.require_verified_loss!r}.")
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"attach(model, ...) needs a torch.nn.Module. Found {type(model).__name__}.")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigurationError(f"attach(..., optimizer) needs a torch.optim.Optimizer. Found "
                                 f"{type(optimizer).__name__}.")
    check_int("micro_batch_size", micro_batch_size)
    _choice("clipping", clipping, CLIPPING_MODES)
    _choice("grad_mode", grad_mode, GRAD_MODES)
    _choice("grouping", grouping, GROUPINGS)
    _choice("loss_reduction", loss_reduction, LOSS_REDUCTIONS)
    _choice("fallback", fallback, FALLBACKS)
    _choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
    if clipping == "per_layer":
        scalar_c, raw_bound = total_bound(max_grad_norm)
    else:
        if isinstance(max_grad_norm, (Mapping, Sequence)) and not isinstance(max_grad_norm, str):
            raise ConfigurationError(
                f"max_grad_norm must be one number for clipping={clipping!r}; per-parameter bounds need "
                'clipping="per_layer".'
            )
        scalar_c = check_positive_finite("max_grad_norm", max_grad_norm)
        raw_bound = scalar_c
    if noise_multiplier is not None:
        if not is_real(noise_multiplier) or not math.isfinite(noise_multiplier) or noise_multiplier < 0:
            raise ConfigurationError(f"noise_multiplier must be a finite number >= 0. Found {noise_multiplier!r}.")
    normalize_gamma = check_positive_finite("normalize_gamma", normalize_gamma)
    if expected_batch_size is not None:
        check_positive_finite("expected_batch_size", expected_batch_size)
    if num_groups is not None:
        check_int("num_groups", num_groups)
    check_int("verify_steps", verify_steps, minimum=0)
    memory = memory_budget_of(memory_budget)
    _choice("sampling", sampling, SAMPLINGS)
    _choice("adjacency", adjacency, ADJACENCIES)
    privacy_state = None
    public_num_groups = None
    if dp:
        privacy_state, noise_multiplier, grouping, public_num_groups = _dp_setup(
            micro_batch_size=micro_batch_size, clipping=clipping, grouping=grouping,
            noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta,
            sample_rate=sample_rate, expected_batch_size=expected_batch_size, steps=steps, epochs=epochs,
            sampling=sampling, adjacency=adjacency, accountant=accountant, enforce_budget=enforce_budget, **unit,
            require_verified_loss=p.require_verified_loss,
        )
        if not (process_parts is not None and process_parts.seed_is_secret):
            warn_seeded(seed, bool(secure_rng))  # a seed drawn from secrets and shared by processes is no user seed
        inherited = DP_HISTORY.steps_of(model.parameters())
        if inherited:
            warnings.warn(
                f"This model's parameters already took {inherited} DP step(s) under an earlier engine. "
                f"The new engine's "
                "ledger starts empty, so epsilon() refuses until you carry the history: "
                "engine.load_state_dict(old_engine.state_dict()).", UserWarning, stacklevel=user_stacklevel(),
            )
    if batch_first is not None and not isinstance(batch_first, bool):
        raise ConfigurationError(f"batch_first must be True, False or None. Found {batch_first!r}.")
    declared = declared_batch_first(model)
    # None: nothing declares it; the probe learns it (dimension 0, else 1) and checks any declaration.
    root_batch_dim = (0 if batch_first else 1) if batch_first is not None else (
        None if declared is None else (0 if declared else 1))

    def warn(key: str, message: str) -> None:
        warnings.warn(message, UserWarning, stacklevel=user_stacklevel())

    units = find_units(model, dp=dp, fallback=fallback, root_batch_dim=root_batch_dim or 0, warn=warn)
    managed = managed_parameters(units)
    names = {id(p): n for n, p in model.named_parameters()}
    managed_ids = {id(p) for p in managed}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in managed_ids]
    if missing:  # cannot happen with find_units; a guard against silent skips
        raise ConfigurationError(f"Parameters {missing} are not covered by any hooked module.")
    # A read-only view: the per-parameter bounds are part of the mechanism (their root-sum-square is the sensitivity).
    per_param = MappingProxyType(_per_param_bounds(raw_bound, managed, names) if clipping == "per_layer" else {})
    clip = ClipSettings(
        micro_batch_size=micro_batch_size, mode=clipping, max_grad_norm=scalar_c, per_param_bound=per_param,
        gamma=normalize_gamma, loss_reduction=loss_reduction, grad_mode=grad_mode, on_nonfinite=on_nonfinite,
        memory=memory,
    )
    settings = EngineSettings(
        clip=clip, raw_max_grad_norm=raw_bound, grouping=grouping, num_groups=num_groups, fallback=fallback,
        batch_first=batch_first, seed=seed, secure_rng=bool(secure_rng), collate_keeps_order=bool(collate_keeps_order),
    )
    return Engine(
        model, optimizer, settings, units, managed, root_batch_dim, privacy=privacy_state,
        sample_rate=None if sample_rate is None else float(sample_rate), public_num_groups=public_num_groups,
        verify_steps=verify_steps, parts=process_parts,
    )


def _dp_setup(*, micro_batch_size, clipping, grouping, noise_multiplier, target_epsilon, delta, sample_rate,
              expected_batch_size, steps, epochs, sampling, adjacency, accountant, enforce_budget,
              privacy_unit="example", max_examples_per_user=None, require_verified_loss=True):
    """Validate a DP configuration; return (PrivacyState, z, grouping, public M or None)."""
    from accounting.epochs import steps_for_epochs

    from .privacy import PrivacySettings, PrivacyState
    from .users import check_privacy_unit

    grouping = check_privacy_unit(privacy_unit, max_examples_per_user, micro_batch_size, grouping, sampling)
    unit = dict(privacy_unit=privacy_unit, max_examples_per_user=max_examples_per_user)

    if clipping == "adaptive":
        raise PrivacyError(
            'clipping="adaptive" sets the bound from the data (the smallest micro-batch norm), so it has no '
            'differential-privacy guarantee. Use clipping="fixed" (or "per_layer"/"normalize") with noise, or '
            "adaptive clipping without noise_multiplier/target_epsilon."
        )
    if steps is not None:
        check_int("steps", steps)
    if epochs is not None:
        check_positive_finite("epochs", epochs)
    if sample_rate is None or not is_real(sample_rate) or not (0 < sample_rate <= 1):
        raise ConfigurationError(
            f"DP mode needs sample_rate in (0, 1], the probability that a record joins a batch "
            f"(expected batch size / dataset size). Found {sample_rate!r}. engine.data_loader(dataset) then "
            "samples with it."
        )
    if delta is not None and not (0 < delta < 1):
        raise ConfigurationError(f"delta must be in (0, 1). Found {delta}.")
    try:  # an unknown accountant, or one that cannot analyse this adjacency, fails here rather than at epsilon()
        from accounting.backends import check_supported

        check_supported(accountant, adjacency)
    except ValueError as err:
        raise PrivacyError(str(err)) from err
    if grouping == "auto" or micro_batch_size == 1:
        grouping = resolve_grouping(grouping, micro_batch_size, dp=True)  # the ledger records the grouping used
    if steps is None and epochs is not None:
        steps = steps_for_epochs(epochs, sample_rate)
    if target_epsilon is not None:
        check_positive_finite("target_epsilon", target_epsilon)
        if delta is None:
            raise ConfigurationError("target_epsilon needs delta=..., e.g. attach(..., privacy=DP(delta=1e-5)).")
    if noise_multiplier is None:
        if steps is None:
            raise ConfigurationError(
                "target_epsilon without noise_multiplier needs the planned length of training to calibrate "
                "the noise: pass steps=... or epochs=...."
            )
        noise_multiplier = PrivacyState.calibrate(
            target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
            micro_batch_size=micro_batch_size, adjacency=adjacency, sampling=sampling, accountant=accountant, **unit,
        )
        calibrated = True
    else:
        calibrated = False
    public = None
    if expected_batch_size is not None:
        public = public_groups(expected_batch_size, 1 if privacy_unit == "user" else micro_batch_size)
    settings = PrivacySettings(
        micro_batch_size=micro_batch_size, clipping=clipping, grouping=grouping, sample_rate=float(sample_rate),
        noise_multiplier=float(noise_multiplier), delta=delta, target_epsilon=target_epsilon,
        planned_steps=steps, sampling=sampling, adjacency=adjacency, accountant=accountant,
        enforce_budget=enforce_budget, calibrated=calibrated, require_verified_loss=require_verified_loss, **unit,
    )
    return PrivacyState(settings), float(noise_multiplier), grouping, public


def _per_param_bounds(raw, managed: list, names: dict) -> dict[int, float]:
    """``id(param) -> C_l`` for ``clipping="per_layer"``, from a float (split equally), a list or a dict by name."""
    managed_names = [names[id(p)] for p in managed]
    if isinstance(raw, Mapping):
        unknown = set(raw) - set(managed_names)
        missing = set(managed_names) - set(raw)
        if unknown or missing:
            raise ConfigurationError(
                'clipping="per_layer": max_grad_norm must give a bound for every trainable parameter '
                f"name. Missing: {sorted(missing)}; unknown: {sorted(unknown)}."
            )
        return {id(p): float(raw[names[id(p)]]) for p in managed}
    if isinstance(raw, tuple):
        if len(raw) != len(managed):
            raise ConfigurationError(
                f'clipping="per_layer": got {len(raw)} bounds for {len(managed)} trainable '
                f"parameters ({managed_names}). Give one per parameter, a dict by name, or one float C "
                "(split as C/sqrt(number of parameters) so the total bound is C)."
            )
        return {id(p): float(c) for p, c in zip(managed, raw)}
    share = float(raw) / math.sqrt(len(managed))
    return {id(p): share for p in managed}


def _privacy_settings(privacy: DP | None) -> tuple[bool, DP]:
    """``(DP mode?, the DP settings)`` from ``privacy=DP(...)``; noise-free engines get the defaults."""
    if privacy is None:
        return False, DP()
    if not isinstance(privacy, DP):
        raise ConfigurationError(f"privacy must be a dp_microclip.DP(...). Found {type(privacy).__name__}.")
    if privacy.noise_multiplier is None and privacy.target_epsilon is None:
        raise ConfigurationError(
            "privacy=DP(...) needs noise: DP(noise_multiplier=z, ...) or DP(target_epsilon=eps, delta=..., "
            "epochs=...). For noise-free clipping leave privacy out."
        )
    return True, privacy
