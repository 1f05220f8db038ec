"""The loss side of DP mode's per-example contract: ``engine.loss`` reduces a verified per-example loss vector.

The sensitivity behind epsilon assumes that the loss is ``(1/B) sum_i l_i`` (or ``sum_i l_i``) where
``l_i`` depends on example ``i`` only. The hooks see the loss only through first-order output gradients,
which cannot tell ``mean_i l(y_i)`` from ``sum_i w_i l(y_i) / sum_i w_i`` (docs/privacy.md). So
:meth:`dp_microclip.Engine.loss` takes the loss FUNCTION and its arguments, and this module:

* asks for a per-example vector: ``loss_fn(*args, **kwargs)`` must return shape ``(B,)`` (a scalar or a
  ``(B, T)`` tensor is refused with the fix), and reduces it by the engine's ``loss_reduction``, so the
  reduction the clipping assumes and the one backpropagated cannot differ;
* identifies coupling by content, as ``contract.rows_mixed`` does for the model: on the first DP batch of
  each signature it evaluates ``loss_fn`` again, without gradients, on the whole batch and on subsets of
  it (every batched tensor argument cut along dimension 0, inside tuples, lists, dicts, dataclasses and
  HuggingFace ``ModelOutput``), and each kept example's loss must equal its loss in the whole batch;
* refuses a DP step whose loss did not go through ``engine.loss`` (``DP(require_verified_loss=True)``, the default),
  and otherwise warns once and lets the privacy statement say so (:func:`loss_statement`).

Subsets. With ``U`` units (examples; users under user-level DP, whose rows stay together because a user's
examples share one clipped micro-batch), for each bit ``k`` of the unit index the units whose bit ``k`` is 0,
then those whose bit is 1: ``2 ceil(log2 U)`` evaluations of about half the batch. Any two units differ in
some bit, so for every pair ``(i, j)`` one evaluation keeps ``i`` without ``j``: a loss in which ``j`` moves
``l_i`` (an in-batch contrastive loss, a division by the batch size, a token count or a sum of weights over
the batch) changes ``l_i`` there. A batch of one unit is compared with itself doubled (the unit and a copy).
Each evaluation forks torch's RNG to one saved state, with dropout off (``contract.NoDropout``), so random
draws in ``loss_fn`` do not look like coupling; the caller's RNG stream is left as it was.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .contract import NoDropout
from .errors import ConfigurationError, PrivacyError
from .tensors import LOW_PRECISION, map_tensors, output_tensors

_SCALARS = (int, float, bool, str, type(None))


def _tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a loss compared between a whole batch and a subset (kernels may sum differently)."""
    return 1e-9 if dtype == torch.float64 else 3e-2 if dtype in LOW_PRECISION else 1e-4


def take_rows(obj, rows: torch.Tensor, batch_size: int):
    """``obj`` with every tensor whose dimension 0 has ``batch_size`` rows replaced by ``rows`` of it.

    Tensors of other sizes (class weights, a temperature) and non-tensors pass unchanged; nests are walked by
    :func:`~dp_microclip.tensors.map_tensors`.
    """
    def cut(_path: str, t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, rows.to(t.device)) if t.dim() > 0 and t.shape[0] == batch_size else t

    return map_tensors(obj, cut, "")


def _function_key(fn) -> tuple:
    """What identifies a loss function across steps: its code (a lambda made anew each step keeps its code),
    a partial's function and arguments, a bound method's function and object, else the object itself."""
    if hasattr(fn, "func") and hasattr(fn, "keywords"):  # functools.partial
        return ("partial", _function_key(fn.func), _structure(fn.args, -1), _structure(fn.keywords, -1))
    if hasattr(fn, "__func__"):
        return ("method", getattr(fn.__func__, "__code__", fn.__func__), id(fn.__self__))
    code = getattr(fn, "__code__", None)
    return ("code", code) if code is not None else ("object", type(fn), id(fn))


def _structure(obj, batch_size: int):
    """The signature of ``loss_fn``'s arguments: nesting, and each tensor's dtype and shape, the batch size
    left out (Poisson batches change it every step); simple values by value, other objects by type.
    (A hand-written walk: ``torch.utils._pytree`` costs about ten times more, on every call.)"""
    if torch.is_tensor(obj):
        batched = obj.dim() > 0 and obj.shape[0] == batch_size
        return (obj.dtype, batched, tuple(obj.shape[1:] if batched else obj.shape))
    if isinstance(obj, (list, tuple)):
        return (type(obj), tuple(_structure(o, batch_size) for o in obj))
    if isinstance(obj, dict):  # HuggingFace ModelOutput too (its fields that are set)
        return (type(obj), tuple((k, _structure(v, batch_size)) for k, v in obj.items()))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj), tuple(_structure(getattr(obj, f.name), batch_size) for f in dataclasses.fields(obj)))
    return obj if isinstance(obj, _SCALARS) else type(obj)


