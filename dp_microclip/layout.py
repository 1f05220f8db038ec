"""Where the batch is in the model's inputs and in every hooked layer call: learned, never guessed.

Guessing the batch dimension as "the dimension whose size equals B" is wrong
whenever a sequence length, a bucket count or a routed-token count happens to
equal B, and Poisson batches make that happen. Instead, the first time the
model sees an input signature (its inputs' shapes with the batch dimension left
out), the engine runs a *probe*: the model without gradients, dropout off and
torch's RNG forked to one state, once on the whole batch and once on its
examples reversed with the last one repeated (``rows.probe_order``), keeping a print of every tensor
each hooked layer sees (``rows.py``: shapes and one number per row, nothing of
the activations). What is learned:

* **the model input's batch dimension, per input tensor**: the first input's is
  declared (``attach(batch_first=...)``, the root module's ``batch_first``) or
  else dimension 0, falling back to 1 when the probe contradicts 0 (a
  sequence-first model, seen from the layers that declare a layout and from the
  output that must follow the batch); a declaration is checked, never trusted.
  Every other input is cut along ITS OWN batch dimension: the one with the batch
  size, and where several have it (a ``(B, T)`` padding mask next to a ``(T, B,
  D)`` input with T = B, a ``(T, T)`` causal mask) each combination is tried and
  the one under which the model runs and its outputs follow the batch, row for
  row, wins. Still ambiguous: refused;
* **each layer call's batch rows** (``rows.analyse``): the dimension whose size
  moved with the batch AND whose rows equal the same examples' rows of the whole
  batch, where the reordering moved them; ``B * k`` rows flattened with another axis get a row map
  (:class:`~dp_microclip.rows.Fold`); a shape that did not move is shared by the
  batch (broadcast when it has size 1 at the layer's declared batch dimension,
  e.g. HuggingFace position ids ``(1, T)``); rows chosen by the data are refused.

The probe restores every buffer it changed and costs two forwards without
gradients per new signature (one more per input whose batch dimension it has to
tell apart); Poisson batches change only B, which the signature leaves out.
A model that cannot run on a smaller batch is refused in every mode: the
engine never trains on a guess.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .contract import NoDropout, mixing_error
from .errors import BatchError, PrivacyError
from .layers.traits import CHANNELS_FIRST
from .rows import (BROADCAST, Fold, RowsProblem, TensorPrint, analyse, check_sizes, deviation, fingerprint,
                   probe_order, refusal)
from .model_inputs import candidates, describe, select_all, shapes_key, structure as input_structure, tensor_leaves
from .tensors import output_tensors

__all__ = ["BROADCAST", "Fold", "LayoutLearner", "declared_batch_dim"]  # re-exported for the hooks


def declared_batch_first(module: nn.Module) -> bool | None:
    """The batch layout a module declares, if any (MHA, RNNs, transformer layers)."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        return declared_batch_first(module.layers[0])
    batch_first = getattr(module, "batch_first", None)
    if isinstance(batch_first, bool):
        return batch_first
    return None


def declared_batch_dim(model: nn.Module, path: str, root_dim: int) -> int:
    """The batch dimension a module at ``path`` works in: its type's convention, its own or its
    nearest ancestor's ``batch_first``, else the model input's (``root_dim``)."""
    module = model.get_submodule(path) if path else model
    if isinstance(module, CHANNELS_FIRST):
        return 0  # torch's convention for these layers: (N, C, ...)
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        declared = declared_batch_first(model.get_submodule(".".join(parts[:depth])))
        if declared is not None:
            return 0 if declared else 1
    return root_dim


@dataclass(frozen=True)
class CallLayout:
    """Where the batch is in one call of one layer.

    Attributes:
        inputs: per positional argument: the batch dimension (int), a ``Fold`` (several rows per
            example), ``BROADCAST``, or None (not a tensor, or a tensor without a batch dimension).
        output: the output's batch dimension, a ``Fold``, or ``BROADCAST`` (expanded to the batch by the
            engine); for a layer that returns several tensors, a tuple with one entry per tensor (None: no batch).
    """

    inputs: tuple
    output: int | str | tuple | Fold


@dataclass
class ProbeRecord:
    """Prints of the tensors one layer call saw during a probe pass: per positional argument, and its output."""

    inputs: tuple
    output: tuple | TensorPrint | None


