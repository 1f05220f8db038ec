"""Turn one backward pass's records into clipped per-parameter sums.

For each forward context (one batch, its groups), with S_j the sum over group j
of the captured output-gradient contributions and s the loss-reduction scale
(B for a mean loss, 1 for a sum), the micro-batch gradient is

    g_j = (s / |G_j|) * S_j                  (the mean gradient of micro-batch j)

and the pass contributes ``sum_j f_j g_j`` to the step's sum, with clip factors
``f_j`` from :mod:`dp_microclip.clipping`. Squared norms of S_j come either from
a rule's ghost norms (no group gradient materialised) or from materialised
group gradients; the clipped sum is then a weighted sum with one weight per
example, or an einsum over the materialised group gradients.

A parameter that appears in more than one record of a context (a module called
twice, or a weight tied between two modules) gets its group gradients
materialised from every record and summed BEFORE the norm, so the cross terms
between its uses are in the norm. Nothing is dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from . import clipping as clip
from .records import ForwardContext, Record, grad_tensors
from .layers.generic import generic_group_grads
from .fused import JoinedBlock, RowBuffer, ghost_norms, gram_total, joinable, zero_rows
from .layers.registry import GramDot, NormProduct, Unsquared
from .planner import lean_rows, record_shape
from .settings import ClipSettings
from .routes import Autotuner, available_routes, pass_routes
from .tensors import LOW_PRECISION, avoid_host_reads


@dataclass
class PassResult:
    """Clipped gradients of one backward pass, already averaged: ``sum_j f_j g_j / num_groups``.

    Storing the mean (not the sum) saves a division over every parameter at the
    step; passes and contexts are combined with :func:`merge_means`.
    """

    sums: dict = field(default_factory=dict)  # id(param) -> (param, clipped mean)
    num_groups: float = 0.0  # the divisor used (public M in DP mode)
    #: One ``((M,) norms, scale)`` per context: the group norms are ``norms * scale`` (the group mean's scale,
    #: folded into the clip weights where it is a number; formed only when read: :func:`joined_norms`).
    norm_parts: list = field(default_factory=list)
    min_norm: float = float("inf")  # smallest norm over non-empty groups (adaptive)
    strategies: dict = field(default_factory=dict)  # record name -> strategy used
    #: Which groups' gradient had a NaN/inf (they contributed zero): one ``(M,)`` bool mask per context on the
    #: device, counted only when read (``fused.NonfiniteCount``), so that no step waits for the host or
    #: launches a count.
    nonfinite_masks: list = field(default_factory=list)
    #: One ``(weights (M,), to_average)`` per context, the weights being ``factors * to_average`` (None: per_layer).
    group_weights: list = field(default_factory=list)

    @property
    def group_norms(self) -> list:
        """One ``(M,)`` tensor of group-gradient norms per context, formed on access only."""
        return [n if scale == 1.0 else n * scale for n, scale in self.norm_parts]

    @property
    def group_factors(self) -> list:
        """One ``(M,)`` tensor of clip factors per context (None: per_layer), computed on access only."""
        return [None if w is None else w[0] / w[1] for w in self.group_weights]


def merge_means(acc: dict, acc_count: float, new: dict, new_count: float) -> tuple[dict, float]:
    """Combine two averages over ``acc_count`` and ``new_count`` groups into one over their sum.

    Tensors in ``acc`` are updated in place (they belong to the engine).
    """
    if acc_count == 0:
        return new, new_count
    total = acc_count + new_count
    keep, add = acc_count / total, new_count / total
    for pid, (p, value) in acc.items():
        value.mul_(keep)
    for pid, (p, value) in new.items():
        if pid in acc:
            acc[pid][1].add_(value, alpha=add)
        else:
            acc[pid] = (p, value * add)
    return acc, total


@contextmanager
def parametrizations_still(records):
    """Parametrizations in eval mode while the engine reads them after the forward: a parametrized weight
    (a rule's ``layer.weight``, the chain rule's pullback) is then the tensor the forward used, computed from
    the state the forward left, with no second in-place update (spectral norm's power iteration)."""
    lists = {id(pl): pl for r in records for pl in r.unit.parametrized.values()}
    modes = {key: pl.training for key, pl in lists.items()}
    for pl in lists.values():
        pl.train(False)
    try:
        yield
    finally:
        for key, pl in lists.items():
            pl.train(modes[key])


def clip_and_sum(
    records: list[Record], settings: ClipSettings, replay_guard, divisor_of: Callable[[ForwardContext], float],
    tuner: Autotuner | None = None, release: bool = False,
) -> PassResult:
    """Clipped, averaged gradients of one backward pass; ``divisor_of(ctx)`` is the M of a batch.

    ``release``: the caller hands the records over (``records`` is emptied), so that each record's captured
    tensors are freed as soon as its last use is done instead of at the end of the pass.
    """
    result = PassResult()
    by_context: dict[int, list[Record]] = {}
    for record in records:
        by_context.setdefault(record.ctx.id, []).append(record)
    if release:
        records.clear()
        if by_context:
            del record  # the loop variable: no reference may outlive the record's last use
    tuner = tuner or Autotuner()
    with parametrizations_still([r for rs in by_context.values() for r in rs]):
        for key in list(by_context):
            ctx_records = by_context.pop(key) if release else by_context[key]
            _one_context(ctx_records, settings, replay_guard, result, float(divisor_of(ctx_records[0].ctx)),
                         tuner, release)
    return result


class EarlyReduction:
    """Lean mode: a record whose only exact route is materialised group gradients is reduced to them as soon
    as its output gradient arrives, when they are smaller than what it captured.

    Its inputs and output gradient are then freed during the backward pass instead of at its end, so the
    engine's memory does not grow with every such layer (LayerNorm, convolutions) while autograd still holds
    the rest of the graph. Nothing changes in the numbers: the same group gradients, computed earlier.
    Records stay whole while the first-step check or an observer needs their tensors (``allowed()``).
    """

    def __init__(self, settings: ClipSettings, tuner: Autotuner, allowed: Callable[[], bool]):
        self.settings = settings
        self.tuner = tuner
        self.allowed = allowed

    def __call__(self, record: Record) -> Record:
        """The record, or the same record holding only its group gradients."""
        if not self.settings.memory.lean or record.call or record.rule is None or record.ctx.batch_size == 0:
            return record
        if not torch.is_tensor(record.out_grad) or not self.allowed():
            return record
        # Materialisation is forced whatever the other records are (no ghost norms, a parametrization).
        forced = record.unit.parametrized or not record.rule.has_ghost or self.settings.grad_mode == "materialize"
        if not forced or available_routes(record, self.settings, Counter()) != ("materialize",):
            return record
        groups = record.ctx.groups.to(record.out_grad.device)
        params = sum(p.numel() for p in record.params.values())
        if groups.num_groups * params >= _numel(record.inputs) + record.out_grad.numel():
            return record  # the group gradients would take more than the record holds
        full = _in_float32(record)
        with parametrizations_still([record]):
            grads = chain_parametrizations(full, self.tuner.group_grads(full, groups))
        return replace(record, inputs=(), kwargs={}, out_grad=record.out_grad.new_empty((0,)), group_grads=grads)


def _numel(inputs) -> int:
    return sum(x.numel() for x in inputs if torch.is_tensor(x))


def _one_context(
    given: list[Record], settings: ClipSettings, replay_guard, result: PassResult, divisor: float, tuner: Autotuner,
    release: bool = False,
) -> None:
    ctx = given[0].ctx
    if ctx.batch_size == 0:  # an empty Poisson batch: no gradient, but its groups still count in M
        result.sums, result.num_groups = merge_means(result.sums, result.num_groups, {}, divisor)
        return
    device = grad_tensors(given[0])[0].device
    groups = ctx.groups.to(device)
    records: list = [_in_float32(r) for r in given]  # bf16/fp16 (autocast): norms and factors in float32
    if release:
        given.clear()  # from here on this function holds the only references: each record is dropped after use
    uses = Counter(id(p) for r in records for p in r.params.values())
    params = {id(p): p for r in records for p in r.params.values()}

    norms: dict[int, "torch.Tensor | Unsquared"] = {}  # squared, or Unsquared (the rule's choice)
    materialised: dict[int, torch.Tensor] = {}
    ghost_index: list[int] = []  # records whose sum is a weighted product over rows
    memory = settings.memory
    routes = pass_routes(records, groups, settings, uses, device, tuner)
    # On an accelerator, row-factored layers (Linear on (B, d)) join one buffer: their norms, masking, weights
    # and sums in a few launches for all (fused.RowBuffer). Deferred: their norms are formed after the loop.
    rowed: dict | None = {} if avoid_host_reads(device) and settings.mode != "per_layer" and not memory.lean \
        else None
    for position, record in enumerate(records):
        if record.group_grads is not None:  # reduced as it arrived (lean mode, EarlyReduction): already held
            result.strategies[record.name] = "materialize"
            for name, p in record.params.items():
                g = record.group_grads[name]
                materialised[id(p)] = g if id(p) not in materialised else materialised[id(p)] + g
            if release:
                records[position] = None
            continue
        strategy = routes[position]
        result.strategies[record.name] = strategy
        if strategy == "ghost" and rowed is not None and (found := RowBuffer.factors_of(record, groups, uses, rowed)):
            rowed[position] = found
            continue
        grads: dict | None = None
        if strategy == "ghost":  # grads: group gradients the rule built for its norms (small): summed as such
            record_norms, grads = ghost_norms(record, groups, not (memory.lean or memory.explicit))
        elif strategy == "norms_then_sum":
            record_norms = {n: Unsquared(_group_norms(g)) for n, g in tuner.group_grads(record, groups).items()}
        if strategy in ("ghost", "norms_then_sum") and grads is None:
            for name, p in record.params.items():
                norms[id(p)] = record_norms[name]
            ghost_index.append(position)
            continue
        if strategy == "func":
            grads = generic_group_grads(
                record.unit.module, record.params, record.inputs, record.kwargs, record.out_grad,
                groups, record.batch_dim, replay_guard, record.unit.path, record.input_dims,
                record.kw_names,
            )
        elif strategy != "ghost":
            grads = chain_parametrizations(
                record, tuner.group_grads(record, groups))
        assert grads is not None
        for name, p in record.params.items():
            g = grads[name]
            materialised[id(p)] = g if id(p) not in materialised else materialised[id(p)] + g
        del grads
        if release:
            records[position] = None  # its group gradients are all this pass still needs of it
    if records:
        del record
    rows_buffer = RowBuffer.build(records, rowed, materialised, groups) if rowed else None
    if rows_buffer is not None:
        norms.update(rows_buffer.norms(records, groups))
    for position in rowed if rowed and rows_buffer is None else ():  # not joinable: the rule's own ghost route
        found = ghost_norms(records[position], groups)[0]
        norms.update({id(p): found[name] for name, p in records[position].params.items()})
        ghost_index.append(position)
    blocks = [] if settings.mode == "per_layer" else [JoinedBlock(parts) for parts in joinable(materialised).values()]
    for position, block in enumerate(blocks):  # small group gradients: one norm, fill and sum per block
        norms[-1 - position] = Unsquared(block.norms)  # a key no parameter has; whole-gradient modes only
        for pid in block.shapes:
            del materialised[pid]
    for pid, g in materialised.items():
        norms[pid] = Unsquared(_group_norms(g))  # (M,), one pass

    scale = float(ctx.batch_size) if settings.loss_reduction == "mean" else 1.0
    if groups.equal_size is not None:
        # Contiguous groups all hold b examples: the group mean is a constant (no kernel launched for it).
        to_mean: torch.Tensor | float = scale / groups.equal_size
        nonempty = None
    else:
        first = next(iter(norms.values()))  # a tensor, or a norm form whose first field is one: no launch
        sizes = groups.sizes.to(device=device, dtype=first.dtype if torch.is_tensor(first) else first[0].dtype)
        nonempty = sizes > 0
        # g_j = to_mean_j * S_j; empty groups (keyed grouping) contribute nothing.
        to_mean = torch.where(nonempty, scale / sizes.clamp(min=1.0), torch.zeros_like(sizes))  # (M,)

    total_norm = _combined_norm(list(norms.values()))  # (M,), of the group sums
    norm_scale = 1.0
    if isinstance(to_mean, float) and settings.mode in ("fixed", "normalize"):
        norm_scale = to_mean  # the mean's scale goes into the clip weights' one add (a launch fewer)
    else:
        total_norm = total_norm * to_mean  # (M,), of the group means
    # Non-finite groups are handled on the device, with no host read: a NaN/inf anywhere in a group's gradient
    # gives it weight zero (a bounded contribution, so the sensitivity holds), and its rows are zeroed in what
    # the sums read so that 0 * NaN cannot reach the other groups' sums.
    bad = total_norm.lt(math.inf).logical_not_()  # NaN or inf: two kernels (torch.isfinite launches four)
    result.nonfinite_masks.append(bad)
    if settings.on_nonfinite == "raise" and int(bad_count := bad.sum()):  # opt-in: the read waits for the device
        raise FloatingPointError(
            f"{int(bad_count)} micro-batch gradient(s) had a NaN or inf norm. Check the inputs and the loss, or "
            'attach with on_nonfinite="skip" to let such micro-batches contribute zero.'
        )
    # On an accelerator a host read drains the launch queue, so every tensor the sums read is masked on the device;
    # on the CPU the flag is read and rows are masked only when a group is bad (the copies cost 8-25% of a CPU
    # step, benchmarks/results/cpu-launches.md).
    if avoid_host_reads(bad.device) or bool(bad.any()):
        records, materialised = zero_rows(records, ghost_index, materialised, bad, groups, blocks)
        if rows_buffer is not None:
            rows_buffer.mask(bad, groups)
    weights: dict[int, torch.Tensor] = {}
    to_average = to_mean / divisor  # folds the final 1/M into the per-group weights
    if settings.mode == "per_layer":
        result.group_weights.append(None)
        for pid, value in norms.items():
            norm_p = _norm_of(value) * to_mean
            weights[pid] = (clip.fixed_factors(norm_p, settings.per_param_bound[pid]) * to_average).masked_fill_(
                bad, 0.0)
    else:
        group_weight = clip.group_weights(settings.mode, total_norm, settings.max_grad_norm, settings.gamma,
                                          to_average, norm_scale)  # (M,)
        if settings.mode != "fixed":  # fixed: finite for a NaN norm, and the group's rows are zero anyway
            group_weight.masked_fill_(bad, 0.0)
        result.group_weights.append((group_weight.detach(), to_average))
        weights = {pid: group_weight for pid in norms}

    if settings.mode == "adaptive":  # rho needs the host (acc.min_norm): adaptive clipping reads one value a pass
        usable = ~bad if nonempty is None else nonempty & ~bad
        result.min_norm = min(result.min_norm, float(torch.where(usable, total_norm, math.inf).min()))
    result.norm_parts.append((total_norm.detach(), norm_scale))
    sums: dict = {}

    def add(pid: int, value: torch.Tensor) -> None:
        if pid in sums:
            sums[pid][1].add_(value)
        else:
            sums[pid] = (params[pid], value)

    for pid in list(materialised):
        g = materialised.pop(pid) if release else materialised[pid]
        add(pid, torch.einsum("m,m...->...", weights[pid].to(g.dtype), g))
        del g
    for block in blocks:
        for pid, value in block.weighted(group_weight).items():
            add(pid, value)
    if rows_buffer is not None:  # every output gradient weighted in one launch, then a matmul per weight
        rows_buffer.weigh(group_weight, groups)
        for pid, value in rows_buffer.sums(records):
            add(pid, value)
    shared_rows = None if settings.mode == "per_layer" or not ghost_index else groups.rows(group_weight)  # (B,)
    for i in ghost_index:
        record = records[i]
        if release:
            records[i] = None
        row_weight = {name: shared_rows if shared_rows is not None else groups.rows(weights[id(p)])
                      for name, p in record.params.items()}
        rows = lean_rows(record_shape(record, groups, ())) if memory.lean else None
        for name, value in _weighted_sum(record, row_weight, rows).items():
            add(id(record.params[name]), value)
        del record
    result.sums, result.num_groups = merge_means(result.sums, result.num_groups, sums, divisor)


def _weighted_sum(record: Record, row_weight: dict, rows: int | None) -> dict:
    """The rule's row-weighted sum, in chunks of ``rows`` examples when given (lean mode: the scaled copy of
    the output gradient stays small). A weighted sum is a sum over examples, so the chunks add up to it."""
    rule = record.rule
    assert rule is not None and rule.weighted_sum is not None  # ghost routes need has_ghost
    assert isinstance(record.out_grad, torch.Tensor)  # rule records have one output tensor
    batch = record.out_grad.shape[0]
    if rows is None or rows >= batch:
        return rule.weighted_sum(record.layer, record.inputs, record.out_grad, row_weight)

    def rows_of(x, start: int):
        return x[start:start + rows] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == batch else x

    total: dict = {}
    for start in range(0, batch, rows):
        part = rule.weighted_sum(record.layer, tuple(rows_of(x, start) for x in record.inputs),
                                 record.out_grad[start:start + rows],
                                 {name: w[start:start + rows] for name, w in row_weight.items()})
        for name, value in part.items():
            total[name] = value if name not in total else total[name].add_(value)
    return total


def _in_float32(record: Record) -> Record:
    """The record with 16-bit tensors upcast to float32, so that norms and clip factors are accurate.

    In bf16 a group norm is off by up to ~0.5%, enough for a clipped group to exceed C; under autocast
    the captured input and output gradient may also differ in dtype.
    """
    def up(x):
        return x.float() if torch.is_tensor(x) and x.dtype in LOW_PRECISION else x

    tensors = list(record.inputs) + grad_tensors(record)
    if not any(torch.is_tensor(x) and x.dtype in LOW_PRECISION for x in tensors):
        return record
    out_grad = tuple(up(g) for g in record.out_grad) if isinstance(record.out_grad, tuple) else up(record.out_grad)
    return replace(record, inputs=tuple(up(x) for x in record.inputs), out_grad=out_grad)


def _group_norms(g: torch.Tensor) -> torch.Tensor:
    """The norm of each group gradient ``(M, ...) -> (M,)``: one reduction, no copy of a strided ``g``."""
    return torch.linalg.vector_norm(g, dim=tuple(range(1, g.dim()))) if g.dim() > 1 else g.abs()


def _norm_of(value) -> torch.Tensor:
    """A ``group_sq_norms`` value as the norm itself (``(M,)``)."""
    return value.norm if isinstance(value, (Unsquared, NormProduct, GramDot)) else value.clamp(min=0).sqrt()


def joined_norms(parts: list) -> "torch.Tensor | None":
    """The group norms of a pass's ``norm_parts`` as one ``(M,)`` tensor (None if there were none)."""
    norms = [n if scale == 1.0 else n * scale for n, scale in parts]
    return None if not norms else norms[0] if len(norms) == 1 else torch.cat(norms)


def _combined_norm(values: list) -> torch.Tensor:
    """``sqrt(sum of squares)`` of the parameters' group norms, ``(M,)``, in few kernels.

    Unsquared norms join with one ``vector_norm`` over their stack (products of two norms formed by one
    ``_foreach_mul``); squared ones (Gram sums, which rounding can leave slightly below zero) are clamped
    at 0 and rooted by two ``_foreach`` ops first. Where there are :class:`GramDot` sums, everything joins
    them instead (``fused.gram_total``).
    """
    roots = [v.norm for v in values if isinstance(v, Unsquared)]
    products = [v for v in values if isinstance(v, NormProduct)]
    if products:  # every product in one launch
        roots += torch._foreach_mul([v.left for v in products], [v.right for v in products])
    squares = [v for v in values if not isinstance(v, (Unsquared, NormProduct, GramDot))]
    grams = [v for v in values if isinstance(v, GramDot)]
    if grams:  # only the total is needed: every product, the roots' squares too, joined into one sum
        return gram_total(grams, roots, squares)
    if squares:  # every square's root in two launches
        roots += torch._foreach_sqrt(torch._foreach_clamp_min(squares, 0.0))
    if len(roots) == 1:
        return roots[0]
    return torch.linalg.vector_norm(torch.stack(roots), dim=0)


def unclipped_sums(records: list[Record], replay_guard) -> dict[int, torch.Tensor]:
    """``{id(param): sum over examples of its captured gradient}``: what autograd computes, from the records.

    Used to check the engine against autograd on its first steps (a parameter used outside its module shows
    up as a difference). One weighted product per record with weight 1, or materialised group gradients.
    """
    with parametrizations_still(records):
        return _unclipped_sums(records, replay_guard)


def _unclipped_sums(records: list[Record], replay_guard) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for record in records:
        if record.ctx.batch_size == 0:
            continue
        record = _in_float32(record)
        device = grad_tensors(record)[0].device
        groups = record.ctx.groups.to(device)
        if record.rule is not None and record.rule.weighted_sum is not None and not record.unit.parametrized:
            ones = {name: torch.ones(groups.batch_size, device=device) for name in record.params}
            assert isinstance(record.out_grad, torch.Tensor)  # rule records have one output tensor
            sums = record.rule.weighted_sum(record.layer, record.inputs, record.out_grad, ones)
        else:
            if record.rule is not None:
                assert isinstance(record.out_grad, torch.Tensor)  # rule records have one output tensor
                grads = chain_parametrizations(
                    record, record.rule.group_grads(record.layer, record.inputs, record.out_grad, groups))
            else:
                grads = generic_group_grads(
                    record.unit.module, record.params, record.inputs, record.kwargs, record.out_grad, groups,
                    record.batch_dim, replay_guard, record.unit.path, record.input_dims, record.kw_names,
                )
            sums = {name: g.sum(0) for name, g in grads.items()}
        for name, p in record.params.items():
            if name in sums:
                out[id(p)] = sums[name] if id(p) not in out else out[id(p)] + sums[name]
    return out


def chain_parametrizations(record: Record, grads: dict) -> dict:
    """Group gradients of a parametrized tensor (weight norm: ``W = g v / ||v||``) carried back to its originals.

    The rule gives ``{"weight": (M, *W.shape)}``; each group's gradient of the original tensors is the
    vector-Jacobian product of the parametrization with it (``torch.func.vjp``, vmapped over groups).
    """
    if not record.unit.parametrized:
        return grads
    from torch.func import functional_call, vjp, vmap

    for tensor, plist in record.unit.parametrized.items():
        if tensor not in grads:
            continue
        computed = grads.pop(tensor)  # (M, *W.shape)
        values = {n: p.detach() for n, p in plist.named_parameters()}
        pullback = vjp(lambda vals: functional_call(plist, vals, ()), values)[1]  # (output, pullback)
        per_group = vmap(pullback)(computed.to(next(iter(values.values())).dtype))[0]  # name -> (M, ...)
        for name, g in per_group.items():
            key = f"parametrizations.{tensor}.{name}"
            if key in record.params:
                grads[key] = g
    return grads
