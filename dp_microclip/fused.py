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

from .layers.registry import GroupGrads, Unsquared
from .records import grad_tensors
from .tensors import avoid_host_reads

#: Gram products with at most this many elements per group join the pass's one sum: their kernels are
#: launch-bound; a larger one keeps its own kernels (a join would copy it).
JOIN_MAX_ELEMENTS = 1 << 16
#: The most elements ``RowBuffer.norms`` builds for its row pairs at ``b > 1`` (``B b W``: 32 MB in float32,
#: written once and read once, about what the 5 launches it saves cost on a GPU; the bench MLP at b = 8 builds
#: 5.8 M; unmeasured on a GPU). A larger buffer takes the rules' Gram forms of its views instead.
OUTER_MAX_ELEMENTS = 1 << 23
#: Materialised group gradients with at most this many elements in all (all groups together) join the block
#: (:class:`JoinedBlock`). The limit is on the whole tensor, not per group: the join copies all of it, and a
#: Linear's ``(M, p, d)`` group gradients (the transformer bench: 32 x 65,536 elements, four of them) cost
#: 27 ms of ``cat`` a step on the CPU, which made materialised routes 1.4x slower in the step than the
#: autotuner, timing each layer alone, had measured them (it then chose them over ghost norms).
BLOCK_MAX_ELEMENTS = 1 << 16
#: The same limit on an accelerator (``tensors.avoid_host_reads``): there the copy of 2^20 float32 elements
#: (4 MB) takes about what one launch does, and it saves a norm, a fill and a sum per tensor (the CNN bench's
#: second convolution at b = 8: ``(16, 32, 16, 5, 5)``, 205,000 elements).
DEVICE_BLOCK_MAX_ELEMENTS = 1 << 20


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


def ghost_norms(record, groups, hold: bool = False) -> tuple[dict, "dict | None"]:
    """``(norms, group gradients)`` of a ghost record: the rule's ``group_sq_norms`` values by parameter name,
    and, with ``hold`` (no lean mode or explicit memory budget: holding them until the sums is then fine),
    where every value is a ``GroupGrads`` of at most :data:`JOIN_MAX_ELEMENTS` per group (gradients the rule
    built for the norm, small), those gradients, for the engine to sum as materialised ones (one ``mv`` or a
    block's: no second convolution for the sum); else None, the gradients given as their norms."""
    rule = record.rule
    assert rule is not None and rule.group_sq_norms is not None  # choose_strategy: ghost needs has_ghost
    found = rule.group_sq_norms(record.layer, record.inputs, record.out_grad, groups)
    held = [v for v in found.values() if isinstance(v, GroupGrads)]
    if hold and held and len(held) == len(found) and all(v.grad[0].numel() <= JOIN_MAX_ELEMENTS for v in held):
        return found, {name: v.grad for name, v in found.items()}
    return {name: Unsquared(v.norm) if isinstance(v, GroupGrads) else v for name, v in found.items()}, None


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
        limit = DEVICE_BLOCK_MAX_ELEMENTS if avoid_host_reads(g.device) else BLOCK_MAX_ELEMENTS
        if g.dim() > 1 and g.is_contiguous() and g.numel() <= limit:
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


def _first_output_grad(factors: dict) -> torch.Tensor:
    """The first output gradient of ``{position: {name: (g, a) or (g,)}}``: the dtype and device the buffer takes."""
    return next(iter(next(iter(factors.values())).values()))[0]


