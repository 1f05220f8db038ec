"""nn.LSTM, nn.GRU and nn.RNN (tanh, relu): exact rules from one recomputation of the recurrence.

Every gate pre-activation of an RNN is a linear map of the step's input ``x_t``
and the previous hidden state ``h_{t-1}`` (Opacus' ``DPLSTM`` writes the cells
out of ``nn.Linear`` layers for this reason). So each weight matrix is a Linear
layer applied at every step, and its per-example gradient is
``sum_t dL/dgate_t  outer  [x_t | h_{t-1}]``: the Linear rule's maths over
``(B, T, gate)`` output gradients and ``(B, T, in)`` inputs.

torch's fused kernel does not expose the per-step gate gradients, so the rule
recomputes the recurrence once, step by step, on the captured batch-first input
(and initial state) with the module's own weights detached, and back-propagates
the captured output gradients (the output sequence, ``h_n`` and ``c_n``; zeros
for those the loss did not reach) through it in ONE ``torch.autograd.grad``
call, asking for the gradients of the gate pre-activations. That is one extra
forward and backward of the RNN for the whole batch, not one per micro-batch.
The result is cached per captured output gradient, so the ghost norms, the
weighted sum and the autotuner's timings share one recomputation.

Per (layer, direction) ``sfx`` (``_l0``, ``_l0_reverse``, ...):

* ``weight_ih{sfx}``: input rows ``x_t`` (the previous layer's output above
  layer 0), output rows ``d(x_t W_ih^T + b_ih)``;
* ``weight_hh{sfx}``: input rows ``h_{t-1}`` (the initial state at the first
  step), output rows ``d(h_{t-1} W_hh^T + b_hh)``: the same gradient as the
  input part for LSTM and RNN, the gradient of GRU's own hidden part (its
  candidate gate multiplies it by the reset gate);
* ``weight_hr{sfx}`` (LSTM ``proj_size``): input rows ``o_t * tanh(c_t)``,
  output rows ``dL/dh_t``.

Refused by name: inter-layer dropout while training (its masks cannot be
redrawn), an LSTM called with an ``(h_0, c_0)`` tuple (the hooks refuse a tuple
input), and ``PackedSequence`` inputs (the hooks refuse them before any rule).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from ..grouping import Groups
from .linear import linear_group_grads, linear_group_sq_norms, linear_weighted_sum
from .registry import LayerRule, register_rule


class _Part(NamedTuple):
    """One weight matrix used as a Linear map at every step: rows of its input and of its output gradient."""

    weight: str  # the weight's local name, e.g. "weight_ih_l0"
    bias: str | None  # its bias's local name, if the layer has biases
    inputs: torch.Tensor  # (B, T, in)
    grads: torch.Tensor  # (B, T, out)
    shared_bias: str | None = None  # a second bias with the same gradient (LSTM/RNN: bias_hh = bias_ih)


def _unwrap(x: Any) -> Any:
    if isinstance(x, tuple) and hasattr(x, "_fields") and x._fields == ("value",):
        return x.value  # a Shared input (no batch dimension)
    return x


def _check(layer: nn.RNNBase, inputs: tuple) -> None:
    where = f"{type(layer).__name__}"
    if layer.training and layer.dropout > 0 and layer.num_layers > 1:
        raise UnsupportedModuleError(
            f"{where} has dropout={layer.dropout} between its layers: its per-example gradients need the "
            "forward's dropout masks, which cannot be recovered, so they would not be exact. Create it with "
            "dropout=0 (apply nn.Dropout to its output instead), or call .eval() on it."
        )
    x = inputs[0]
    if not torch.is_tensor(x) or x.dim() != 3:
        raise UnsupportedModuleError(
            f"{where}: its rule needs a batched (B, T, features) input, got "
            f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}. Pass a batched input."
        )


def _weights(layer: nn.RNNBase, sfx: str, dtype: torch.dtype) -> dict:
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if layer.bias else []) + (
        ["weight_hr"] if getattr(layer, "proj_size", 0) > 0 else [])
    return {n: getattr(layer, n + sfx).detach().to(dtype) for n in names}


def _run_direction(layer: nn.RNNBase, seq: torch.Tensor, w: dict, h: torch.Tensor, c: torch.Tensor | None,
                   reverse: bool):
    """One direction of one layer, step by step with autograd. Returns what the backward needs."""
    mode = layer.mode
    gru = mode == "GRU"
    bias = w.get("bias_ih")
    if bias is not None and not gru:
        bias = bias + w["bias_hh"]  # LSTM/RNN: both biases add to the same pre-activation
    gi = torch.matmul(seq, w["weight_ih"].t())  # (B, T, G): every step's input part in one product
    if bias is not None:
        gi = gi + bias
    if not gi.requires_grad:
        gi.requires_grad_()  # layer 0: the input needs no gradient; the gate gradients are what we want
    w_hh_t = w["weight_hh"].t()
    b_hh = w.get("bias_hh") if gru else None
    w_hr_t = w["weight_hr"].t() if "weight_hr" in w else None
    steps = gi.unbind(1)  # one backward node for all steps (select per step would copy (B, T, G) each time)
    T = len(steps)
    hs: list = [None] * T
    hprev: list = [None] * T
    gh_list: list = [None] * T  # GRU: the hidden part of every step
    us: list = [None] * T  # LSTM proj_size: o_t * tanh(c_t) before the projection
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        hprev[t] = h
        if mode == "LSTM":
            gates = torch.addmm(steps[t], h, w_hh_t)
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            u = torch.sigmoid(o) * torch.tanh(c)
            if w_hr_t is not None:
                us[t] = u
                h = u @ w_hr_t
            else:
                h = u
        elif gru:
            gh = h @ w_hh_t if b_hh is None else torch.addmm(b_hh, h, w_hh_t)
            gh_list[t] = gh
            ir, iz, in_ = steps[t].chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r = torch.sigmoid(ir + hr)
            z = torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            h = n + z * (h - n)  # (1 - z) * n + z * h
        else:
            pre = torch.addmm(steps[t], h, w_hh_t)
            h = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
        hs[t] = h
    return gi, hs, hprev, gh_list, us, h, c


def _recompute(layer: nn.RNNBase, inputs: tuple, out_grad: Any) -> list[_Part]:
    """Every weight's Linear parts for this call: one step-by-step forward and one backward."""
    _check(layer, inputs)
    x = inputs[0]
    dtype, batch = x.dtype, x.shape[0]
    ndir = 2 if layer.bidirectional else 1
    nl = layer.num_layers
    hidden = layer.hidden_size
    out_size = getattr(layer, "proj_size", 0) or hidden
    lstm = layer.mode == "LSTM"
    grads = tuple(out_grad) if isinstance(out_grad, tuple) else (out_grad,)
    hx = _unwrap(inputs[1]) if len(inputs) > 1 else None
    if hx is not None and (not torch.is_tensor(hx) or hx.dim() != 3):
        raise UnsupportedModuleError(
            f"{type(layer).__name__}: its rule needs the initial state as one batched (layers, B, hidden) tensor, "
            f"got {type(hx).__name__}. Pass h_0 batched, or none."
        )
    with torch.enable_grad():
        h0 = (hx.transpose(0, 1).to(dtype) if hx is not None  # captured batch-first: (B, L*D, H) -> (L*D, B, H)
              else x.new_zeros(nl * ndir, batch, out_size))
        seq = x
        targets: list = []  # tensors whose gradients we ask for
        plan: list = []  # per (layer, direction): how to read the answers
        h_n: list = []
        c_n: list = []
        for layer_index in range(nl):
            outs = []
            for direction in range(ndir):
                sfx = f"_l{layer_index}" + ("_reverse" if direction else "")
                w = _weights(layer, sfx, dtype)
                k = layer_index * ndir + direction
                c0 = x.new_zeros(batch, hidden) if lstm else None
                gi, hs, hprev, gh_list, us, h_last, c_last = _run_direction(
                    layer, seq, w, h0[k].detach().requires_grad_(), c0, bool(direction))
                start = len(targets)
                targets.append(gi)
                if layer.mode == "GRU":
                    targets.extend(gh_list)
                if us[0] is not None:
                    targets.extend(hs)
                plan.append((sfx, start, seq.detach(), hprev, us))
                outs.append(torch.stack(hs, 1))  # (B, T, out)
                h_n.append(h_last)
                c_n.append(c_last)
            seq = outs[0] if ndir == 1 else torch.cat(outs, -1)
        produced = [seq, torch.stack(h_n, 1)] + ([torch.stack(c_n, 1)] if lstm else [])  # batch-first
        pairs = [(o, g.to(dtype)) for o, g in zip(produced, grads) if g is not None]
        answers = torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs], allow_unused=True)
    answers = [torch.zeros_like(t) if a is None else a for t, a in zip(targets, answers)]
    parts: list[_Part] = []
    for sfx, start, seq_in, hprev, us in plan:
        gi_grad = answers[start]  # (B, T, G)
        steps = len(hprev)
        a_hh = torch.stack([h.detach() for h in hprev], 1)  # (B, T, out)
        b_ih, b_hh = (f"bias_ih{sfx}", f"bias_hh{sfx}") if layer.bias else (None, None)
        if layer.mode == "GRU":
            gh_grad = torch.stack(answers[start + 1:start + 1 + steps], 1)
            parts.append(_Part(f"weight_ih{sfx}", b_ih, seq_in, gi_grad))
            parts.append(_Part(f"weight_hh{sfx}", b_hh, a_hh, gh_grad))
        else:
            parts.append(_Part(f"weight_ih{sfx}", b_ih, seq_in, gi_grad, shared_bias=b_hh))
            parts.append(_Part(f"weight_hh{sfx}", None, a_hh, gi_grad))
        if us[0] is not None:
            h_grad = torch.stack(answers[start + 1:start + 1 + steps], 1)
            parts.append(_Part(f"weight_hr{sfx}", None, torch.stack([u.detach() for u in us], 1), h_grad))
    return parts


