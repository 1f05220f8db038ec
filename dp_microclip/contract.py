"""The per-example contract DP mode verifies: each example's output and row position are its own.

The sensitivity behind epsilon assumes that example ``i``'s gradient is a
function of example ``i`` alone. Three things the hooks can see break that, and
this module checks them (docs/privacy.md lists what each costs):

* **rows mixed inside the model** (batch statistics computed by hand such as
  ``(x - x.mean(0)) / x.std(0)``, ``F.batch_norm`` called directly, attention
  over the batch axis from ``batch_first=False`` fed ``(B, T, D)``):
  :func:`rows_mixed` runs the model without gradients on the whole batch and on
  its first half, with dropout switched off and torch's RNG forked to the same
  state for both, and compares each kept row of every batched output with a
  tolerance. An example-wise model gives the same rows; a mixing one does not.
  Once per input signature, DP mode only.
* **a loss computed inside the model** (HuggingFace ``model(..., labels=...)``
  averages tokens over the whole batch): :func:`model_loss_problem`.
* **rows reordered or filtered after ``engine.data_loader``** (sorted for
  ``pack_padded_sequence``): at ``b > 1`` a record's micro-batch follows its row.
  The loader fingerprints the rows it yields (:func:`row_fingerprints`, a few
  elements per row) and the model's input rows are checked against them
  (:func:`row_order_problem`): every step, ``O(B)`` work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .tensors import output_tensors
from .tensors import LOW_PRECISION

_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_FINGERPRINT_ELEMENTS = 64  # elements of each row that enter its fingerprint


class NoDropout(TorchFunctionMode):
    """Dropout off for the calls made inside (``nn.Dropout``, ``F.dropout``, SDPA's and MHA's dropout),
    whatever the modules' ``training`` flags: every other computation runs exactly as in training."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _DROPOUTS:
            return args[0] if args else kwargs["input"]
        if func is F.scaled_dot_product_attention:
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            else:
                kwargs["dropout_p"] = 0.0
        if func is F.multi_head_attention_forward:
            kwargs["training"] = False  # used by MHA for its dropout only
        return func(*args, **kwargs)


def _tolerance(t: torch.Tensor) -> float:
    if t.dtype == torch.float64:
        return 1e-7
    if t.dtype in LOW_PRECISION:
        return 3e-2
    return 1e-3


def _mixed_rows(full: torch.Tensor, part: torch.Tensor, kept: int) -> list[int]:
    """Rows of ``part`` (batch first) that differ from the same rows of ``full`` beyond the tolerance."""
    a, b = full[:kept].double(), part.double()
    finite = a[torch.isfinite(a)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    diff = (a - b).abs().nan_to_num(nan=float("inf"))
    diff = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(diff), diff)
    worst = diff.reshape(kept, -1).amax(1) if diff.numel() else diff.new_zeros(kept)
    bad = worst > _tolerance(full) * max(scale, 1e-12)
    return bad.nonzero().flatten().tolist()


def rows_mixed(root: torch.nn.Module, args, kwargs, batch_dims: tuple, batch_size: int, shrink) -> str | None:
    """Whether the model's outputs for the first ``k`` examples change when the other examples are removed.

    Runs the model twice without gradients (the whole batch, then its first ``k = max(2, B // 2)``
    examples), dropout off, torch's RNG at the same state for both, every buffer restored afterwards.
    The caller makes sure the engine's hooks capture nothing meanwhile.

    Args:
        batch_dims: per output tensor, its batch dimension (None: not compared), as the layout probe found it.
        shrink: ``k -> (args, kwargs)`` with ``k`` examples, each input cut along its own batch dimension.

    Returns:
        None when every kept row agrees; else a description of the first output that differs.
    """
    kept = max(2, batch_size // 2)
    p_args, p_kwargs = shrink(kept)
    saved = {name: b.clone() for name, b in root.named_buffers()}
    devices = sorted({t.device.index for t in list(saved.values()) + list(root.parameters())
                      if t.device.type == "cuda"})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), NoDropout():
            state = torch.get_rng_state()
            cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
            full = output_tensors(root(*args, **kwargs))
            _restore_buffers(root, saved)  # both forwards start from the same state (running statistics)
            torch.set_rng_state(state)
            for d, s in zip(devices, cuda_states):
                torch.cuda.set_rng_state(s, d)
            part = output_tensors(root(*p_args, **p_kwargs))
    finally:
        _restore_buffers(root, saved)
    for i, (f, p, batch_dim) in enumerate(zip(full, part, batch_dims)):
        if batch_dim is None or not (f.is_floating_point() and f.dim() > batch_dim and p.dim() == f.dim()):
            continue
        if f.shape[batch_dim] != batch_size or p.shape[batch_dim] != kept:
            continue
        bad = _mixed_rows(f.movedim(batch_dim, 0), p.movedim(batch_dim, 0), kept)
        if bad:
            return (f"output {i} (shape {tuple(f.shape)}): rows {bad[:5]} of the first {kept} examples change "
                    f"when the other {batch_size - kept} examples of the batch are removed")
    return None