def _check_vector(per_example, batch_size: int | None, where: str) -> torch.Tensor:
    """``per_example`` as returned by ``loss_fn``, or a ConfigurationError naming the fix."""
    if not torch.is_tensor(per_example) or not per_example.is_floating_point():
        raise ConfigurationError(
            f"{where} returned {type(per_example).__name__}"
            f"{'' if not torch.is_tensor(per_example) else f' of dtype {per_example.dtype}'}: it must return a "
            "floating tensor of per-example losses, shape (B,)."
        )
    if per_example.dim() == 0:
        raise ConfigurationError(
            f"{where} returned a scalar: the loss is already reduced over the batch, so nobody can check that each "
            "example's loss depends on that example only. Return one loss per example, shape (B,): pass "
            "reduction='none' to torch losses (F.cross_entropy(logits, y, reduction='none')); for token-level "
            "losses average each example's own tokens (dp_microclip.losses.causal_lm_per_example_loss or "
            "per_example_mean_loss). engine.loss then reduces by attach(..., loss_reduction=...)."
        )
    if per_example.dim() != 1:
        raise ConfigurationError(
            f"{where} returned shape {tuple(per_example.shape)}: it must return one loss per example, shape (B,). "
            "Reduce each example's own entries, e.g. .flatten(1).mean(1), or dp_microclip.losses.per_example_mean("
            "token_losses, mask) for masked tokens (a mean over the whole batch's tokens would couple examples)."
        )
    if batch_size is not None and per_example.shape[0] != batch_size:
        raise ConfigurationError(
            f"{where} returned {per_example.shape[0]} losses, but the latest forward pass of the attached model "
            f"had {batch_size} examples. Compute the loss of that forward's output: out = model(x); loss = "
            "engine.loss(loss_fn, out, y); loss.backward()."
        )
    return per_example


def _unit_subsets(units: torch.Tensor) -> list[torch.Tensor]:
    """Row sets (sorted row indices) that separate every pair of distinct units: for each bit of the unit
    index, the rows whose unit has that bit 0, then 1. One unit: all rows and a copy of them."""
    _, index = torch.unique(units, return_inverse=True)
    count = int(index.max()) + 1
    rows = torch.arange(len(units))
    if count == 1:
        return [torch.cat([rows, rows])]
    subsets = []
    for bit in range(math.ceil(math.log2(count))):
        has_bit = (index >> bit) & 1 == 1
        subsets += [rows[~has_bit], rows[has_bit]]
    return subsets


def coupling_problem(loss_fn: Callable, args: tuple, kwargs: dict, units: torch.Tensor) -> str | None:
    """Whether ``loss_fn``'s per-example losses change when other units of the batch are removed.

    Args:
        loss_fn: returns a ``(B,)`` vector from ``args`` and ``kwargs``.
        units: ``(B,)`` the unit of each row (the row itself, or its user).

    Returns:
        None when every kept example's loss matches its loss in the whole batch; else a description.

    Raises:
        ConfigurationError: ``loss_fn`` fails on a subset or returns a vector of another length.
    """
    batch_size = len(units)
    devices = sorted({t.device.index for t in output_tensors((args, kwargs)) if t.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=devices), NoDropout():
        state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]

        def evaluate(rows: torch.Tensor | None) -> torch.Tensor:
            torch.set_rng_state(state)
            for d, s in zip(devices, cuda_states):
                torch.cuda.set_rng_state(s, d)
            if rows is None:
                return loss_fn(*args, **kwargs)
            sub_args, sub_kwargs = take_rows(args, rows, batch_size), take_rows(kwargs, rows, batch_size)
            try:
                out = loss_fn(*sub_args, **sub_kwargs)
            except Exception as err:
                raise ConfigurationError(
                    f"engine.loss checks in DP mode that each example's loss depends on its own example only, by "
                    f"evaluating loss_fn again (under torch.no_grad()) on subsets of the batch, each tensor argument "
                    f"with {batch_size} rows cut along dimension 0. loss_fn failed on a subset of {len(rows)} rows: "
                    f"{type(err).__name__}: {err}. Pass batched tensors with the batch in dimension 0 (a sequence-"
                    "first output (T, B, ...): out.transpose(0, 1)), and anything that is not batched (class weights "
                    "of size B, a similarity matrix) inside loss_fn (a closure or functools.partial)."
                ) from err
            if not (torch.is_tensor(out) and out.shape == rows.shape):
                raise ConfigurationError(
                    f"loss_fn returned shape {tuple(out.shape) if torch.is_tensor(out) else type(out).__name__} for "
                    f"a subset of {len(rows)} of the {batch_size} rows (engine.loss's DP check cuts each tensor "
                    "argument along dimension 0). Pass tensors with the batch in dimension 0 (a sequence-first "
                    "output (T, B, ...): out.transpose(0, 1)), and capture anything else in loss_fn (a closure)."
                )
            return out

        reference = evaluate(None).detach()
        tolerance, full = _tolerance(reference.dtype), reference.double()
        for rows in _unit_subsets(units):
            part = evaluate(rows).detach().double()
            want = full.index_select(0, rows.to(full.device))
            finite = want[torch.isfinite(want)]
            floor = max(1e-3 * float(finite.abs().max()), 1e-30) if finite.numel() else 1e-30
            diff = (part - want).abs().nan_to_num(nan=math.inf)
            diff = torch.where(torch.isnan(part) & torch.isnan(want), torch.zeros_like(diff), diff)
            bad = (diff > tolerance * want.abs().nan_to_num(0.0).clamp(min=floor)).nonzero().flatten()
            if bad.numel():
                removed = sorted(set(range(batch_size)) - set(rows.tolist()))
                change = (f"rows {removed[:8]}{' ...' if len(removed) > 8 else ''} are removed" if removed
                          else "a copy of the batch joins it")
                return (f"the loss of example {int(rows[bad[0]])} is {float(want[bad[0]]):.6g} in the whole batch "
                        f"of {batch_size} but {float(part[bad[0]]):.6g} when {change}")
    return None