# One recomputation per captured output gradient, shared by the norms, the weighted sum and the autotuner's
# timings; an entry goes when its output gradient is freed (the record is gone).
_CACHE: dict[int, tuple] = {}


def _parts(layer: nn.RNNBase, inputs: tuple, out_grad: Any) -> list[_Part]:
    first = next(g for g in (out_grad if isinstance(out_grad, tuple) else (out_grad,)) if g is not None)
    key = id(first)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is first and hit[1]() is layer and hit[2] is inputs[0]:
        return hit[3]
    parts = _recompute(layer, inputs, out_grad)
    if hit is None:
        weakref.finalize(first, _CACHE.pop, key, None)
    _CACHE[key] = (weakref.ref(first), weakref.ref(layer), inputs[0], parts)
    return parts


def _rename(part: _Part, out: dict, values: dict) -> None:
    out[part.weight] = values["weight"]
    if part.bias is not None and "bias" in values:
        out[part.bias] = values["bias"]
        if part.shared_bias is not None:
            out[part.shared_bias] = values["bias"].clone()  # its own tensor: sums are updated in place


def _group_grads(layer: nn.RNNBase, inputs: tuple, out_grad: Any, groups: Groups) -> dict:
    out: dict = {}
    for part in _parts(layer, inputs, out_grad):
        _rename(part, out, linear_group_grads(part.inputs, part.grads, groups, part.bias is not None))
    return out


