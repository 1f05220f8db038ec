"""nn.LSTM, nn.GRU and nn.RNN (tanh, relu), unchanged, as Linear maps applied at every step.

Every gate pre-activation of an RNN is a linear map of the step's input ``x_t``
and the previous hidden state ``h_{t-1}`` (Opacus' ``DPLSTM`` writes the cells
out of ``nn.Linear`` layers for this reason). So each weight matrix is a Linear
layer applied at every step: its per-example gradient is
``sum_t dL/dgate_t  outer  [x_t | h_{t-1}]``, the Linear rule's maths (ghost
norms included) over ``(B, T, gate)`` output gradients and ``(B, T, in)`` inputs.

torch's fused kernel does not expose the per-step gate gradients. While an
attached RNN runs, the engine pushes a thread-local ``TorchFunctionMode`` (no
module-level patching, as for ``nn.MultiheadAttention``) that intercepts the
module's one call of ``torch.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` and
runs the same recurrence step by step with the module's own weights. The
gate pre-activations are tensors of that graph, so the ordinary backward pass
delivers their gradients to tensor hooks: no recomputation, no replay per
micro-batch, and the weights' own (unclipped) gradients are never computed.
Per (layer, direction) suffix ``sfx`` (``_l0``, ``_l0_reverse``, ...), one
Linear record per weight:

* ``weight_ih{sfx}`` (bias ``bias_ih{sfx}``): input rows ``x_t`` (the previous
  layer's output, after inter-layer dropout, above layer 0), output-gradient rows
  ``d(x_t W_ih^T + b_ih)``;
* ``weight_hh{sfx}`` (bias ``bias_hh{sfx}``): input rows ``h_{t-1}`` (the initial
  state at the first step), output-gradient rows ``d(h_{t-1} W_hh^T + b_hh)``: the
  same gradient as the input part for LSTM and RNN; GRU's own hidden part (its
  candidate gate multiplies it by the reset gate);
* ``weight_hr{sfx}`` (LSTM ``proj_size``): input rows ``o_t * tanh(c_t)``,
  output-gradient rows ``dL/dh_t``.

Inter-layer dropout in training is exact: the masks are drawn here, and the
dropped input is what the record keeps. An initial state (an LSTM's
``(h_0, c_0)`` too) is used as given; gradients reach whatever computed it through
the ordinary graph.

A ``PackedSequence`` input reaches the fused function as its packed rows and
``batch_sizes`` (sequences sorted by length, hidden states permuted the same
way). The capture unpacks it to a ``(B, T, in)`` batch in the examples' own
order (``unsorted_indices``), runs the same recurrence with each example's state
frozen after its last step (``torch.where`` on a per-step mask, so padded steps
get a zero gate gradient and add nothing), and packs the outputs and final
states back. A reverse direction starts each example at its own last step, as
torch's packed kernel does.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModuleError
from .attention import LinearParts
from .registry import computes_like

_FUNCTIONS = {torch.lstm: "LSTM", torch.gru: "GRU", torch.rnn_tanh: "RNN_TANH", torch.rnn_relu: "RNN_RELU"}
RNN_TYPES = (nn.LSTM, nn.GRU, nn.RNN)


def is_captured_rnn(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (or a subclass computing the same)."""
    return any(isinstance(module, base) and computes_like(type(module), base) for base in RNN_TYPES)


#: ``on_part(weight_name, bias_name, parts, x, source, source_batch_dim)``: ``x`` holds the part's input rows,
#: detached and batch-first ``(B, T, in)``; ``source`` is the tensor whose gradient is the part's output gradient
#: ``(B, T, out)`` once its batch dimension ``source_batch_dim`` is moved to 0.
OnPart = Callable[[str, "str | None", LinearParts, torch.Tensor, torch.Tensor, int], None]