class LossContract:
    """The engine's part behind :meth:`dp_microclip.Engine.loss`: reduce, verify once per signature, count steps.

    Args:
        dp: DP mode (verify; otherwise only reduce).
        reduction: the engine's ``loss_reduction`` (``"mean"`` over the forward's batch, or ``"sum"``).
        require_verified: ``DP(require_verified_loss=...)``: refuse a DP step whose loss skipped ``engine.loss``.
        user_level: ``DP(privacy_unit="user")``: a user's rows stay together in the subsets (their losses may
            depend on each other: the user's micro-batch is clipped as one).
        warn_once: the capture sink's ``warn_once`` (warnings point at the user's line).
    """

    def __init__(self, dp: bool, reduction: str, require_verified: bool, user_level: bool,
                 warn_once: Callable[[str, str], None]):
        self.dp, self.reduction, self.require_verified, self.user_level = dp, reduction, require_verified, user_level
        self._warn_once = warn_once
        self._verified: set = set()  # signatures (loss function, argument structure) checked on a batch of 2+ units
        self._passes: set[int] = set()  # autograd graph tasks that ran through a scalar engine.loss returned

    @classmethod
    def for_engine(cls, clip, privacy, warn_once: Callable[[str, str], None]) -> LossContract:
        """The contract of an engine with these ``settings.ClipSettings`` and ``privacy.PrivacySettings`` (None:
        noise-free)."""
        return cls(privacy is not None, clip.loss_reduction, bool(privacy and privacy.require_verified_loss),
                   privacy is not None and privacy.privacy_unit == "user", warn_once)

    def reduce(self, loss_fn: Callable, args: tuple, kwargs: dict, batch_size: int | None, groups) -> torch.Tensor:
        """``loss_fn(*args, **kwargs)``, a ``(B,)`` vector, reduced to the scalar to backpropagate.

        Args:
            batch_size: the batch size of the attached model's latest captured forward pass (None: none since
                the last step).
            groups: that forward's ``grouping.Groups`` (the users, under user-level DP).

        Raises:
            ConfigurationError: ``loss_fn`` is not callable or does not return ``(B,)``; DP mode: no forward pass
                of the model since the last step.
            PrivacyError: DP mode: an example's loss depends on other examples of the batch.
        """
        if not callable(loss_fn):
            raise ConfigurationError(
                f"engine.loss(loss_fn, *args, **kwargs) takes the loss FUNCTION first, then its arguments. Found "
                f"{type(loss_fn).__name__}. Write loss = engine.loss(F.cross_entropy, logits, y, reduction='none') "
                "or engine.loss(my_per_example_loss, outputs, labels): loss_fn must return one loss per example."
            )
        per_example = loss_fn(*args, **kwargs)
        training = torch.is_tensor(per_example) and per_example.requires_grad and torch.is_grad_enabled()
        per_example = _check_vector(per_example, batch_size if training else None, "loss_fn")  # eval: any batch
        loss = per_example.sum() if self.reduction == "sum" or len(per_example) == 0 else per_example.mean()
        if not (self.dp and training):
            return loss  # noise-free mode, or an evaluation: nothing to verify
        if batch_size is None:
            raise ConfigurationError(
                "engine.loss(...) was called in DP mode with no forward pass of the attached model since the last "
                "optimizer.step(): its loss belongs to no sampled batch. Call out = model(x); loss = engine.loss("
                "loss_fn, out, y); loss.backward(); optimizer.step(), in that order, once per step."
            )
        key = (_function_key(loss_fn), _structure((args, kwargs), batch_size))
        if key not in self._verified and batch_size > 0:
            units = groups.index.cpu() if self.user_level and groups is not None else torch.arange(batch_size)
            problem = coupling_problem(loss_fn, args, kwargs, units)
            if problem is not None:
                raise PrivacyError(coupling_error(problem, self.user_level))
            if len(torch.unique(units)) > 1:
                self._verified.add(key)  # one unit was compared with a copy of itself only: check the next batch
        loss.register_hook(self._mark_pass)
        return loss

    def _mark_pass(self, grad: torch.Tensor) -> None:
        self._passes.add(torch._C._current_graph_task_id())

    def step_verified(self, passes: int) -> bool:
        """At a DP step: whether each of its ``passes`` backward passes ran through ``engine.loss``.

        Raises:
            PrivacyError: not verified, with ``DP(require_verified_loss=True)`` (the default).
        """
        verified, self._passes = passes == 0 or len(self._passes) >= passes, set()
        if not verified:
            if self.require_verified:
                raise PrivacyError(
                    "DP mode: this step's backward pass did not run through a loss returned by engine.loss(...), "
                    "so nothing verified that each example's loss depends on that example only, as epsilon assumes "
                    "(a class-weighted mean or an in-batch contrastive loss would break it silently). Compute the "
                    "loss as loss = engine.loss(loss_fn, out, y), with loss_fn returning one loss per example (e.g. "
                    "F.cross_entropy(..., reduction='none')), and call loss.backward(). If your framework owns the "
                    "backward call, attach(..., privacy=DP(..., require_verified_loss=False)) lets such steps run "
                    "with a warning and a privacy statement that says the loss was not verified."
                )
            self._warn_once("loss-unverified", UNVERIFIED_WARNING)
        return verified


