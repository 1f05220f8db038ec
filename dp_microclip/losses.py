"""Per-example losses for token-level models (HuggingFace outputs and the like).

Micro-batch clipping needs a loss that is the **mean of per-example losses**:
``loss = (1/B) sum_i l_i``, where ``l_i`` depends on example ``i`` only. Then the
gradient of micro-batch ``j`` is the mean of its examples' gradients, which is
what the engine clips.

HuggingFace's built-in loss (``model(..., labels=labels).loss``) is different:
it averages the token losses over **every non-ignored token of the batch**,

    loss_HF = sum_i sum_t l_{i,t} / sum_i n_i,

where ``n_i`` is the number of counted tokens of example ``i``. When the
examples have different lengths (padding, prompts masked with ``-100``), each
example's weight ``n_i / sum_k n_k`` depends on the lengths of the *other*
examples in the batch. This couples examples: a micro-batch's gradient is no
longer a function of its own examples, a long example counts more than a short
one, and in DP mode one example's presence changes every other example's
weight, so the sensitivity analysis behind epsilon does not hold. (With equal
lengths both losses agree.) Use the functions below and backprop their ``.mean()``:

    >>> import torch
    >>> from dp_microclip.losses import causal_lm_per_example_loss
    >>> logits = torch.randn(2, 5, 11)
    >>> labels = torch.tensor([[1, 2, 3, 4, 5], [6, 7, -100, -100, -100]])
    >>> per_example = causal_lm_per_example_loss(logits, labels)
    >>> per_example.shape
    torch.Size([2])
    >>> loss = per_example.mean()  # what to call .backward() on

An example with no counted token has loss 0 (it contributes nothing, but still
counts in the batch size B of the mean, as in any per-example mean).

Token losses are computed in at least float32 (as HuggingFace does), so bf16 /
fp16 logits under autocast do not lose precision in the log-softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from .tensors import LOW_PRECISION

__all__ = [
    "per_example_mean_loss", "causal_lm_per_example_loss", "per_example_mean",
    "sequence_classification_per_example_loss",
]


def per_example_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` mean of ``values`` over each example's ``mask``-ed entries (all dims but the first).

    Args:
        values: ``(B, ...)`` per-token values (e.g. token losses).
        mask: same shape (or broadcastable), true or 1 where a token counts.

    Returns:
        ``(B,)``; 0 for an example with no counted entry.
    """
    mask = mask.to(values.dtype).expand_as(values)
    total = (values * mask).flatten(1).sum(1)
    count = mask.flatten(1).sum(1)
    return total / count.clamp(min=1)


def per_example_mean_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy averaged over each example's own non-ignored tokens, no shift: ``(B,)``.

    For outputs whose positions are already aligned with the labels: encoder-decoder
    LMs (T5, BART, Whisper: HF shifts the *decoder inputs*, not the labels), token
    classification, masked LM.

    Args:
        logits: ``(B, T, ..., V)`` (e.g. ``outputs.logits``).
        labels: ``(B, T, ...)`` class indices; ``ignore_index`` marks tokens that do not count.
        ignore_index: the label of ignored tokens (HF uses -100).
        label_smoothing: as in ``F.cross_entropy``.

    Returns:
        ``(B,)`` per-example losses; backprop ``.mean()`` (or ``.sum()`` with
        ``attach(..., loss_reduction="sum")``).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match: logits must be "
            "labels' shape plus a class dimension."
        )
    if logits.dtype in LOW_PRECISION:
        logits = logits.float()
    valid = labels != ignore_index
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).masked_fill(~valid.reshape(-1), 0),
        reduction="none", label_smoothing=label_smoothing,
    ).reshape(labels.shape)
    return per_example_mean(token_loss, valid)


def causal_lm_per_example_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Next-token cross-entropy per example, shifted as HF causal LMs do: ``(B,)``.

    Position ``t`` predicts ``labels[:, t + 1]`` (``labels`` is usually ``input_ids``
    with padding and prompts set to ``ignore_index``). Each example's loss is the
    mean over its own counted tokens, so examples stay independent whatever the
    other examples' lengths (see the module docstring for why HF's batch-wide token
    mean is not a per-example mean). With every example counting the same number
    of tokens, ``.mean()`` equals HF's ``outputs.loss``.

    Args:
        logits: ``(B, T, V)`` from ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...
        labels: ``(B, T)``.
        ignore_index: label of tokens that do not count (HF: -100).
        label_smoothing: as in ``F.cross_entropy``.

    Returns:
        ``(B,)`` per-example losses; backprop ``.mean()``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}.")
    return per_example_mean_loss(
        logits[:, :-1], labels[:, 1:], ignore_index=ignore_index, label_smoothing=label_smoothing
    )


def sequence_classification_per_example_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, problem_type: str | None = None, label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Per-example loss of a sequence classifier, as HF's ``*ForSequenceClassification`` computes it: ``(B,)``.

    The problem type follows HF's rule when ``problem_type`` is None (``config.problem_type``):
    one output is regression (squared error), integer labels are single-label classification
    (cross-entropy), float labels over several outputs are multi-label (binary cross-entropy
    with logits, averaged over the labels). ``.mean()`` equals HF's ``outputs.loss`` (whose
    classification losses are already per-example means), except that an example labelled
    ``ignore_index`` has loss 0 here and still counts in the batch size.

    Args:
        logits: ``(B, num_labels)`` (``outputs.logits``).
        labels: ``(B,)`` class indices, ``(B,)`` / ``(B, 1)`` targets for regression, or ``(B, num_labels)``
            floats for multi-label.
        problem_type: ``"regression"``, ``"single_label_classification"``, ``"multi_label_classification"``
            or None (inferred as above).
        label_smoothing: single-label classification only, as in ``F.cross_entropy``.
        ignore_index: the label of an example that does not count (single-label classification).

    Returns:
        ``(B,)`` per-example losses; backprop ``.mean()``.
    """
    num_labels = logits.shape[-1]
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    logits = logits.float() if logits.dtype in LOW_PRECISION else logits
    if problem_type == "regression":
        return (logits.reshape(len(logits), -1) - labels.reshape(len(labels), -1).to(logits.dtype)).pow(2).mean(1)
    if problem_type == "single_label_classification":
        flat = labels.reshape(-1)
        valid = flat != ignore_index
        losses = F.cross_entropy(logits.reshape(-1, num_labels), flat.masked_fill(~valid, 0), reduction="none",
                                 label_smoothing=label_smoothing)
        return losses * valid.to(losses.dtype)
    if problem_type == "multi_label_classification":
        losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return losses.reshape(len(losses), -1).mean(1)
    raise ValueError(
        f"problem_type={problem_type!r} is not one of 'regression', 'single_label_classification', "
        "'multi_label_classification' (or None to infer it as HF does)."
    )