class RNNCapture(TorchFunctionMode):
    """Intercepts the fused RNN function for one RNN module during its forward and runs it step by step.

    ``on_part`` is called once per weight matrix (see the module docstring); the engine registers the
    output-gradient hook on its ``source``.
    """

    def __init__(self, rnn: nn.RNNBase, path: str, on_part: OnPart, unsorted_indices: torch.Tensor | None = None):
        super().__init__()
        self.rnn = rnn
        self.path = path
        self.on_part = on_part
        self.unsorted_indices = unsorted_indices  # a PackedSequence input's: sorted row -> example order
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FUNCTIONS and not kwargs and len(args) == 9:
            packed = torch.is_tensor(args[1]) and not args[1].is_floating_point()
            params = args[3] if packed else args[2]
            if isinstance(params, (list, tuple)) and params and params[0] is self.rnn._flat_weights[0]:
                self.calls += 1  # the mode is off while this runs: our own torch calls are not intercepted
                if packed:
                    return self._run_packed(_FUNCTIONS[func], *args)
                return self._run(_FUNCTIONS[func], *args)
        return func(*args, **kwargs)

    def _run_packed(self, mode: str, data, batch_sizes, hx, params, has_biases, num_layers, dropout, train,
                    bidirectional):
        """The packed call: unpack to ``(B, T, in)`` in example order, run masked, pack the results back."""
        sizes = batch_sizes.to(data.device)
        T, B = len(batch_sizes), int(batch_sizes[0]) if len(batch_sizes) else 0
        in_step = torch.arange(B, device=data.device)[None, :] < sizes[:, None]  # (T, B_sorted): row r at step t
        padded = data.new_zeros(T, B, data.shape[-1]).index_put((in_step,), data)  # sorted rows, (T, B, in)
        order = self.unsorted_indices
        order = torch.arange(B, device=data.device) if order is None else order.to(data.device)
        back = torch.empty_like(order)
        back[order] = torch.arange(B, device=data.device)  # example order -> sorted row (sorted_indices)
        x = padded.transpose(0, 1)[order]  # (B, T, in) in the examples' order
        active = in_step.t()[order].unbind(1)  # per step, (B,) in example order
        hx = tuple(h[:, order] for h in hx) if isinstance(hx, (tuple, list)) else hx[:, order]
        result = self._run(mode, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, True,
                           [a[:, None] for a in active])
        out = result[0][back].transpose(0, 1)[in_step]  # packed rows again, (N, hidden)
        return (out, *(h[:, back] for h in result[1:]))

    def _run(self, mode: str, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first,
             active: list | None = None):
        rnn = self.rnn
        if x.dim() != 3:
            raise UnsupportedModuleError(
                f"{self.path}: unbatched input of shape {tuple(x.shape)}; a batch dimension is needed to tell "
                "examples apart. Pass a (batch, seq, features) or (seq, batch, features) tensor.")
        names = list(rnn._flat_weights_names)
        weights = dict(zip(names, params))
        h0, c0 = hx if isinstance(hx, (tuple, list)) else (hx, None)
        ndir = 2 if bidirectional else 1
        tdim = 1 if batch_first else 0
        seq = x
        h_n, c_n = [], []
        for layer in range(num_layers):
            if layer > 0 and dropout > 0 and train:
                seq = F.dropout(seq, dropout, training=True)  # torch drops every layer's output but the last
            outs = []
            for direction in range(ndir):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                k = layer * ndir + direction
                out, h, c = self._direction(mode, seq, weights, sfx, has_biases, h0[k],
                                            None if c0 is None else c0[k], bool(direction), tdim, batch_first,
                                            active)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            seq = outs[0] if ndir == 1 else torch.cat(outs, -1)
        if mode == "LSTM":
            return seq, torch.stack(h_n), torch.stack(c_n)
        return seq, torch.stack(h_n)

    def _direction(self, mode, seq, weights, sfx, has_biases, h, c, reverse, tdim, batch_first, active=None):
        """One direction of one layer; returns its output sequence (the call's layout), h_n and c_n.

        ``active[t]`` ((B, 1) booleans, packed input only): whether each example has a step ``t``; an
        example's state is carried unchanged through the steps it does not have."""
        w_ih, w_hh = weights["weight_ih" + sfx], weights["weight_hh" + sfx]
        b_ih = weights.get("bias_ih" + sfx) if has_biases else None
        b_hh = weights.get("bias_hh" + sfx) if has_biases else None
        w_hr = weights.get("weight_hr" + sfx)
        gru = mode == "GRU"
        x_in = seq.detach()
        bias = None if b_ih is None else (b_ih if gru else b_ih + b_hh)  # LSTM/RNN: one pre-activation
        gi = torch.matmul(seq, w_ih.t())  # every step's input part in one product
        if bias is not None:
            gi = gi + bias
        if not gi.requires_grad:
            gi = gi.detach().requires_grad_()  # nothing upstream needs a gradient: the gate gradients still do
        steps = gi.unbind(tdim)  # one backward node for all steps
        T = len(steps)
        batch = steps[0].shape[0] if T else 0
        zeros_h = gh_hook = None
        if gru:
            # The hidden part's gradient per step, as one tensor: a zero added at every step, read by one hook.
            gh_hook = gi.new_zeros(batch, T, w_hh.shape[0]).requires_grad_()
            zeros_h = gh_hook.unbind(1)
        proj_hook = zeros_p = None
        if w_hr is not None:
            proj_hook = gi.new_zeros(batch, T, w_hr.shape[0]).requires_grad_()
            zeros_p = proj_hook.unbind(1)
        w_hh_t = w_hh.t()
        hidden = w_hh.shape[1] if w_hr is None else w_hr.shape[1]  # LSTM: c's size
        hs: list = [None] * T
        hprev: list = [None] * T
        us: list = [None] * T
        for t in (range(T - 1, -1, -1) if reverse else range(T)):
            hprev[t] = h.detach()
            h_before, c_before = h, c
            if mode == "LSTM":
                gates = torch.addmm(steps[t], h, w_hh_t)
                i, f, _, o = torch.sigmoid(gates).chunk(4, 1)  # one kernel for the three sigmoid gates
                c = torch.addcmul(f * c, i, torch.tanh(gates[:, 2 * hidden:3 * hidden]))
                u = o * torch.tanh(c)
                if w_hr is not None:
                    us[t] = u.detach()
                    h = torch.addmm(zeros_p[t], u, w_hr.t())
                else:
                    h = u
            elif gru:
                gh = (h @ w_hh_t if b_hh is None else torch.addmm(b_hh, h, w_hh_t)) + zeros_h[t]
                ir, iz, in_ = steps[t].chunk(3, 1)
                hr, hz, hn = gh.chunk(3, 1)
                r = torch.sigmoid(ir + hr)
                z = torch.sigmoid(iz + hz)
                n = torch.tanh(in_ + r * hn)
                h = n + z * (h - n)  # (1 - z) * n + z * h
            else:
                pre = torch.addmm(steps[t], h, w_hh_t)
                h = torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)
            if active is not None:  # an example past its last step keeps its state (and gets no gate gradient)
                h = torch.where(active[t], h, h_before)
                if c is not None:
                    c = torch.where(active[t], c, c_before)
            hs[t] = h
        out = torch.stack(hs, tdim) if T else seq.new_zeros((*seq.shape[:-1], h.shape[-1]))
        bias_ih, bias_hh = ("bias_ih" + sfx, "bias_hh" + sfx) if has_biases else (None, None)
        x_bf = x_in.transpose(0, 1) if tdim == 0 else x_in  # (B, T, in)
        a_hh = torch.stack(hprev, 1) if T else x_bf.new_zeros((*x_bf.shape[:-1], w_hh.shape[1]))  # (B, T, H)
        self.on_part("weight_ih" + sfx, bias_ih, LinearParts(w_ih, b_ih), x_bf, gi, 1 - tdim)
        if gh_hook is not None:
            self.on_part("weight_hh" + sfx, bias_hh, LinearParts(w_hh, b_hh), a_hh, gh_hook, 0)
        else:
            self.on_part("weight_hh" + sfx, bias_hh, LinearParts(w_hh, b_hh), a_hh, gi, 1 - tdim)
        if proj_hook is not None:
            self.on_part("weight_hr" + sfx, None, LinearParts(w_hr, None), torch.stack(us, 1), proj_hook, 0)
        return out, h, c