#: Warned once per engine at the first DP step whose loss skipped engine.loss.
UNVERIFIED_WARNING = (
    "DP mode: this step's loss did not go through engine.loss(...), so only a few known patterns were checked "
    "(a model's own labels= loss, normalised cross-entropy weights): that each example's loss depends on that "
    "example only, as epsilon assumes, is unverified, and privacy_statement() says so. Verify it with loss = "
    "engine.loss(loss_fn, out, y) (loss_fn returning one loss per example, e.g. F.cross_entropy(..., "
    "reduction='none')); it runs only because of DP(require_verified_loss=False), and the default refuses it."
)


def coupling_error(problem: str, user_level: bool) -> str:
    """The message of a loss that couples examples (DP mode refuses it at ``engine.loss``)."""
    unit = "user" if user_level else "example"
    return (
        f"engine.loss verified in DP mode that each {unit}'s loss depends on that {unit} only, by evaluating loss_fn "
        f"again without gradients on subsets of the batch: {problem}. The loss couples {unit}s, so one record "
        "moves the other micro-batches' gradients and the sensitivity epsilon assumes does not hold. Common causes "
        "and fixes: a mean or a normaliser over the batch inside loss_fn (reduction='mean', class weights or "
        "ignore_index normalised by the batch, a division by the batch size or by the batch's token count) -> "
        "return each example's own loss (reduction='none'; a mean over each example's own tokens: dp_microclip."
        "losses.per_example_mean) and let engine.loss reduce; an in-batch contrastive loss (the other examples of "
        "the batch as negatives) has no per-example form under DP-SGD -> use negatives that are not private "
        "(a fixed public set) or a per-example objective; an argument whose dimension 0 happens to equal the "
        "batch size but is not batched (class weights) -> pass it inside loss_fn (a closure or functools.partial)."
    )


def loss_statement(unverified_steps: int, steps: int) -> str:
    """The privacy statement's sentence on the loss side of the per-example contract."""
    if steps == 0:
        return ""
    if unverified_steps == 0:
        return (" Every step's loss went through engine.loss(...), which checked on the first batch of each input "
                "signature that each example's loss depends on that example only (docs/privacy.md).")
    return (f" {unverified_steps} of the {steps} steps computed their loss outside engine.loss(...): that each "
            "example's loss depends on that example only (the per-example mean epsilon assumes) was not verified "
            "for them beyond the patterns docs/privacy.md lists. Use loss = engine.loss(loss_fn, out, y).")