class RowBuffer:
    """The captured tensors of a pass's row-factored layers (``LayerRule.row_factors``: each example's gradient
    is a row ``g_i`` or an outer product ``g_i a_i^T``, a Linear on ``(B, d)`` inputs) copied into one
    ``(B, W)`` row-major buffer, output gradients (the ``g``) first: on an accelerator, where the masking
    copies them anyway, everything the aggregation does with them then takes a few launches for all layers.
    With one example per group, small materialised group gradients ``(M, ...)`` (a convolution's, a
    LayerNorm's) join it as rows too (``g_i`` is then the group's gradient), instead of a block of their own.

    * :meth:`norms`, one row per group: every tensor's squared row norms and, beside each ``g``, the sum of its
      partners' (``||a||^2``, and 1 for each term that is ``g`` alone: a ones column) by one ``mm`` of the
      squared buffer with a fixed ``(W, 2K)`` indicator; the total ``sum_g ||g||^2 (sum of partners)`` is a
      ``mul``, a ``sum`` and a ``sqrt`` (5 launches whatever the number of layers). ``b > 1`` contiguous rows
      per group: the same with the products of every pair of a group's rows (``(M, b, b, W)``, one ``mul``)
      in place of the squares, which gives every Gram entry ``g_r . g_s`` and ``a_r . a_s`` at once:
      ``||sum_r g_r a_r^T||^2 = sum_{r,s} (g_r . g_s)(a_r . a_s)`` (6 launches; up to
      :data:`OUTER_MAX_ELEMENTS`); else (keyed groups, larger) the rules' own ghost norms of the buffer's
      views (Gram forms read strided rows in place).
    * :meth:`mask`: the rows of non-finite groups zeroed in place, one ``masked_fill_`` (the buffer is the
      engine's own copy; the captured tensors are never written).
    * :meth:`weigh`: every ``g`` multiplied by its group's clip weight, one ``mul_``.
    * :meth:`sums`: a weight's sum ``g_w^T a`` by one ``mm`` (what autograd launches for it), every row term's
      (a bias, a materialised group gradient: the column sums of its weighted rows) by one ``sum`` for all.

    Exact: the same products and sums as the rule's weighted sum, up to summation order. Built only where it
    saves launches (:data:`MIN_RECORDS` layers or more).
    """

    #: ``norms``' key of the joined total in the engine's norm dict (no parameter id is negative).
    KEY = -(1 << 40)
    #: Fewer layers than this keep their own kernels: the buffer's fixed launches (about 9) would cost more.
    MIN_RECORDS = 2

    def __init__(self, records: list, factors: dict[int, dict], rows: dict[int, torch.Tensor]):
        self.positions = sorted(factors)
        like = _first_output_grad(factors)
        batch = like.shape[0]
        self.row_shapes = {pid: g.shape[1:] for pid, g in rows.items()}
        rows = {pid: g.reshape(g.shape[0], -1) for pid, g in rows.items()}
        terms = [parts for i in self.positions for parts in factors[i].values()] + [(g,) for g in rows.values()]
        rights: dict[int, torch.Tensor] = {}
        lefts: dict[int, torch.Tensor] = {}
        for parts in terms:
            rights.setdefault(id(parts[0]), parts[0])
            if len(parts) == 2:
                lefts.setdefault(id(parts[1]), parts[1])
        if any(len(parts) == 1 for parts in terms):
            ones = _ones(batch, like.dtype, like.device)  # the partner of a term that is g alone: ||1||^2 = 1
            lefts[id(ones)] = ones
        tensors = list(rights.values()) + list(lefts.values())
        self.buffer = torch.cat(tensors, dim=1)  # (B, W): one copy of every captured tensor
        self.width_right = sum(x.shape[1] for x in rights.values())
        column: dict[int, tuple] = {}  # id(tensor) -> (offset, width)
        offset = 0
        for x in tensors:
            column[id(x)] = (offset, x.shape[1])
            offset += x.shape[1]
        partners: dict[int, list] = {key: [] for key in rights}
        for parts in terms:
            partners[id(parts[0])].append(column[id(parts[1] if len(parts) == 2 else ones)])
        self._layout = (offset, tuple(column[key] for key in rights), tuple(tuple(p) for p in partners.values()))
        views = {key: self.buffer[:, o:o + w] for key, (o, w) in column.items()}
        self.factors = {}
        for i in self.positions:  # the records read the buffer's views from here on
            r = records[i]
            records[i] = replace(r, inputs=tuple(views.get(id(x), x) if torch.is_tensor(x) else x for x in r.inputs),
                                 out_grad=views.get(id(r.out_grad), r.out_grad))
            self.factors[i] = {name: tuple(views[id(x)] for x in parts) for name, parts in factors[i].items()}
        self.rows = {pid: views[id(g)] for pid, g in rows.items()}

    @classmethod
    def build(cls, records: list, factors: dict[int, dict], materialised: dict, groups) -> "RowBuffer | None":
        """The buffer of the records at ``factors``' positions, or None where it would not save launches or a
        tensor is an output gradient of one and an input of another (its weighted copy would be read as an
        input). With one example per group, the small materialised group gradients of the same dtype and
        device join it (taken out of ``materialised``)."""
        if len(factors) < cls.MIN_RECORDS:
            return None
        rights = {id(parts[0]) for found in factors.values() for parts in found.values()}
        if any(len(parts) == 2 and id(parts[1]) in rights for found in factors.values() for parts in found.values()):
            return None
        like = _first_output_grad(factors)
        rows = {}
        if groups.equal_size == 1:  # per group small (the buffer is an accelerator's: its copy is cheap there)
            rows = {pid: g for pid, g in materialised.items() if g.dim() > 1 and g.is_contiguous()
                    and g[0].numel() <= JOIN_MAX_ELEMENTS and (g.dtype, g.device) == (like.dtype, like.device)}
        for pid in rows:
            del materialised[pid]
        return cls(records, factors, rows)

    @staticmethod
    def factors_of(record, groups, uses, earlier: dict) -> dict | None:
        """The record's row factors where the buffer can hold them, else None: a rule record with no
        parametrization whose parameters it alone uses (``uses``: records per parameter), with 2-D floating
        tensors of the batch's rows, of the dtype and device of the ``earlier`` candidates' (a dict of them)."""
        rule = record.rule
        if rule is None or rule.row_factors is None or not torch.is_tensor(record.out_grad) or \
                record.unit.parametrized or any(uses[id(p)] != 1 for p in record.params.values()):
            return None
        found = rule.row_factors(record.layer, record.inputs, record.out_grad)
        found = {name: parts for name, parts in (found or {}).items() if name in record.params}  # frozen: none
        if not found:
            return None
        like = _first_output_grad(earlier) if earlier else None
        for parts in found.values():
            for x in parts:
                if x.dim() != 2 or x.shape[0] != groups.batch_size or not x.is_floating_point() or \
                        (like is not None and (x.dtype, x.device) != (like.dtype, like.device)):
                    return None
        return found

    def norms(self, records: list, groups) -> dict:
        """The norms the engine joins: one row per group, the total as ``{KEY: Unsquared}``; else the rules'
        ``group_sq_norms`` of the buffer's views, ``{id(param): value}``."""

        b, width = groups.equal_size, self.buffer.shape[1]
        if b is None or (b > 1 and self.buffer.numel() * b > OUTER_MAX_ELEMENTS):
            out: dict = {}
            for i in self.positions:
                r = records[i]
                found = ghost_norms(r, groups)[0]
                out.update({id(p): found[name] for name, p in r.params.items()})
            return out
        indicator = _indicator(self._layout, self.buffer.dtype, self.buffer.device)
        if b == 1:
            products = self.buffer.square()  # (B, W)
        else:  # every pair of a group's rows, column by column: (M, b, b, W)
            rows = self.buffer.view(-1, b, 1, width)
            products = rows * rows.transpose(1, 2)
        grams = torch.mm(products.view(-1, width), indicator)  # (M b b, 2K): g's Gram entries, partners' beside
        half = grams.shape[1] // 2
        total = (grams[:, :half] * grams[:, half:]).view(-1, b * b * half).sum(1)  # (M,): sum over pairs and terms
        return {self.KEY: Unsquared(total.clamp_min_(0.0).sqrt_() if b > 1 else total.sqrt_())}

    def mask(self, bad: torch.Tensor, groups) -> None:
        """Zero the rows of the groups marked in ``bad`` ``(M,)``, in place (one ``masked_fill_``)."""
        if groups.equal_size is not None:
            self.buffer.view(bad.shape[0], -1).masked_fill_(bad[:, None], 0.0)
        else:
            self.buffer.masked_fill_(groups.rows(bad)[:, None], 0.0)

    def weigh(self, weight: torch.Tensor, groups) -> None:
        """Multiply every output gradient's rows by their group's weight ``(M,)``, in place (one ``mul_``)."""
        right = self.buffer[:, :self.width_right]
        weight = weight.to(self.buffer.dtype)
        if groups.equal_size is not None:
            right.view(weight.shape[0], -1, self.width_right).mul_(weight[:, None, None])
        else:
            right.mul_(groups.rows(weight)[:, None])

    def sums(self, records: list) -> list[tuple[int, torch.Tensor]]:
        """``(id(param), its weighted sum)`` of every buffered parameter, after :meth:`weigh`."""
        columns = None

        def column_sum(x: torch.Tensor, shape) -> torch.Tensor:
            nonlocal columns
            if columns is None:  # every row term at once: the column sums of the weighted rows
                columns = self.buffer[:, :self.width_right].sum(0)
            offset = x.storage_offset() - self.buffer.storage_offset()  # its first column
            return columns[offset:offset + x.shape[1]].view(shape)

        out = []
        for i in self.positions:
            params = records[i].params
            for name, parts in self.factors[i].items():
                shape = params[name].shape
                value = torch.mm(parts[0].t(), parts[1]) if len(parts) == 2 else column_sum(parts[0], shape)
                out.append((id(params[name]), value.view(shape)))
        out += [(pid, column_sum(g, self.row_shapes[pid])) for pid, g in self.rows.items()]
        return out


_ONES: dict[tuple, torch.Tensor] = {}


def _ones(batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``(B, 1)`` column of ones: a view of one kept column per dtype and device, grown when a batch is
    larger (Poisson batches vary in size: no launch per step). Only ever copied, never written."""
    kept = _ONES.get((dtype, device))
    if kept is None or kept.shape[0] < batch:
        kept = _ONES[(dtype, device)] = torch.ones(max(batch, 2 * (0 if kept is None else kept.shape[0])), 1,
                                                   dtype=dtype, device=device)
    return kept[:batch]


@functools.lru_cache(maxsize=64)
def _indicator(layout: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``(W, 2K)`` 0/1 matrix of :meth:`RowBuffer.norms` (built once per layout): column k sums the squares
    of the k-th output gradient's columns, column K + k those of its partners' (with multiplicity)."""
    width, rights, partners = layout
    k = len(rights)
    out = torch.zeros(width, 2 * k, dtype=dtype)
    for index, ((offset, w), theirs) in enumerate(zip(rights, partners)):
        out[offset:offset + w, index] = 1.0
        for o, pw in theirs:
            out[o:o + pw, k + index] += 1.0
    return out.to(device)