def _restore_buffers(root: torch.nn.Module, saved: dict) -> None:
    with torch.no_grad():
        for name, b in root.named_buffers():
            if name in saved and b.shape == saved[name].shape:
                b.copy_(saved[name])


def mixing_error(where: str) -> str:
    """The message of a model that mixes examples (DP mode refuses it)."""
    return (
        f"dp_microclip verifies in DP mode that each example's output depends on that example only: {where} "
        "(compared with dropout off and the same random state; once per input signature). The model mixes "
        "examples, so one record moves every micro-batch's gradient and the sensitivity epsilon assumes does not "
        "hold. Common causes and fixes: batch statistics computed in forward, e.g. (x - x.mean(0)) / x.std(0) or "
        "F.batch_norm(...) called directly -> normalise per example (nn.LayerNorm, nn.GroupNorm, or statistics "
        "over the feature dimensions); nn.MultiheadAttention or nn.TransformerEncoderLayer left at "
        "batch_first=False but fed (batch, seq, feature) tensors, so attention runs across the batch -> pass "
        "batch_first=True; any other use of several rows of the batch in one computation -> compute it per "
        "example. Random numbers other than dropout drawn per batch row (noise injection) also look like "
        "mixing: draw them per example from a seeded generator, or train without them."
    )


def normalised_loss_problem(logits: torch.Tensor, grad: torch.Tensor) -> str | None:
    """A cross-entropy over class logits ``(B, C)`` whose per-example weights are normalised by the batch.

    For ``L = sum_i c_i CE(z_i, y_i)`` the output gradient is ``c_i (softmax(z_i) - onehot(y_i))``: every
    entry but the target's is ``c_i p_ik``, so ``c_i`` can be read off each row. A mean of per-example
    losses has ``c_i = 1/B``, a sum ``c_i = 1``, a weighted mean with weights of the example's own
    ``w_i c_i = w_i / B``. Class weights with ``reduction="mean"`` (``F.cross_entropy(weight=...)``) and an
    ``ignore_index`` mean over partly labelled batches divide by a sum over the batch instead: the
    ``c_i`` differ and add up to exactly 1. That is refused; rows that do not have the cross-entropy
    shape (label smoothing, other losses) are not judged.
    """
    if logits.dim() != 2 or logits.shape[0] < 2 or logits.shape[1] < 2 or not logits.is_floating_point():
        return None
    g = grad.detach().double()
    p = torch.softmax(logits.detach().double(), dim=1)
    target = g.argmin(dim=1, keepdim=True)  # (B, 1): the one negative entry of a cross-entropy row
    others = torch.ones_like(g, dtype=torch.bool).scatter_(1, target, False)
    ratio = torch.where(others, g / p, torch.zeros_like(g))  # (B, C): c_i off the target
    c = ratio.sum(1) / (g.shape[1] - 1)  # (B,)
    spread = (ratio - c[:, None]).abs().masked_fill(~others, 0).amax(1)
    target_ok = (g.gather(1, target)[:, 0] - c * (p.gather(1, target)[:, 0] - 1)).abs()
    scale = float(c.abs().max())
    if scale == 0 or float(spread.max()) > 1e-6 * scale or float(target_ok.max()) > 1e-6 * scale:
        return None  # not (weighted) cross-entropy rows: nothing to say
    varies = float(c.max() - c.min()) > 1e-6 * scale
    if varies and abs(float(c.sum()) - 1.0) < 1e-6:
        return (
            "The loss weights each example by a factor normalised over the batch (per-example factors that differ "
            "and add up to exactly 1): F.cross_entropy(..., weight=class_weights) or an ignore_index mean with "
            "reduction='mean' divide by the sum of the batch's weights, so every example's gradient depends on "
            "the other examples and the sensitivity epsilon assumes does not hold. In DP mode compute "
            "F.cross_entropy(logits, y, reduction='none') (times per-example weights, if any) and take .mean() "
            "over the batch, so the divisor is the batch size."
        )
    return None


