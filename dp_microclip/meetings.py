"""Where an output that is the same for every example meets the batch: learned by content, never by size.

``shared_outputs.py`` follows a layer output without a batch dimension, or with
size 1 there (a relative-position table), through the forward and, where it is
combined with a batched tensor, expands it along the batch so that each
example's gradient exists. Which dimension of that operation's result is the
batch must not be guessed from sizes: a table axis, a window count or a token
count may equal ``B``, and a sequence-first block puts the batch second.

So the first time an input signature runs a model that has such layers, this
file runs three more probe passes (``LayoutLearner.probe_passes``: no
gradients, dropout off, one random state). A ``TorchFunctionMode`` follows the
shared outputs through every operation, not stopping anywhere. The first pass
(the whole batch) keeps each operation's result shape; the second (the examples
reordered as in the layout probe) finds the operations on still-shared tensors
whose result's shape moved with the batch (the only ones that may meet it)
and prints them (``rows.fingerprint``), with their shared operands; the third
(the whole batch again) prints the same ones. Then ``rows.analyse`` compares
the two prints of each such result, exactly as it does for a layer's tensors:
a result that does not move with the batch is still shared (followed further);
one whose rows equal the same examples' rows where the reordering moved them is
a meeting point, along that dimension or along a dimension holding ``k`` rows
per example (``rows.Fold``); anything else is refused when the training forward
reaches it.

At a meeting point, a shared operand normally has size 1 (or nothing) at the
batch dimension. One the model broadcast to the batch itself (MPNet's
``bias.expand(B, ...)``, DeBERTa-v2's ``repeat(B, 1, 1)``) already has the
batch's rows there; it is recognised by content, not by its size
(:func:`broadcast_by_model`): its row count follows the batch like the result's,
and its rows along the batch are EQUAL to each other in both passes. A table
axis that merely has ``B`` entries has rows that differ (or a size that does
not move), so it is never taken for the batch. The training forward's tracker
then counts the same operations (only those on tensors still shared) and reads
each one's :class:`Meeting`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .errors import BatchError
from .layout import LayoutLearner, Signature
from .rows import BROADCAST, Fold, RowsProblem, TensorPrint, analyse, fingerprint, probe_order, refusal, tolerance


# Operations that only rearrange or copy their input: their output is still the same for every example.
_NO_MEETING = {
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.permute, torch.permute,
    torch.Tensor.transpose, torch.transpose, torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze,
    torch.squeeze, torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.clone, torch.clone,
    torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.repeat, torch.Tensor.__getitem__,
    torch.Tensor.type_as, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16,
}


@dataclass(frozen=True)
class Meeting:
    """What the meeting probe learned about one operation on a shared output (``meetings.py``).

    Attributes:
        name: the torch function (checked: the training forward must run the same operations).
        rank: the number of dimensions of its result.
        batch: where its result holds the batch: a dimension, a :class:`~dp_microclip.rows.Fold`, or None
            (not batched: its result is still the same for every example and is followed further).
        problem: why its rows cannot be given to examples (the step is refused with it), else None.
        expanded: the operands (positions among the call's flattened arguments) that derive from a shared
            output and that the model itself broadcast to the batch (``expand(B, ...)``, ``repeat(B, ...)``):
            they already hold the batch's rows at the meeting dimension, and those rows were found EQUAL to each
            other in both probe passes (:func:`broadcast_by_model`), so each example's slice is its row.
    """

    name: str
    rank: int
    batch: int | Fold | None
    problem: str | None = None
    expanded: tuple[int, ...] = ()


def is_followed_through(func) -> bool:
    """Whether ``func`` only rearranges or copies its input (its result is the same for every example)."""
    return func in _NO_MEETING


def function_name(func) -> str:
    """A torch function's name, for the check that the probe and the training forward ran the same ones."""
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


class _Op(NamedTuple):
    name: str
    parents: tuple  # the nodes its followed operands came from: ("source", i) or ("op", n)
    shape: tuple | None  # its first tensor result's shape (None: no tensor result)
    print: TensorPrint | None  # that result's print, for the operations that may meet the batch (else None)
    operands: tuple  # for those: per followed floating operand, (its position among the flattened arguments,
    #                  its nodes, its print)


class _Follower(TorchFunctionMode):
    """One probe pass: follows the outputs of the calls in ``keys`` through every operation.

    Printing every result of the forward would cost more than the forward, so the passes split the work
    (``learn_meetings``): the whole batch's first pass keeps shapes only; the reordered pass (``against`` that
    first pass) finds on the fly the operations on still-shared tensors whose result's shape moved with the
    batch (the candidates: everything else is shared or downstream of the batch), and prints those; a last
    pass on the whole batch prints the same operations (``wanted``)."""

    def __init__(self, keys: set, against: "_Follower | None" = None, wanted: "_Follower | None" = None):
        super().__init__()
        self.keys = keys
        self.against, self.wanted = against, wanted
        # id -> (a weak reference to the tensor, the nodes it derives from). Weak: the probe must not keep the
        # forward's activations alive (everything downstream of a shared output is followed; held strongly, a
        # small BERT's probe passes held about 2 GB at the first step).
        self.nodes: dict[int, tuple[weakref.ref, tuple]] = {}
        self.ops: list[_Op] = []
        self.sources = 0
        self.shared: set = set()  # (the reordered pass) nodes still the same for every example
        self.candidates: set[int] = set()  # (the reordered pass) operations whose result moved with the batch

    def on_output(self, key: tuple, output) -> None:
        """``LayoutLearner.on_probe_output``: start following a shared call's output."""
        if key in self.keys and torch.is_tensor(output):
            node = ("source", self.sources)
            self.nodes[id(output)] = (weakref.ref(output), (node,))
            self.shared.add(node)
            self.sources += 1

    def _of(self, x) -> tuple:
        if not torch.is_tensor(x):
            return ()
        hit = self.nodes.get(id(x))
        return hit[1] if hit is not None and hit[0]() is x else ()  # a dead reference: the id was reused

    def _printed(self, n: int, parents: tuple, shape: tuple | None) -> bool:
        """Whether operation ``n`` is printed in this pass (see the class docstring)."""
        if self.wanted is not None:
            return n in self.wanted.candidates
        if self.against is None or not any(p in self.shared for p in parents):
            return False
        seen = self.against.ops[n].shape if n < len(self.against.ops) else None
        if shape is None or shape == seen:
            self.shared.add(("op", n))  # did not move with the batch: still shared
            return False
        self.candidates.add(n)
        return True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.nodes:
            return func(*args, **kwargs)
        flat = tree_flatten((args, kwargs))[0]
        parents = tuple(dict.fromkeys(n for x in flat for n in self._of(x)))
        if not parents:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        results = [t for t in tree_flatten(out)[0] if torch.is_tensor(t)]
        if is_followed_through(func):
            node = parents
        else:
            first = results[0] if results else None
            shape = None if first is None else tuple(first.shape)
            n = len(self.ops)
            printed, operands = None, ()
            if self._printed(n, parents, shape):  # an operand changed in place keeps its shape: not a candidate
                assert first is not None
                printed = fingerprint(first)
                operands = tuple((i, self._of(x), fingerprint(x)) for i, x in enumerate(flat)
                                 if self._of(x) and x.is_floating_point())
            self.ops.append(_Op(function_name(func), parents, shape, printed, operands))
            node = (("op", n),)
        for t in results:
            if t.is_floating_point():
                self.nodes[id(t)] = (weakref.ref(t), node)
        return out


def shared_calls(signature: Signature, batch_dim_of: Callable[[str], int]) -> set:
    """The layer calls of this signature whose output and every tensor input have no batch dimension, or
    size 1 there (the calls the hooks hand to ``shared_outputs.py``), by ``(path, call index)``."""
    found = set()
    batch = signature.full_batch
    for key, full in signature.full.items():
        part = signature.probe.get(key)
        if part is None or not isinstance(full.output, TensorPrint) or not isinstance(part.output, TensorPrint):
            continue
        declared = batch_dim_of(key[0])
        pairs = [(full.output, part.output)] + [
            (f, part.inputs[i] if i < len(part.inputs) else None) for i, f in enumerate(full.inputs) if f is not None]
        try:
            if all(p is not None and analyse(f, p, batch, declared, key[0]) in (None, BROADCAST) for f, p in pairs):
                found.add(key)
        except BatchError:
            continue
    return found


def learn_meetings(learner: LayoutLearner, root: torch.nn.Module, args, kwargs, signature: Signature,
                   batch_dim_of: Callable[[str], int]) -> tuple[Meeting, ...] | None:
    """Per operation on a shared output, in the order the forward runs them, what it is (module docstring);
    None when this signature has no shared call (nothing to follow)."""
    keys = shared_calls(signature, batch_dim_of)
    if not keys:
        return None
    shapes = _Follower(keys)
    part = _Follower(keys, against=shapes)
    full = _Follower(keys, wanted=part)
    p_args, p_kwargs = signature.reordered(args, kwargs)
    learner.probe_passes(root, [(args, kwargs, shapes, shapes.on_output), (p_args, p_kwargs, part, part.on_output),
                                (args, kwargs, full, full.on_output)])
    names = [[op.name for op in f.ops] for f in (shapes, part, full)]
    if names[0] != names[1] or names[0] != names[2]:
        raise BatchError(
            "An output that is the same for every example (a relative-position table) went through other "
            f"operations on {signature.full_batch} examples than on {signature.probe_batch}, so where it meets "
            "the batch cannot be learned. Make the model's operations on such tables independent of the batch "
            "size, or freeze their parameters (requires_grad=False) before attach()."
        )
    meetings = []
    shared = {("source", i) for i in range(full.sources)}
    for n, (f, p) in enumerate(zip(full.ops, part.ops)):
        if not any(parent in shared for parent in f.parents):
            continue  # only on tensors already batched: the training forward does not follow it
        meeting = _meeting(f, p, signature.full_batch, n)
        if meeting.batch is None and meeting.problem is None:
            shared.add(("op", n))
        elif meeting.batch is not None:
            meeting = replace(meeting, expanded=_expanded(f, p, meeting, shared, signature.full_batch))
        meetings.append(meeting)
    return tuple(meetings)


def _expanded(full: _Op, part: _Op, meeting: Meeting, shared: set, batch: int) -> tuple[int, ...]:
    """The shared operands of a meeting point that the model broadcast to the batch itself (by content).

    None where the result's own rows are equal along the batch (with two examples or more): then nothing
    batched met the table there (``table.expand(B, ...) * 2``), its rows would be given to examples that never
    touched them, and the step is refused where the training forward reaches it."""
    spec = meeting.batch
    assert full.print is not None and spec is not None
    if full.print.per_dim is None:
        return ()
    d = spec.dim if isinstance(spec, Fold) else spec
    rows = full.print.shape[d]
    if batch > 1 and _equal_along_batch(full.print.per_dim[d], batch, rows // batch,
                                        spec.example_major if isinstance(spec, Fold) else True,
                                        tolerance(full.print.dtype)):
        return ()
    found = []
    part_prints = {i: pr for i, _, pr in part.operands}
    for i, nodes, fp in full.operands:
        pp = part_prints.get(i)
        if fp is not None and pp is not None and any(node in shared for node in nodes) \
                and broadcast_by_model(fp, pp, meeting.rank, meeting.batch, batch):
            found.append(i)
    return tuple(found)


def broadcast_by_model(full: TensorPrint, part: TensorPrint, rank: int, spec, batch: int) -> bool:
    """Whether an operand of a meeting point (rank ``rank``, batch at ``spec``) holds the batch's rows along
    the meeting dimension although it derives from a shared output only: its row count there follows the
    batch like the result's (``B * k`` rows in the whole batch's pass, ``B' * k`` in the reordered one), and
    along the batch those rows are EQUAL to each other in both passes (the model's own ``expand(B, ...)`` or
    ``repeat(B, ...)`` of a table; a fold's ``k`` rows per example may differ among themselves). Never a
    size alone: a table axis that happens to have ``B`` entries has rows that differ, or a size that does not
    move with the batch."""
    d = spec.dim if isinstance(spec, Fold) else spec
    major = spec.example_major if isinstance(spec, Fold) else True
    at = d - (rank - len(full.shape))
    if at < 0 or len(part.shape) != len(full.shape) or full.per_dim is None or part.per_dim is None:
        return False
    rows, probe = full.shape[at], len(probe_order(batch))
    if rows % batch or rows == 0 or part.shape[at] != probe * (rows // batch):
        return False
    if rows == 1 and batch == 1 and not isinstance(spec, Fold):
        return False  # one example: an ordinary size-1 broadcast, the existing expansion serves it
    tol = tolerance(full.dtype)
    return _equal_along_batch(full.per_dim[at], batch, rows // batch, major, tol) and \
        _equal_along_batch(part.per_dim[at], probe, rows // batch, major, tol)


def _equal_along_batch(per_index: tuple, batch: int, k: int, major: bool, tol: float) -> bool:
    """Whether a dimension's slices (one projection and one norm per index) are equal along the batch: ``batch``
    examples of ``k`` slices each, example-major (``(batch, k)`` flattened) or not (``(k, batch)``)."""
    projections, norms = per_index
    scale = max(float(norms.max()) if norms.numel() else 0.0, 1e-300)
    for values in (projections, norms):
        grid = values.reshape(batch, k) if major else values.reshape(k, batch).T
        if not bool(((grid - grid[:1]).abs() <= tol * scale).all()):
            return False
    return True


def _meeting(full: _Op, part: _Op, batch: int, n: int) -> Meeting:
    rank = 0 if full.shape is None else len(full.shape)
    if full.shape is None or part.shape is None or full.shape == part.shape:
        return Meeting(full.name, rank, None)  # did not move with the batch: still shared
    assert full.print is not None and part.print is not None  # the reordered pass printed it (a candidate)
    where = f"the result of {full.name} (operation {n} on an output that is the same for every example)"
    try:
        found = analyse(full.print, part.print, batch, 0, where)
    except BatchError as err:
        return Meeting(full.name, rank, None, str(err))
    if isinstance(found, RowsProblem):
        return Meeting(full.name, rank, None, refusal(found))
    if found is None or found == BROADCAST:
        return Meeting(full.name, rank, None)
    assert isinstance(found, (int, Fold))
    return Meeting(full.name, rank, found)
