"""Small batches for the zoo: token ids with ragged lengths, images, waveforms, labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

VOCAB = 50
PAD = 0
CLASSES = 3


def lengths(B: int, T: int) -> torch.Tensor:
    """Ragged lengths: T, T-1, T-2, T, T-1, ... (all >= 2)."""
    return torch.tensor([max(2, T - (i % 3)) for i in range(B)])


def token_batch(B, T, dtype, g, *, pad=PAD, ragged=True):
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    n = lengths(B, T) if ragged else torch.full((B,), T)
    mask = (torch.arange(T)[None, :] < n[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    return ids, mask


def seq_cls_batch(B, T, dtype, g):
    ids, mask = token_batch(B, T, dtype, g)
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, CLASSES, (B,), generator=g)


def lm_batch(B, T, dtype, g):
    """Causal LM: labels are the ids with padding set to -100 (right padding)."""
    ids, mask = token_batch(B, T, dtype, g)
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def cross_entropy(logits, y):
    return F.cross_entropy(logits, y)