@dataclass
class Signature:
    """What is known about one input signature of the model: the probe's prints and the learned layouts."""

    probe_batch: int | None  # B' of the probe; None when no probe ran (an empty batch)
    full: dict = field(default_factory=dict)  # (path, call index) -> ProbeRecord of the whole-batch pass
    probe: dict = field(default_factory=dict)  # (path, call index) -> ProbeRecord of the B' pass
    learned: dict = field(default_factory=dict)  # (path, call index) -> CallLayout
    rows_checked: bool = False  # DP mode: contract.rows_mixed ran for this signature
    input_dims: tuple = ()  # per tensor leaf of (args, kwargs): its batch dimension, or None
    output_dims: tuple = ()  # per tensor leaf of the model's output: its batch dimension, or None
    full_batch: int = 0  # B of the probe's whole-batch pass

    meetings: tuple | None = None  # shared_outputs.Meeting per operation on a shared output (meetings.py)

    def shrink(self, args, kwargs, size: int) -> tuple:
        """``(args, kwargs)`` with the first ``size`` examples, each input cut along its own batch dimension."""
        return select_all(args, kwargs, self.input_dims, list(range(size)))

    def reordered(self, args, kwargs) -> tuple:
        """``(args, kwargs)`` holding the probe's examples (``rows.probe_order``), as in its second pass."""
        return select_all(args, kwargs, self.input_dims, probe_order(self.full_batch))