def _group_sq_norms(layer: nn.RNNBase, inputs: tuple, out_grad: Any, groups: Groups) -> dict:
    out: dict = {}
    for part in _parts(layer, inputs, out_grad):
        _rename(part, out, linear_group_sq_norms(part.inputs, part.grads, groups, part.bias is not None))
    return out


def _weighted_sum(layer: nn.RNNBase, inputs: tuple, out_grad: Any, row_weight: dict) -> dict:
    out: dict = {}
    for part in _parts(layer, inputs, out_grad):
        if part.weight in row_weight:
            out[part.weight] = linear_weighted_sum(part.inputs, part.grads, {"weight": row_weight[part.weight]},
                                                   False)["weight"]
        for bias in (part.bias, part.shared_bias):  # each with its own row weights (per-layer clipping)
            if bias is not None and bias in row_weight:
                out[bias] = linear_weighted_sum(part.inputs, part.grads, {"bias": row_weight[bias]}, True)["bias"]
    return out


def _group_grad_elements(layer: nn.RNNBase, inputs: tuple, out_grad: Any, groups: Groups) -> int:
    return groups.num_groups * sum(p.numel() for p in layer.parameters())


RNN_RULE = LayerRule(_group_grads, _group_sq_norms, _weighted_sum, _group_grad_elements, multi_output=True)
for _cls in (nn.LSTM, nn.GRU, nn.RNN):
    register_rule(_cls, RNN_RULE)
