"""The usage route's hooks: records for parameters used through recognised functions, whatever their module.

A module with trainable parameters and no rule is a unit of kind
``"functional"``. While it runs its forward (and only then) the engine enters a
``layers.usage_mode.UsageMode`` that follows the module's own parameters. Each
recognised call (a linear map, an embedding lookup, a broadcast element-wise
op, ``addcmul``, a concatenation) is captured here like a rule layer's call: its batch
dimension comes from the layout machinery (``layout.LayoutLearner``: the probe
records each call's shapes under a name of its own, ``path[kind:params]``), the
activation is kept batch-first, and a tensor hook on the call's output emits a
``Record`` whose rule is one of ``layers/functional.py``'s when the gradient
arrives. A parameter used by several calls gives several records; the engine
then sums their group gradients before the norm, as for tied weights.

When the forward ends, the module keeps the usage route only if every parameter
the forward touched (handed to any torch function) had at least one recognised
use, no use went unrecognised, and no tensor derived from a parameter left the
forward. A parameter the forward never touched is simply not used by it (HF
Dinov2's ``mask_token`` without ``bool_masked_pos``): it gets no record from this
call, as autograd would give it no gradient; the used ones take the route as
usual. Otherwise every record of that forward is disarmed and the module's
generic capture (``hooks.py``) takes the call, replaying the touched parameters
only: the generic ``torch.func`` path, with a warning, or a refusal naming the
use where the generic path is not allowed (``fallback="error"``, or DP mode
without ``fallback="generic"``).

What an unused parameter's ``p.grad`` then becomes is the step's business
(``step.write_gradients``): left as it was noise-free, as plain PyTorch leaves
it; zero plus noise in DP mode, so that the update does not reveal which
parameters a batch used.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from .capture import CaptureSink
from .errors import BatchError, UnsupportedModuleError
from .layers.functional import rule_of
from .layers.usage_mode import NotRecognised, Use, UsageMode, chains_of
from .layout import BROADCAST, LayoutLearner
from .rows import Fold, batch_first
from .records import Record, Unit
from .tensors import expand_at, output_tensors


def _aligned(value_shape: tuple, target: list, bd: int) -> tuple:
    """``value_shape`` right-aligned to ``target`` (broadcasting), batch dimension first; refused unless the
    value broadcasts along the batch."""
    if len(value_shape) > len(target):
        raise NotRecognised("a parameter with more dimensions than the activation it is combined with")
    aligned = [1] * (len(target) - len(value_shape)) + list(value_shape)
    if aligned[bd] != 1 or any(a not in (1, t) for a, t in zip(aligned, target)):
        raise NotRecognised("a parameter that does not broadcast along the batch")
    return (1, *aligned[:bd], *aligned[bd + 1:])


class UsageCapture:
    """The usage route of one unit (module docstring).

    Args:
        unit: the module without a rule and its trainable parameters.
        sink: the engine's capture sink.
        layouts: the engine's layout learner (the probe and learned layouts).
        require_grad: ``output -> output`` that requires grad (``tensors.RequireGrad`` tied to the engine's anchor).
        shared: the hooks' ``shared_outputs.SharedTables``, or None (such uses are then not recognised).
        batch_free: ``(module, args, kwargs, output) -> bool``: whether a call carries no batch in its inputs nor
            in its output; the generic capture then takes it by the VJP of the module's own forward
            (``layers/batch_free.py``), exact whatever it computes, so a use this route cannot follow is no
            reason to fall back or refuse.
    """

    def __init__(self, unit: Unit, sink: CaptureSink, layouts: LayoutLearner,
                 require_grad: Callable[[torch.Tensor], torch.Tensor], shared=None,
                 batch_free: Callable[..., bool] | None = None):
        self.unit = unit
        self.batch_free = batch_free
        self.shared = shared  # shared_outputs.SharedTables: uses whose output has no batch dimension
        self.sink = sink
        self.layouts = layouts
        self.require_grad = require_grad
        self._calls: list = []  # one entry per forward in progress: (mode, arms, probing) or None
        self._decisions: list = []  # per finished forward: None (the usage route took it) or the generic params

    # ------------------------------------------------------------------ hooks
    def install(self) -> list:
        """The forward pre-hook and forward hook of the unit's module (registered before the generic capture's)."""
        module = self.unit.module
        return [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                module.register_forward_hook(self._post, with_kwargs=True, always_call=True)]

    def generic_params(self) -> dict | None:
        """For the generic capture's forward hook (runs right after ours): None when the usage route took this
        call, else the parameters the generic capture replays (those the forward touched; all when unknown)."""
        return self._decisions.pop() if self._decisions else self.unit.params

    def _capturing(self):
        if not self.sink.active or not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1:
            return None
        return self.sink.context

    def _pre(self, module, args, kwargs):
        if self.layouts.probing is not None:
            mode = UsageMode(self.unit.params, self._probe_use, probing=True)
            entry: tuple | None = (mode, [], True)
        else:
            ctx = self._capturing()
            if ctx is None:
                entry = None
            else:
                arms: list = []
                mode = UsageMode(self.unit.params, lambda use, out: self._on_use(ctx, arms, use, out))
                entry = (mode, arms, False)
        self._calls.append(entry)
        if entry is not None:
            entry[0].__enter__()
        return None

    def _post(self, module, args, kwargs, output):
        entry = self._calls.pop() if self._calls else None
        if entry is None:
            return None
        mode, arms, probing = entry
        mode.__exit__(None, None, None)
        if probing:
            return None
        problem = mode.problem
        unrecognised = sorted(mode.touched - mode.used)  # never touched: not used by this forward, no record
        if problem is None and unrecognised:
            problem = (f"parameter(s) {unrecognised} reached no recognised function in this forward (read only "
                       "through transforms or a memory pointer, or used where the capture cannot see)")
        if problem is None and any(mode.is_tracked(t) for t in output_tensors(output)):
            problem = "a tensor derived from a parameter is returned by the forward, so its uses are not seen"
        if problem is None:
            self._decisions.append(None)
            return None
        self._decisions.append({n: p for n, p in self.unit.params.items() if n in mode.touched})
        for arm in arms:
            arm[0] = False
        if self.batch_free is None or not self.batch_free(module, args, kwargs, output):
            self._fall_back(module, problem)
        return None

    def _fall_back(self, module: nn.Module, problem: str) -> None:
        unit = self.unit
        where = f"{unit.path or '<root module>'} ({type(module).__name__})"
        if not unit.generic_allowed:
            raise UnsupportedModuleError(
                f"{where} has trainable parameters {sorted(unit.params)} and no dp_microclip rule, and the usage "
                f"route cannot take it: {problem}. The generic torch.func path is not allowed here "
                '(fallback="error", or DP mode, where it must be allowed explicitly). Register a rule with '
                'dp_microclip.register_rule(...), or pass fallback="generic" to use torch.func per micro-batch '
                "(exact only if the module treats examples independently)."
            )
        self.sink.warn_once(
            f"generic:{unit.path}",
            f"{where} has no rule and the usage route cannot take it ({problem}): its parameters "
            f"{sorted(unit.params)} use the generic torch.func path (slower; exact only if the module treats "
            "examples independently).",
        )

    # ------------------------------------------------------------------ one recognised call
    def _op_path(self, use: Use) -> str:
        return f"{self.unit.path}[{use.kind}:{'+'.join(c.name for c in chains_of(use.layer))}]"

    def _probe_use(self, use: Use, out: torch.Tensor) -> torch.Tensor:
        self.layouts.record_probe_call(self._op_path(use), use.activations, out.mT if use.transposed else out)
        return out

    def _on_use(self, ctx, arms: list, use: Use, out: torch.Tensor) -> torch.Tensor:
        unit, batch = self.unit, ctx.batch_size
        path = self._op_path(use)
        index = ctx.next_call(path)
        where = SimpleNamespace(path=path, module=unit.module, batch_dim=unit.batch_dim)
        try:  # a transposed use (W @ x) is laid out as the linear map of columns it is: out.mT
            layout = self.layouts.layout(where, ctx, index, use.activations, out.mT if use.transposed else out)
        except BatchError as err:
            raise NotRecognised(f"no batch dimension found ({err})") from err
        bd = layout.output
        params = {c.name: unit.params[c.name] for c in chains_of(use.layer)}
        if bd is None and use.kind != "broadcast" and self.shared is not None \
                and all(d is None for d in layout.inputs):
            # Its activations and output are the same for every example (a relative-position table looked up
            # with a fixed index): followed to where it meets the batch (shared_outputs.py).
            arm = [True]
            arms.append(arm)
            return self.shared.share(unit, f"{path}#{index}", rule_of(use.layer), use.layer, params,
                                     use.activations, {}, ctx, out, path, arm)
        if bd is None:
            raise NotRecognised("an output without a batch dimension")
        assert isinstance(bd, (int, str, Fold))  # one output tensor
        folded = any(isinstance(d, Fold) for d in (bd, *layout.inputs))
        if folded and use.kind not in ("linear", "embedding"):  # their rules take (B, k, ...) rows as they are
            raise NotRecognised("several rows per example flattened together into a broadcast op or a convolution")
        inputs = []
        for a, d in zip(use.activations, layout.inputs):
            if d is None:
                raise NotRecognised("an activation without a batch dimension")
            if d == BROADCAST:
                a, d = expand_at(a.detach(), unit.batch_dim, batch), unit.batch_dim
            inputs.append(batch_first(a.detach(), d, batch))
        shape_before = list(out.shape)
        if bd == BROADCAST:
            if use.inplace or use.transposed:
                raise NotRecognised("an in-place op or W @ x on a tensor shared by the batch")
            out, bd = expand_at(out, unit.batch_dim, batch), unit.batch_dim
        assert isinstance(bd, (int, Fold))
        layer = use.layer
        if use.kind == "broadcast":
            assert isinstance(bd, int)  # folded rows were turned away above
            target = list(shape_before)
            if use.select is not None:
                dim, _, length = use.select
                if dim == bd:
                    raise NotRecognised("a concatenation along the batch dimension")
                target[dim] = length
            layer = layer._replace(aligned=_aligned(layer.shape, target, bd))  # type: ignore[attr-defined]
            if use.coefficient is not None:
                coefficient = torch.broadcast_to(use.coefficient.detach(), tuple(shape_before))
                if coefficient.shape[bd] != batch:
                    coefficient = expand_at(coefficient, bd, batch)
                inputs.append(coefficient.movedim(bd, 0))
        watched = [(t, t._version) for t in inputs if not use.inplace]
        if not out.requires_grad:
            if use.inplace:
                raise NotRecognised("an in-place op whose output needs no gradient")
            out = self.require_grad(out)
        target_tensor = out
        base = out._base
        if base is not None:
            plain = base.numel() == out.numel() and base.is_contiguous() and out.is_contiguous()
            if plain:
                target_tensor = base
            elif use.inplace:
                raise NotRecognised("an in-place op on a view")
            else:
                out = target_tensor = out.clone()
        arm = [True]
        arms.append(arm)
        rule, shape, select, sink, transposed = rule_of(layer), out.shape, use.select, self.sink, use.transposed
        name = f"{path}#{index}"

        def on_grad(grad: torch.Tensor):
            if not arm[0] or not sink.active:
                return None
            g = grad.reshape(shape)
            if transposed:
                g = g.mT
            if select is not None:
                g = g.narrow(select[0], select[1], select[2])
            g = batch_first(g, bd, batch).detach()
            if any(t._version != v for t, v in watched):
                sink.report(f"{where.path}: an activation it multiplied a parameter with was modified in place "
                            "later in the forward, so its captured value is stale. Avoid the in-place op "
                            "(e.g. ReLU(inplace=True)) after this use, or give this module a rule.")
                return None
            record_dim = bd if isinstance(bd, int) else 0  # folded rows: the record's tensors are (B, k, ...)
            sink.emit(Record(unit, name, rule, layer, params, tuple(inputs), {}, g, ctx, record_dim))
            return None

        target_tensor.register_hook(on_grad)
        return out
