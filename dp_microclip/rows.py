"""Which rows of a tensor belong to which example: found by content, never by a size alone.

The layout probe (``layout.py``) runs the model twice without gradients, on the
whole batch (``B`` examples) and on the same examples in reverse order with the
last one repeated (:func:`probe_order`: ``B' = B + 1`` examples, so sizes move
and rows move), dropout off and torch's RNG at the same state for both. For every tensor a
hooked layer sees it keeps a :class:`TensorPrint`: the shape and, along each
dimension, one number per index (a fixed random projection of that slice), so
that nothing of the activations is kept. :func:`analyse` then compares the two
passes' prints of one tensor:

* a dimension whose size went from ``B`` to ``B'`` is the batch only if its
  slices EQUAL the same examples' slices of the whole batch, at the positions
  the reordering moved them to. A size that moves by coincidence (a
  mixture-of-experts expert that picks B routed tokens, so receives 8 at B = 8
  and 9 at B' = 9) holds rows that did not move with their examples: refused;
* a dimension of size ``B * k`` that became ``B' * k`` holds ``k`` rows per
  example, flattened with another axis (a feed-forward on ``(B*T, d)``, window
  attention on ``(B*windows, ...)``): the rows are matched by content against
  both orders, example-major (row ``r`` belongs to example ``r // k``) and
  example-minor (``r % B``, torch's sequence-first ``(T*B, d)``), and the one
  that matches is the layer's :class:`Fold`;
* rows that moved elsewhere or a row count that is no multiple of the batch
  (tokens routed by the data) cannot be given to examples: refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import BatchError
from .tensors import LOW_PRECISION

BROADCAST = "broadcast"  # size 1 at the declared batch dimension: one value shared by every example


@dataclass(frozen=True)
class Fold:
    """A dimension that holds ``k`` rows per example (size ``B * k``): the batch folded with another axis.

    Attributes:
        dim: the folded dimension.
        example_major: row ``r`` belongs to example ``r // k`` (``(B, k)`` flattened); else to ``r % B``
            (``(k, B)`` flattened, torch's sequence-first order).
    """

    dim: int
    example_major: bool


def batch_first(x: torch.Tensor, spec, batch_size: int) -> torch.Tensor:
    """``x`` with its batch as dimension 0: an int moves that dimension; a :class:`Fold` splits the folded
    dimension into ``(B, k)`` (example-major) or ``(k, B)`` and moves the batch first."""
    if isinstance(spec, Fold):
        if x.shape[spec.dim] % batch_size:
            raise BatchError(
                f"a tensor of shape {tuple(x.shape)} was learned to hold a whole number of rows per example along "
                f"dimension {spec.dim}, but it has {x.shape[spec.dim]} rows for {batch_size} examples: the layout "
                "changed with the data. Keep a fixed number of rows per example in this layer's input."
            )
        if spec.example_major:
            return x.unflatten(spec.dim, (batch_size, -1)).movedim(spec.dim, 0)
        return x.unflatten(spec.dim, (-1, batch_size)).movedim(spec.dim + 1, 0)
    return x.movedim(spec, 0) if spec else x


@dataclass(frozen=True)
class TensorPrint:
    """What the probe keeps of one tensor: its shape and, per dimension, one random projection and the norm
    of each slice (float64, CPU; a difference ``e`` between two slices moves the projection by about
    ``|e|``); ``per_dim`` is None for tensors that cannot be compared (complex)."""

    shape: tuple
    per_dim: tuple | None
    dtype: torch.dtype


_VECTORS: dict[tuple, torch.Tensor] = {}


def _vector(width: int, device: torch.device) -> torch.Tensor:
    key = (width, str(device))
    v = _VECTORS.get(key)
    if v is None:
        g = torch.Generator().manual_seed(1000003 + width)
        v = _VECTORS[key] = torch.randn(width, generator=g, dtype=torch.float64).to(device)
        if len(_VECTORS) > 256:
            _VECTORS.clear()
            _VECTORS[key] = v
    return v


def fingerprint(t: torch.Tensor) -> TensorPrint:
    """One projection and one magnitude per index of every dimension of ``t`` (a few passes over it)."""
    shape = tuple(t.shape)
    if t.is_complex() or t.numel() == 0:
        return TensorPrint(shape, None, t.dtype)
    x = t.detach().to(torch.float64)
    prints = []
    for d in range(x.dim()):
        rows = x.movedim(d, 0).reshape(shape[d], -1)
        v = _vector(rows.shape[1], rows.device)
        prints.append(((rows @ v).cpu(), torch.linalg.vector_norm(rows, dim=1).cpu()))
    return TensorPrint(shape, tuple(prints), t.dtype)


def tolerance(dtype: torch.dtype) -> float:
    """How far two prints of the same rows may differ, relative to the largest row, in ``dtype``."""
    if dtype == torch.float64:
        return 1e-9
    if dtype in LOW_PRECISION:
        return 3e-2
    return 1e-3 if dtype.is_floating_point else 1e-12  # float32: batch-size-dependent kernels (TF32 convs)


def probe_order(batch: int) -> list[int]:
    """The examples of the probe's second pass: the batch reversed, then its last example again.

    The size changes (so the batch dimension shows), every example but a middle one moves (so rows that
    follow a size but not their example show), and a duplicate keeps B = 1 informative."""
    return list(range(batch - 1, -1, -1)) + [batch - 1]


def _source_rows(batch: int, k: int, major: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(index in the probe's dimension, index in the whole batch's) for every row of the probe's pass."""
    source = torch.tensor(probe_order(batch))
    probe = source.numel()
    example = torch.arange(probe)
    within = torch.arange(k)
    if major:
        part = (example[:, None] * k + within[None, :]).flatten()
        full = (source[:, None] * k + within[None, :]).flatten()
    else:
        part = (within[:, None] * probe + example[None, :]).flatten()
        full = (within[:, None] * batch + source[None, :]).flatten()
    return part, full


def _matches(full: tuple, part: tuple, rows: tuple[torch.Tensor, torch.Tensor], tol: float) -> torch.Tensor:
    """Per kept row: whether the probe's row equals the whole batch's row it came from."""
    (pf, mf), (pp, mp) = full, part
    scale = max(float(mf.max()) if mf.numel() else 0.0, float(mp.max()) if mp.numel() else 0.0, 1e-300)
    a, b = pp[rows[0]], pf[rows[1]]
    same = (a - b).abs() <= tol * scale
    return same | (torch.isnan(a) & torch.isnan(b)) | (a == b)


def _found_elsewhere(full: tuple, part: tuple, missing: torch.Tensor, tol: float) -> float:
    """The share of the probe's mismatching rows that equal SOME row of the whole batch (rows moved, not changed)."""
    (pf, mf), (pp, mp) = full, part
    if not missing.numel():
        return 0.0
    scale = max(float(mf.max()), float(mp.max()), 1e-300)
    ordered = torch.sort(pf).values
    values = pp[missing]
    at = torch.searchsorted(ordered, values).clamp(max=ordered.numel() - 1)
    below = (at - 1).clamp(min=0)
    near = torch.minimum((ordered[at] - values).abs(), (ordered[below] - values).abs())
    return float((near <= tol * scale).double().mean())


class RowsProblem(NamedTuple):
    """Why a tensor's rows could not be given to examples: ``kind`` is "mixed" (rows changed: the model
    mixes examples) or "routed" (rows moved or a data-dependent number of them), with a description."""

    kind: str
    text: str
    dim: int | None = None  # "mixed" with one row per example: the dimension the shapes show as the batch


def deviation(full: TensorPrint, part: TensorPrint, batch: int, dim: int) -> float:
    """How far the probe's rows along ``dim`` (one per example) are from the whole batch's same examples,
    relative to the largest row (0 for equal rows; inf when not comparable)."""
    if full.per_dim is None or part.per_dim is None or full.shape[dim] != batch:
        return float("inf")
    (pf, nf), (pp, np_) = full.per_dim[dim], part.per_dim[dim]
    rows = _source_rows(batch, 1, True)
    scale = max(float(nf.max()) if nf.numel() else 0.0, float(np_.max()) if np_.numel() else 0.0, 1e-300)
    return float((pp[rows[0]] - pf[rows[1]]).abs().nan_to_num(0.0).max()) / scale


def analyse(full: TensorPrint, part: TensorPrint, batch: int, declared: int, where: str):
    """Where the batch is in one tensor, from its prints in the whole-batch pass and in the probe's pass.

    Returns an int (batched along it), a :class:`Fold`, ``BROADCAST`` (shared, size 1 at ``declared``),
    None (shared, no batch dimension), or a :class:`RowsProblem` when the size says batch but the content
    does not (the caller refuses it, or in noise-free mode accepts a model that mixes examples).

    Raises:
        BatchError: when the shape moves with the batch in a way no row map explains.
    """
    real, probed, probe = full.shape, part.shape, len(probe_order(batch))
    if len(probed) != len(real):
        raise BatchError(
            f"{where}: its shape {real} does not follow the batch in a way dp_microclip can split per example "
            f"(with {probe} examples instead of {batch} it was {probed}). Keep one batch dimension in "
            "this layer's input, or register a rule for this module type."
        )
    moved = [d for d in range(len(real)) if real[d] != probed[d]]
    if not moved:
        if batch == 1:
            return declared if len(real) > declared and real[declared] == 1 else None
        return BROADCAST if len(real) > declared and real[declared] == 1 else None
    if len(moved) > 1:
        raise BatchError(
            f"{where}: its shape {real} changes with the batch along dimensions {moved} (with {probe} examples "
            f"instead of {batch} it was {probed}), not along one batch dimension. Rows of several examples are "
            "mixed or flattened together; dp_microclip cannot split this layer's gradient per example. Keep the "
            "batch as its own dimension in this layer's input."
        )
    d = moved[0]
    k = real[d] // batch
    if real[d] % batch or probed[d] != probe * k or k == 0:
        return RowsProblem("routed", (
            f"{where}: along dimension {d} it has {real[d]} rows for {batch} examples and {probed[d]} for {probe}, "
            "not a fixed number of rows per example: the rows are chosen by the data (tokens routed to a "
            "mixture-of-experts expert, a capacity-limited subset), so no row belongs to a known example"))
    if full.per_dim is None or part.per_dim is None:
        return d if k == 1 else Fold(d, True)
    tol = tolerance(full.dtype)
    orders = (True,) if k == 1 else (True, False)
    found = {}
    for major in orders:
        ok = _matches(full.per_dim[d], part.per_dim[d], _source_rows(batch, k, major), tol)
        found[major] = ok
    good = [major for major, ok in found.items() if bool(ok.all())]
    if len(good) == 1:
        return d if k == 1 else Fold(d, good[0])
    if len(good) > 1:
        return RowsProblem("routed", (
            f"{where}: its {real[d]} rows along dimension {d} match the examples in more than one order "
            "(equal rows), so which example each row belongs to cannot be told from its content"))
    ok = found[True]
    rows = _source_rows(batch, k, True)
    missing = rows[0][~ok]
    elsewhere = _found_elsewhere(full.per_dim[d], part.per_dim[d], missing, tol)
    shown = sorted({int(r) for r in missing[:5]})
    if elsewhere >= 0.5:
        return RowsProblem("routed", (
            f"{where}: along dimension {d} (size {real[d]} for {batch} examples) its rows {shown} hold other rows "
            f"when the examples are reordered (the rows moved, e.g. tokens routed by a mixture-of-experts router): the "
            "size follows the batch by coincidence, the rows do not belong to the examples at their positions"))
    return RowsProblem("mixed", (
        f"{where}: along dimension {d} its rows {shown} change when the other examples of the batch change "
        "(batch statistics or another computation across examples upstream)"), d if k == 1 else None)


def refusal(problem: RowsProblem) -> str:
    """The refusal of rows that cannot be given to examples: the cause and the fix."""
    if problem.kind == "mixed":
        return (f"{problem.text}. DP mode needs each example's rows to depend on that example only: compute "
                "statistics per example (nn.LayerNorm, nn.GroupNorm) instead of over the batch.")
    return (f"{problem.text}. dp_microclip cannot tell which example each of those rows belongs to, and refuses "
            "rather than guess. Keep the batch as its own dimension in this layer's input (a dense "
            "mixture-of-experts: every expert on (B, T, d) weighted by its gate), or freeze the layer "
            "(requires_grad=False) before attach().")


def check_sizes(layout, args: tuple, output, batch: int, where: str) -> None:
    """A learned ``CallLayout`` (``layout.py``) still fits this call: each batched tensor has the batch
    (or ``k`` rows per example) where the probe found it."""
    tensors = [(a, d) for a, d in zip(args, layout.inputs) if torch.is_tensor(a)]
    if torch.is_tensor(output):
        tensors.append((output, layout.output))
    for t, d in tensors:
        if isinstance(d, Fold):
            ok = t.dim() > d.dim and t.shape[d.dim] % batch == 0
        elif isinstance(d, int) and not isinstance(d, bool):
            ok = t.dim() > d and t.shape[d] == batch
        else:
            continue
        if not ok:
            raise BatchError(
                f"{where}: a tensor of shape {tuple(t.shape)} does not have the batch ({batch} examples) where the "
                f"layout probe found it ({d}): the layout changed with the data. Keep one batch dimension, with the "
                "same place in every batch, in this layer's inputs."
            )