def model_loss_problem(output) -> str | None:
    """A loss the model computed itself over the whole batch (HuggingFace ``labels=``), refused in DP mode."""
    loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
    if torch.is_tensor(loss) and loss.dim() == 0:
        return (
            "The model returned its own scalar loss (output.loss, e.g. HuggingFace model(..., labels=...)). "
            "It averages token losses over every counted token of the whole batch, so with padding or -100 "
            "labels each example's weight depends on the other examples, and the sensitivity epsilon assumes "
            "does not hold. In DP mode call the model without labels= and compute a mean of per-example losses: "
            "dp_microclip.losses.causal_lm_per_example_loss(output.logits, labels).mean() (or "
            "per_example_mean_loss for other heads)."
        )
    return None


# ================================================================ rows keep their place (b > 1)
def row_fingerprints(t: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """One number per row of ``t``: a weighted sum of up to 64 of its elements (float64, on the CPU).

    Equal for equal rows; a reordered batch gives the same numbers in another order. Cost: ``O(B)``.
    """
    rows = t.detach().movedim(batch_dim, 0).reshape(t.shape[batch_dim], -1)
    width = rows.shape[1]
    if width > _FINGERPRINT_ELEMENTS:
        rows = rows[:, ::-(-width // _FINGERPRINT_ELEMENTS)]  # at most 64 evenly strided elements
    rows = rows.to("cpu", torch.float64)
    return rows @ torch.arange(1, rows.shape[1] + 1, dtype=torch.float64).sqrt()


def batch_fingerprints(batch, batch_size: int) -> list[torch.Tensor]:
    """The row fingerprints of every tensor of a loader batch that has ``batch_size`` rows."""
    return [row_fingerprints(t) for t in output_tensors(batch)
            if t.dim() > 0 and t.shape[0] == batch_size and t.numel() and not t.is_complex()]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True))


def row_order_problem(expected: list[torch.Tensor], inputs, batch_dim: int, batch_size: int) -> str | None:
    """Whether a model input holds the loader's rows in another order (None: same order, or not comparable).

    A model input tensor that equals no loader tensor row for row is compared with each loader tensor whose
    rows it holds as a set; the same set in another order is a reordered batch. An input that equals a
    loader tensor in order is that tensor, whatever other loader tensor its rows also match as a set (small
    integer inputs and labels can hold the same values). An input transformed after the loader (normalised,
    embedded) matches no loader tensor and cannot be checked this way.
    """
    if batch_size < 2 or not expected:
        return None
    for t in output_tensors(inputs):
        if t.dim() <= batch_dim or t.shape[batch_dim] != batch_size or not t.numel() or t.is_complex():
            continue
        got = row_fingerprints(t, batch_dim)
        comparable = [want for want in expected if got.shape == want.shape]
        if any(_same(got, want) for want in comparable):
            continue  # the loader's rows, in the loader's order
        for want in comparable:
            if _same(torch.sort(got).values, torch.sort(want).values):
                return (
                    "The rows of the batch reached the model in another order than engine.data_loader yielded "
                    "them (e.g. sorted by length in the training loop for pack_padded_sequence). In DP mode with "
                    "micro_batch_size > 1 each record's micro-batch follows its row, so reordering makes it depend "
                    "on the other records. Feed the batch in the loader's order: sort inside the model and undo "
                    "the sort on its output, or use pack_padded_sequence(..., enforce_sorted=False), which sorts "
                    "internally."
                )
    return None
