"""Few-launch forms of the aggregation's per-tensor work: on a GPU every small kernel costs one launch.

Letters: M groups, R rows of a mask (M, or B examples under keyed grouping), K joined columns.

* :func:`masked_copies`: the rows of non-finite groups zeroed in many tensors at once. The tensors whose rows
  are contiguous blocks are copied into one flat buffer per dtype and device (``cat``), the ``(R,)`` mask is
  spread over it (``repeat`` + ``repeat_interleave``) and filled in place (``masked_fill_``): five launches
  whatever the number of tensors, instead of one out-of-place ``masked_fill`` each; where fewer tensors
  share few widths, those of one width are stacked and filled (two launches a width). The copy is the same
  as the out-of-place fills made (the captured tensors may be the user's own and are never written); the
  pieces come back as contiguous views of the buffer with the tensors' shapes.
* :func:`zero_rows`: where the aggregation applies it (the ghost records' captured tensors, the materialised
  group gradients, the joined blocks).
* :func:`gram_total`: a pass's Gram-form squared norms (``layers.registry.GramDot``) and the other norms
  joined into the total group norm: the small products by one ``_foreach_mul`` and one sum over their
  ``cat`` (a few launches whatever the number of layers); a large one (more than
  :data:`JOIN_MAX_ELEMENTS` per group, where the ``cat``'s copy would cost more than its launches)
  summed on its own, a weight's product and its bias's Gram in one ``_foreach_addcmul``.
* :class:`JoinedBlock`: small materialised group gradients ``(M, ...)`` of one context joined into one
  ``(M, K)`` block: one norm and one weighted sum (``mv``) for all of them, masked with the rest, instead of
  a norm, a fill and an ``einsum`` each (LayerNorm and other affine parameters). Only where every parameter
  has the same clip weight (whole-gradient clipping: the norm of the block is what the clip factor needs).

Both are exact: the same zeros in the same rows, the same norms, the same sums (up to summation order).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from .records import grad_tensors

#: Gram products with at most this many elements per group join the pass's one sum: their kernels are
#: launch-bound; a larger one keeps its own kernels (a join would copy it).
JOIN_MAX_ELEMENTS = 1 << 16
#: Materialised group gradients with at most this many elements in all (all groups together) join the block
#: (:class:`JoinedBlock`). The limit is on the whole tensor, not per group: the join copies all of it, and a
#: Linear's ``(M, p, d)`` group gradients (the transformer bench: 32 x 65,536 elements, four of them) cost
#: 27 ms of ``cat`` a step on the CPU, which made materialised routes 1.4x slower in the step than the
#: autotuner, timing each layer alone, had measured them (it then chose them over ghost norms).
BLOCK_MAX_ELEMENTS = 1 << 16


def masked_copies(tensors: list, mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{id(x): x with the rows of ``mask`` zeroed}`` for every floating tensor in ``tensors``.

    ``mask`` is ``(R,)`` bool; each tensor's leading dimension is a multiple of ``R``, row block ``r`` of it
    belonging to ``mask[r]`` (contiguous groups of ``b`` rows, or one row each). Tensors are never written.
    """
    out: dict[int, torch.Tensor] = {}
    rows = mask.shape[0]
    flat: dict[tuple, list] = {}
    strided: dict[tuple, list] = {}
    seen: set[int] = set()
    for x in tensors:
        if id(x) in seen:
            continue
        seen.add(id(x))
        if x.is_contiguous() and x.numel() > 0 and x.shape[0] % rows == 0:
            flat.setdefault((x.dtype, x.device), []).append(x)
        elif x.numel() > 0 and x.shape[0] % rows == 0:
            # rows not in blocks (a (T, B, ...) buffer seen batch first): stacked with those of its shape
            strided.setdefault((x.dtype, x.device, tuple(x.shape)), []).append(x)
        else:
            out[id(x)] = _masked_copy(x, mask)
    for (_, device, _), xs in strided.items():
        out.update(_stacked_by_shape(xs, mask.to(device)))
    for (_, device), xs in flat.items():
        here = mask.to(device)
        by_width: dict[int, list] = {}
        for x in xs:
            by_width.setdefault(x.numel() // rows, []).append(x)
        if sum(1 if len(same) == 1 else 2 for same in by_width.values()) <= _FLAT_LAUNCHES:
            for same in by_width.values():  # tensors of one width: stacked, filled through the (R,) mask
                out.update(_stacked_copies(same, here))
            continue
        buffer = torch.cat([x.reshape(-1) for x in xs])  # (sum of numels,): one copy of every tensor
        widths = tuple(x.numel() // rows for x in xs)  # elements per mask row, per tensor
        spread = torch.repeat_interleave(here.repeat(len(xs)), _repeats(widths, rows, device),
                                         output_size=buffer.numel())  # the mask of every element, no host read
        buffer.masked_fill_(spread, 0.0)
        for x, piece in zip(xs, buffer.split([x.numel() for x in xs])):
            out[id(x)] = piece.view(x.shape)
    return out


#: Launches of the flat form: ``cat``, ``repeat``, ``repeat_interleave`` (an index and an ``index_select``),
#: ``masked_fill_``. Stacking tensors of one width costs two (``stack``, ``masked_fill_``), a lone one one.
_FLAT_LAUNCHES = 5


def _stacked_copies(xs: list, mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Masked copies of tensors with the same number of elements per mask row: one ``stack``, one fill."""
    if len(xs) == 1:
        return {id(xs[0]): _masked_copy(xs[0], mask)}
    stacked = torch.stack([x.reshape(mask.shape[0], -1) for x in xs])  # (n, R, width)
    stacked.masked_fill_(mask[None, :, None], 0.0)
    return {id(x): piece.view(x.shape) for x, piece in zip(xs, stacked.unbind(0))}


def _stacked_by_shape(xs: list, mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Masked copies of same-shaped tensors whatever their strides: one ``stack`` (contiguous, batch first,
    as the out-of-place fill of one gave), one fill through its ``(n, R, b, ...)`` view."""
    if len(xs) == 1:
        return {id(xs[0]): _masked_copy(xs[0], mask)}
    stacked = torch.stack(xs)  # (n, B, ...)
    rows = stacked.view(len(xs), mask.shape[0], -1)  # (n, R, b * ...)
    rows.masked_fill_(mask[None, :, None], 0.0)
    return {id(x): piece for x, piece in zip(xs, stacked.unbind(0))}


def _masked_copy(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One tensor's masked copy, filled through a ``(R, rows per mask row, ...)`` view (no spread kernel)."""
    rows = x.reshape(mask.shape[0], x.shape[0] // mask.shape[0], *x.shape[1:])  # (R, b, ...)
    return rows.masked_fill(mask.to(x.device).reshape(-1, *([1] * (rows.dim() - 1))), 0.0).reshape(x.shape)


@functools.lru_cache(maxsize=64)
def _repeats(widths: tuple, rows: int, device: torch.device) -> torch.Tensor:
    """``(len(widths) * rows,)``: each tensor's width repeated for each of its mask rows (built once per shape)."""
    return torch.tensor([w for w in widths for _ in range(rows)], dtype=torch.long).to(device)


def zero_rows(records, ghost_index, materialised, bad, groups, blocks):
    """Zero the rows of non-finite groups where the sums read them: the ghost records' captured tensors (rows
    of examples), the materialised group gradients and joined blocks (rows of groups), on the device (no host
    read). Masked
    copies (``fused.masked_copies``): a few launches per dtype whatever the number of tensors; a tensor two
    records share is copied once."""
    def floats(xs):
        return [x for x in xs if torch.is_tensor(x) and x.is_floating_point()]

    captured = [x for i in ghost_index for x in floats(list(records[i].inputs) + grad_tensors(records[i]))]
    by_group = floats(materialised.values()) + [block.block for block in blocks]  # (M, ...) each
    if groups.equal_size is not None:  # contiguous groups: a (B, ...) tensor is M blocks of b rows
        clean = masked_copies(captured + by_group, bad)
    else:  # keyed: captured rows follow the examples' groups, materialised ones the groups
        clean = {**masked_copies(captured, groups.rows(bad)), **masked_copies(by_group, bad)}
    for block in blocks:
        block.use(clean)

    def cleaned(x):
        return clean.get(id(x), x) if torch.is_tensor(x) else x

    records = list(records)
    for i in ghost_index:
        r = records[i]
        records[i] = replace(r, inputs=tuple(cleaned(x) for x in r.inputs),
                             out_grad=tuple(cleaned(g) for g in r.out_grad)
                             if isinstance(r.out_grad, tuple) else cleaned(r.out_grad))
    return records, {pid: cleaned(g) for pid, g in materialised.items()}


class JoinedBlock:
    """Small materialised group gradients of one dtype and device as one ``(M, K)`` block.

    Built from ``{id(param): (M, *shape)}``; :attr:`norms` is the ``(M,)`` norm of every group's part
    (``sqrt`` of the sum of the parts' squared norms), :meth:`use` takes its masked copy,
    :meth:`weighted` gives ``{id(param): sum_j w_j g_j}`` from one ``mv``.
    """

    def __init__(self, parts: dict[int, torch.Tensor]):
        self.shapes = {pid: g.shape[1:] for pid, g in parts.items()}
        self.block = torch.cat([g.reshape(g.shape[0], -1) for g in parts.values()], dim=1)  # (M, K)
        self.norms = torch.linalg.vector_norm(self.block, dim=1)  # (M,)

    def use(self, clean: dict[int, torch.Tensor]) -> None:
        """Take the block's masked copy from :func:`masked_copies`' result (the block joins the other tensors'
        masking: no launch of its own)."""
        self.block = clean.get(id(self.block), self.block)

    def weighted(self, weight: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{id(param): sum_j weight_j g_j}``, each shaped like its parameter (views of one ``(K,)`` result)."""
        total = torch.mv(self.block.t(), weight.to(self.block.dtype))  # (K,)
        sizes = [s.numel() for s in self.shapes.values()]
        return {pid: piece.view(shape) for (pid, shape), piece in zip(self.shapes.items(), total.split(sizes))}


def joinable(materialised: dict[int, torch.Tensor]) -> dict[tuple, dict[int, torch.Tensor]]:
    """The small contiguous group gradients of ``materialised``, by (dtype, device), where two or more share one."""
    found: dict[tuple, dict[int, torch.Tensor]] = {}
    for pid, g in materialised.items():
        if g.dim() > 1 and g.is_contiguous() and g.numel() <= BLOCK_MAX_ELEMENTS:
            found.setdefault((g.dtype, g.device), {})[pid] = g
    return {key: parts for key, parts in found.items() if len(parts) > 1}


class NonfiniteCount:
    """How many micro-batches had a NaN/inf gradient since attach, counted when read, not per step.

    Each pass hands over its ``(M,)`` masks (no launch); a read, or every :attr:`FOLD` masks (so that the list
    stays short), joins them into the running count: a ``cat`` and a ``sum`` per device. The count is a 0-d
    tensor on the device once a pass ran (0 before), so reading it is the only host synchronisation.
    """

    FOLD = 64

    def __init__(self):
        self._masks: list[torch.Tensor] = []
        self._total: "int | torch.Tensor" = 0

    def add(self, masks: list) -> None:
        """Keep one pass's masks; fold them into the count now and then."""
        self._masks += masks
        if len(self._masks) >= self.FOLD:
            self.value()

    def value(self) -> "int | torch.Tensor":
        """The count so far (a 0-d device tensor once any pass ran)."""
        by_device: dict = {}
        for mask in self._masks:
            by_device.setdefault(mask.device, []).append(mask)
        self._masks = []
        for masks in by_device.values():
            self._total = torch.cat(masks).sum() + self._total
        return self._total


def gram_total(grams: list, roots: list, squares: list) -> torch.Tensor:
    """The total group norm ``(M,)`` of a pass from its ``GramDot`` sums, unsquared norms ``roots`` and
    squared ``squares`` (all ``(M,)``-indexed): ``sqrt(max(0, sum of all squares))``.

    Small products (and the roots' squares) by one ``_foreach_mul``, joined as columns with the small Gram
    sums and the squares into one ``cat`` and one sum. A large product is summed on its own, no copy: where a
    bias's Gram is the weight's right factor, both in one ``_foreach_addcmul`` (``G G^T (A A^T + 1)``).
    Rounding can leave a Gram sum slightly below zero: the total is clamped at 0.
    """
    def small(x: torch.Tensor) -> bool:
        return x[0].numel() <= JOIN_MAX_ELEMENTS

    alone = {id(v.left): v for v in grams if v.right is None}  # bias Grams, by their tensor
    fused = [v for v in grams if v.right is not None and not small(v.left) and id(v.right) in alone]
    taken = {id(v.right) for v in fused}
    pairs = [(v.left, v.right) for v in grams if v.right is not None and not any(v is f for f in fused)]
    pairs += [(r[:, None], r[:, None]) for r in roots]
    products = list(torch._foreach_mul([x for x, _ in pairs], [y for _, y in pairs])) if pairs else []
    if fused:  # G G^T + (A A^T) (G G^T): the weight's and its bias's squares in one product
        products += torch._foreach_addcmul([v.right for v in fused], [v.left for v in fused],
                                           [v.right for v in fused])
    products += [v.left for v in grams if v.right is None and id(v.left) not in taken]
    parts = [x.flatten(1) if small(x) else x.flatten(1).sum(1, keepdim=True) for x in products]
    parts += [s[:, None] for s in squares]
    total = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).sum(1)
    return total.clamp_min_(0.0).sqrt_()
