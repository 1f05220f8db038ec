"""Where an output that is the same for every example meets the batch: learned by content, never by size.

``shared_outputs.py`` follows a layer output without a batch dimension (a
relative-position table) through the forward and, where it is combined with a
batched tensor, expands it along the batch so that each example's gradient
exists. Which dimension of that operation's result is the batch must not be
guessed from sizes: a table axis, a window count or a token count may equal
``B``, and a sequence-first block puts the batch second.

So the first time an input signature runs a model that has such layers, this
file runs two more probe passes (``LayoutLearner.probe_passes``: no gradients,
dropout off, one random state; the whole batch, then the examples reordered as
in the layout probe). A ``TorchFunctionMode`` follows the shared outputs of
those passes through every operation, not stopping anywhere, and keeps a print
of each operation's result (``rows.fingerprint``). Then ``rows.analyse``
compares the two passes' prints of each result, exactly as it does for a
layer's tensors: a result that does not move with the batch is still shared
(followed further); one whose rows equal the same examples' rows where the
reordering moved them is a meeting point, along that dimension or along a
dimension holding ``k`` rows per example (``rows.Fold``); anything else is
refused when the training forward reaches it. The training forward's tracker
then counts the same operations (only those on tensors still shared) and reads
each one's :class:`~dp_microclip.shared_outputs.Meeting`.
"""

from __future__ import annotations

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
    print: TensorPrint | None  # its first tensor result's print (None: no tensor result)
    rank: int
    operands: tuple  # per followed tensor operand: (its position among the flattened arguments, its nodes, print)


class _Follower(TorchFunctionMode):
    """One probe pass: follows the outputs of the calls in ``keys`` through every operation."""

    def __init__(self, keys: set):
        super().__init__()
        self.keys = keys
        self.nodes: dict[int, tuple[torch.Tensor, tuple]] = {}  # id -> (tensor, the nodes it derives from)
        self.prints: dict[int, tuple] = {}  # id -> (tensor, its print, its version): printed once
        self.ops: list[_Op] = []
        self.sources = 0

    def on_output(self, key: tuple, output) -> None:
        """``LayoutLearner.on_probe_output``: start following a shared call's output."""
        if key in self.keys and torch.is_tensor(output):
            self.nodes[id(output)] = (output, (("source", self.sources),))
            self.sources += 1

    def _of(self, x) -> tuple:
        if not torch.is_tensor(x):
            return ()
        hit = self.nodes.get(id(x))
        return hit[1] if hit is not None and hit[0] is x else ()

    def _print(self, x: torch.Tensor) -> TensorPrint | None:
        """An operand's print (a tensor read by several operations is printed once; None: not floating)."""
        if not x.is_floating_point():
            return None
        hit = self.prints.get(id(x))
        if hit is None or hit[0] is not x or x._version != hit[2]:
            hit = self.prints[id(x)] = (x, fingerprint(x), x._version)
        return hit[1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.nodes:
            return func(*args, **kwargs)
        flat = tree_flatten((args, kwargs))[0]
        parents = tuple(dict.fromkeys(n for x in flat for n in self._of(x)))
        if not parents:
            return func(*args, **kwargs)
        followed = is_followed_through(func)
        operands = () if followed else tuple((i, self._of(x), self._print(x)) for i, x in enumerate(flat)
                                             if self._of(x))  # before the call: an in-place op changes them
        out = func(*args, **kwargs)
        results = [t for t in tree_flatten(out)[0] if torch.is_tensor(t)]
        if followed:
            node = parents
        else:
            first = results[0] if results else None
            printed = None if first is None else fingerprint(first)
            if first is not None:
                self.prints[id(first)] = (first, printed, first._version)
            self.ops.append(_Op(function_name(func), parents, printed, 0 if first is None else first.dim(), operands))
            node = (("op", len(self.ops) - 1),)
        for t in results:
            if t.is_floating_point():
                self.nodes[id(t)] = (t, node)
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
    full, part = _Follower(keys), _Follower(keys)
    p_args, p_kwargs = signature.reordered(args, kwargs)
    learner.probe_passes(root, [(args, kwargs, full, full.on_output), (p_args, p_kwargs, part, part.on_output)])
    if [op.name for op in full.ops] != [op.name for op in part.ops]:
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
    """The shared operands of a meeting point that the model broadcast to the batch itself (by content)."""
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
    return all(_equal_along_batch(pr.per_dim[at], n, rows // batch, major, tolerance(full.dtype))
               for pr, n in ((full, batch), (part, probe)))


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
    if full.print is None or part.print is None or full.print.shape == part.print.shape:
        return Meeting(full.name, full.rank, None)  # did not move with the batch: still shared
    where = f"the result of {full.name} (operation {n} on an output that is the same for every example)"
    try:
        found = analyse(full.print, part.print, batch, 0, where)
    except BatchError as err:
        return Meeting(full.name, full.rank, None, str(err))
    if isinstance(found, RowsProblem):
        return Meeting(full.name, full.rank, None, refusal(found))
    if found is None or found == BROADCAST:
        return Meeting(full.name, full.rank, None)
    assert isinstance(found, (int, Fold))
    return Meeting(full.name, full.rank, found)