# ---------------------------------------------------------------------------------- the learner
class LayoutLearner:
    """Learns, once per input signature, where the batch is in the inputs and every hooked layer call.

    The hooks ask :meth:`signature` when the attached model is called (probing a new
    signature) and :meth:`layout` for each layer call; during the probe ``probing`` is
    set, and the layer hooks only record prints (:meth:`record_probe_call`).

    Args:
        root_batch_dim: the declared batch dimension of the model's first input (``attach(batch_first=...)``
            or the root module's ``batch_first``), checked by the probe; None: learned (0, else 1).
        dp: DP mode: rows that change when another example is removed (the model mixes examples) are
            refused here too; noise-free mode trains such a model along the batch dimension its shapes show.
        warn: ``(key, message) -> None``, warns once per key.
    """

    def __init__(self, root_batch_dim: int | None, dp: bool, warn: Callable[[str, str], None]):
        self.root_batch_dim = root_batch_dim
        self.dp = dp
        self._warn = warn
        self.declared: dict[str, int] = {}  # unit path -> the batch dimension its module declares (checked)
        self.signatures: dict[tuple, Signature] = {}
        self.structures: dict[tuple, tuple] = {}  # inputs' structure -> per-leaf batch dimensions
        self.probing: dict | None = None  # the records of the probe pass in progress
        self._probe_calls: dict[str, int] = {}
        self.on_probe_output: Callable | None = None  # ((path, index), output) -> None, during probe_passes

    def record_probe_call(self, path: str, args: tuple, output) -> None:
        """During a probe pass: keep prints of the tensors one call of the unit at ``path`` saw."""
        assert self.probing is not None
        index = self._probe_calls.get(path, 0)
        self._probe_calls[path] = index + 1
        if self.on_probe_output is not None:  # a meeting probe (meetings.py) needs the outputs, not prints
            self.on_probe_output((path, index), output)
            return
        inputs = tuple(fingerprint(a) if torch.is_tensor(a) else None for a in args)
        out: tuple | TensorPrint | None = None
        if torch.is_tensor(output):
            out = fingerprint(output)
        elif output is not None:
            out = tuple(fingerprint(t) for t in output_tensors(output))
        self.probing[(path, index)] = ProbeRecord(inputs, out)

    # ------------------------------------------------------------------ signatures
    def signature(self, root: nn.Module, args, kwargs) -> tuple[Signature, int]:
        """This input signature's layouts (probed the first time) and the batch size."""
        leaves = tensor_leaves(args, kwargs)
        if not leaves:
            raise BatchError("The model was called without a tensor argument: cannot find the batch size.")
        first = leaves[0][1]
        structure = input_structure(leaves)
        dims = self.structures.get(structure)
        if dims is not None:
            batch = int(first.shape[dims[0]])
            if batch and all(d is None or t.shape[d] == batch for (_, t), d in zip(leaves, dims)):
                key = shapes_key(leaves, dims, batch)
                known = self.signatures.get(key)
                if known is None:
                    known = self.signatures[key] = self._learn(root, args, kwargs, leaves, [dims])
                return known, batch
        default = self.root_batch_dim if self.root_batch_dim is not None else 0
        if first.dim() <= default:
            raise BatchError(
                f"The model's first input has shape {tuple(first.shape)}, with no batch dimension {default}. "
                "Pass batched inputs, or set attach(..., batch_first=...) to name the batch dimension."
            )
        if first.shape[default] == 0:
            return Signature(None, input_dims=(default,) + (None,) * (len(leaves) - 1)), 0
        signature = self._learn(root, args, kwargs, leaves, None)
        self.structures[structure] = signature.input_dims
        batch = int(first.shape[signature.input_dims[0]])
        self.signatures[shapes_key(leaves, signature.input_dims, batch)] = signature
        return signature, batch

    def _pass(self, root: nn.Module, args, kwargs, state, mode=None) -> tuple[dict, tuple]:
        """One forward without gradients (dropout off, RNG at ``state``, ``mode`` pushed above NoDropout):
        its records and output prints."""
        self.probing, self._probe_calls = {}, {}
        try:
            torch.set_rng_state(state[0])
            for d, s in state[1]:
                torch.cuda.set_rng_state(s, d)
            with torch.no_grad(), NoDropout(), (mode if mode is not None else contextlib.nullcontext()):
                output = root(*args, **kwargs)
            return self.probing, tuple(fingerprint(t) for t in output_tensors(output))
        finally:
            self.probing = None

    def probe_passes(self, root: nn.Module, runs: list) -> None:
        """More probe passes, as the layout probe runs them, one per ``(args, kwargs, mode,
        on_probe_output)``: each ``mode`` (a ``TorchFunctionMode``) sees the whole forward, and
        ``on_probe_output`` every hooked call's output (``meetings.py``)."""
        saved = {name: b.clone() for name, b in root.named_buffers()}
        devices = sorted({t.device.index for t in list(saved.values()) + list(root.parameters())
                          if t.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=devices):
                state = (torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices])
                for args, kwargs, mode, on_output in runs:
                    self.on_probe_output = on_output
                    self._pass(root, args, kwargs, state, mode)
                    _restore(root, saved)
        finally:
            self.on_probe_output = None
            _restore(root, saved)

    def _learn(self, root: nn.Module, args, kwargs, leaves, known: list | None) -> Signature:
        """Probe: the whole batch once, then B' examples per candidate layout of the inputs."""
        saved = {name: b.clone() for name, b in root.named_buffers()}  # BatchNorm statistics and the like
        devices = sorted({t.device.index for t in list(saved.values()) + list(root.parameters())
                          if t.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=devices):
                state = (torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices])
                try:
                    full = self._pass(root, args, kwargs, state)
                except Exception as err:  # noqa: BLE001 - the user's forward, without gradients
                    raise BatchError(
                        f"dp_microclip learns where the batch is by running the model without gradients; that "
                        f"forward failed ({type(err).__name__}: {err})."
                    ) from err
                _restore(root, saved)
                return self._search(root, args, kwargs, leaves, known, full, state, saved)
        finally:
            _restore(root, saved)

    def _search(self, root, args, kwargs, leaves, known, full, state, saved) -> Signature:
        first = leaves[0][1]
        if known is not None:
            firsts = [known[0][0]]
        elif self.root_batch_dim is not None:
            firsts = [self.root_batch_dim]
        else:
            firsts = [0, 1] if first.dim() > 1 else [0]
        reasons: list[str] = []
        for d0 in firsts:
            batch = int(first.shape[d0])
            probe = len(probe_order(batch))
            if known is not None:
                options = [[d] for d in known[0]]
            else:
                options = [[d0]] + [candidates(t, batch, d0) for _, t in leaves[1:]]
            tried: dict[tuple, tuple] = {}

            def attempt(dims: tuple) -> tuple:
                if dims not in tried:
                    tried[dims] = self._attempt(root, args, kwargs, dims, batch, probe, full, state)
                    _restore(root, saved)
                return tried[dims]

            preferred = tuple(o[0] for o in options)
            chosen, failed = list(preferred), None
            if any(len(o) > 1 for o in options):
                combos = list(itertools.product(*options))[:_MAX_COMBINATIONS]  # each: one forward, once
                runs = [(attempt(c), c) for c in combos]
                # Best: every moving output follows the batch right, the most outputs move, the rows agree best.
                ranked = sorted((((r[0], r[6], -r[5]), c) for r, c in runs if r[0] > 0), key=lambda x: x[0],
                                reverse=True)
                if not ranked:
                    failed = attempt(preferred)[1]
                else:
                    top, runner = ranked[0], ranked[1] if len(ranked) > 1 else None
                    if runner is not None and runner[0][:2] == top[0][:2] and \
                            -runner[0][2] <= max(10 * -top[0][2], 1e-9):
                        differ = [leaves[i][0] for i in range(len(leaves)) if top[1][i] != runner[1][i]]
                        raise BatchError(
                            f"The model's input(s) {differ} have the batch size {batch} along several dimensions "
                            f"({describe(leaves, top[1])} or {describe(leaves, runner[1])}), and the model runs "
                            "and follows the batch either way, so their batch dimension cannot be learned. Give each "
                            "input a layout in which only its batch dimension has the batch size (for example a "
                            "sequence length other than the batch size), or pass them in the first input's layout."
                        )
                    chosen = list(top[1])
            if failed is None:
                score, why, records, outputs, follows, _, _ = attempt(tuple(chosen))
                if score > 0:
                    return Signature(probe, full=full[0], probe=records, input_dims=tuple(chosen),
                                     output_dims=outputs, full_batch=batch)
                failed = why
                if follows and d0 == 0 and len(firsts) > 1:
                    self._contradiction(why, follows)  # batch-first output, a module declaring otherwise
            reasons.append(f"batch along dimension {d0} of the first input ({describe(leaves, chosen)}): {failed}")
        declared = "" if self.root_batch_dim is None else f" (declared: dimension {self.root_batch_dim})"
        raise BatchError(
            "dp_microclip learns where the batch is by running the model without gradients on the batch and on "
            f"its examples reordered, comparing what every layer sees; no layout of the inputs{declared} fits:\n  - "
            + "\n  - ".join(reasons) + "\nMake the model accept any batch size along the batch dimension of its "
            "inputs (sequence-first models: set attach(..., batch_first=False)), and keep each example's rows its "
            "own. dp_microclip refuses rather than train on a guessed batch dimension."
        )

    def _attempt(self, root, args, kwargs, dims: tuple, batch: int, probe: int, full, state) -> tuple:
        """Run the B' pass with the inputs cut along ``dims``: (score, why not, records, output dims, how
        the output follows the batch regardless of declared layouts).

        Score 2: the model's output follows the batch and its rows equal the whole batch's; 1: it follows
        the batch in shape only (the model mixes examples); 0: this layout does not fit (``why``).
        """
        p_args, p_kwargs = select_all(args, kwargs, dims, probe_order(batch))
        try:
            records, outputs = self._pass(root, p_args, p_kwargs, state)
        except Exception as err:  # noqa: BLE001 - the user's forward on B' examples
            return 0, f"the forward failed ({type(err).__name__}: {str(err)[:200]})", {}, (), 0, 0.0, 0
        conflict = ""
        for path, dim in self.declared.items():
            for key, rec in full[0].items():
                if key[0] != path or key not in records or not rec.inputs or rec.inputs[0] is None:
                    continue
                real, probed = rec.inputs[0].shape, records[key].inputs[0]
                if probed is None:
                    continue
                moved = [d for d in range(len(real)) if len(probed.shape) == len(real) and real[d] != probed.shape[d]]
                if moved != [dim] and not conflict:
                    conflict = (f"{path} declares its batch along dimension {dim}, but its input {real} changed "
                                f"along {moved or 'no dimension'} (to {probed.shape})")
        score, out_dims = 0, []
        if len(outputs) != len(full[1]):
            return 0, "the model returned another number of tensors", {}, (), 0, 0.0, 0
        statuses, error = [], 0.0  # per output that moves with the batch: 2 rows equal, 1 rows mixed, 0 neither
        for i, (f, p) in enumerate(zip(full[1], outputs)):
            try:
                found = analyse(f, p, batch, 0, f"output {i}")
            except BatchError:
                found = RowsProblem("routed", "")
            if isinstance(found, RowsProblem):
                statuses.append(1 if found.kind == "mixed" and found.dim is not None else 0)
                out_dims.append(found.dim if found.kind == "mixed" else None)
            elif isinstance(found, Fold) or (isinstance(found, int) and f.shape != p.shape):
                statuses.append(2)
                out_dims.append(None if isinstance(found, Fold) else found)
            else:
                out_dims.append(None)
                continue
            if out_dims[-1] is not None:
                error = max(error, deviation(f, p, batch, out_dims[-1]))
        score = min(statuses) if statuses else 0  # every output that follows the batch must follow it right
        if conflict:
            return 0, conflict, {}, (), score, error, len(statuses)
        if score == 0:
            return 0, f"the model's output {[f.shape for f in full[1]]} does not follow the batch (it was " \
                      f"{[p.shape for p in outputs]} on {probe} examples)", {}, (), 0, error, 0
        return score, "", records, tuple(out_dims), score, error, len(statuses)

    def _contradiction(self, conflict: str, follows: int) -> None:
        """The output follows dimension 0 but a module declares another batch dimension: a batch_first
        mistake (attention across the batch) or a sequence-first model. Refused: which is not for us to guess."""
        if follows == 1 and self.dp:
            raise PrivacyError(mixing_error(f"with the batch along dimension 0, {conflict}, and the output's rows "
                                            "change when the other examples change"))
        raise BatchError(
            f"With the batch along dimension 0 of the model's input, {conflict}. Either the input is batch-first "
            "and that module runs across the batch (pass batch_first=True to it), or the model is sequence-first "
            "(declare it: attach(..., batch_first=False)). dp_microclip refuses rather than guess which."
        )

    # ------------------------------------------------------------------ per layer call
    def layout(self, unit, ctx, index: int, args: tuple, output) -> CallLayout:
        """Where the batch is in this call's inputs and output (learned once per signature and call)."""
        signature = ctx.signature
        key = (unit.path, index)
        where = f"{unit.path or '<root module>'} ({type(unit.module).__name__})"
        learned = signature.learned.get(key)
        if signature.probe_batch is None:  # an empty batch: nothing to learn from, nothing to split
            dims = tuple(unit.batch_dim if torch.is_tensor(a) and a.dim() > unit.batch_dim else None for a in args)
            return CallLayout(dims, unit.batch_dim if torch.is_tensor(output)
                              else tuple(unit.batch_dim for _ in output_tensors(output)))
        if learned is None:
            full, part = signature.full.get(key), signature.probe.get(key)
            if full is None or part is None:
                raise BatchError(
                    f"{where}: call {index} of this layer did not run in both passes of the layout probe (on "
                    f"{signature.full_batch} and on {signature.probe_batch} examples): how often it runs depends on "
                    "the data (e.g. an expert that receives no routed token), so its rows cannot be given to "
                    "examples. Run every layer with trainable parameters on every batch, or freeze it."
                )
            learned = signature.learned[key] = self._learn_call(unit, signature, full, part, where)
        check_sizes(learned, args, output, ctx.batch_size, where)
        return learned

    def _learn_call(self, unit, signature: Signature, full: ProbeRecord, part: ProbeRecord, where: str) -> CallLayout:
        batch, declared = signature.full_batch, unit.batch_dim

        def spec(f, p, what, required: bool):
            if f is None:
                return None
            if p is None:
                raise BatchError(f"{where}, {what}: a tensor in one probe pass and not in the other.")
            found = analyse(f, p, batch, declared, f"{where}, {what}")
            if isinstance(found, RowsProblem):
                if found.kind == "mixed" and found.dim is not None and not self.dp:
                    return found.dim  # noise-free: a model that mixes examples trains along its batch dimension
                if not required:
                    return None
                raise BatchError(refusal(found))
            return found

        inputs = tuple(spec(f, part.inputs[i] if i < len(part.inputs) else None, f"input {i}", True)
                       for i, f in enumerate(full.inputs))
        if isinstance(full.output, tuple):
            parts = part.output if isinstance(part.output, tuple) else ()
            dims = []
            for i, f in enumerate(full.output):
                try:
                    d = spec(f, parts[i] if i < len(parts) else None, f"output {i}", False)
                except BatchError:
                    d = None  # no gradient may flow through it; the first-step check catches it if one does
                dims.append(None if d == BROADCAST or isinstance(d, Fold) else d)
            return CallLayout(inputs, tuple(dims))
        assert isinstance(full.output, TensorPrint)
        out = spec(full.output, part.output if isinstance(part.output, TensorPrint) else None, "output", True)
        # None: the output is the same for every example (relative-position tables); shared_outputs.py
        # follows it to where it meets the batch, or the hooks refuse the layer.
        return CallLayout(inputs, out)


_MAX_COMBINATIONS = 32  # layouts of the inputs tried at most (inputs with the batch size along several dimensions)


def _restore(root: nn.Module, saved: dict) -> None:
    with torch.no_grad():
        for name, b in root.named_buffers():
            if name in saved and b.shape == saved[name].shape:
                b.copy_(saved[name])

