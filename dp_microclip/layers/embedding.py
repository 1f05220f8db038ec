"""nn.Embedding.

The weight gradient of one group is a scatter of its output-gradient rows into
the rows of the table they looked up. Its squared norm needs only the rows the
group touched: rows are keyed by (group, index), summed per key with one
``index_add_``, squared and summed per group. Cost O(B T d), no (M, V, d) tensor.
Letters: B examples, T lookups per example, V table size, d embedding dim, M groups.
"""

from __future__ import annotations

import torch
from torch import nn

from ..grouping import Groups
from .registry import LayerRule, register_rule


def _rows(layer: nn.Embedding, idx: torch.Tensor, g: torch.Tensor):
    batch = idx.shape[0]
    idx2 = idx.reshape(batch, -1)  # (B, T)
    g3 = g.reshape(batch, -1, g.shape[-1])  # (B, T, d)
    if layer.padding_idx is not None:
        # torch never updates the padding row: its gradient is zero.
        g3 = g3 * (idx2 != layer.padding_idx).unsqueeze(-1).to(g3.dtype)
    return idx2, g3


def embedding_group_sq_norms(layer: nn.Embedding, inputs, out_grad, groups: Groups) -> dict:
    """Squared norm of each group's embedding-table gradient, ``(M,)``, without an ``(M, V, d)`` tensor."""
    idx, g = _rows(layer, inputs[0], out_grad)
    vocab = layer.num_embeddings
    keys = (groups.index.to(idx.device)[:, None] * vocab + idx).reshape(-1)  # (B*T,)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    summed = g.new_zeros((uniq.shape[0], g.shape[-1])).index_add_(0, inverse, g.reshape(-1, g.shape[-1]))
    sq = summed.pow(2).sum(-1)  # (U,)
    return {"weight": g.new_zeros(groups.num_groups).index_add_(0, uniq // vocab, sq)}


def embedding_group_grads(layer: nn.Embedding, inputs, out_grad, groups: Groups) -> dict:
    """Materialised group gradients of the table, ``{"weight": (M, V, d)}``."""
    idx, g = _rows(layer, inputs[0], out_grad)
    vocab = layer.num_embeddings
    keys = (groups.index.to(idx.device)[:, None] * vocab + idx).reshape(-1)
    out = g.new_zeros((groups.num_groups * vocab, g.shape[-1])).index_add_(0, keys, g.reshape(-1, g.shape[-1]))
    return {"weight": out.reshape(groups.num_groups, vocab, g.shape[-1])}  # (M, V, d)


def embedding_weighted_sum(layer: nn.Embedding, inputs, out_grad, row_weight) -> dict:
    """The row-weighted sum of per-example table gradients: one scatter-add."""
    idx, g = _rows(layer, inputs[0], out_grad)
    gw = (g * row_weight["weight"].to(g.dtype)[:, None, None]).reshape(-1, g.shape[-1])
    table = torch.zeros(layer.weight.shape, dtype=layer.weight.dtype, device=g.device)  # (V, d); plain under FSDP2
    return {"weight": table.index_add_(0, idx.reshape(-1), gw)}


def embedding_group_grad_elements(layer: nn.Embedding, inputs, out_grad, groups: Groups) -> int:
    """Elements ``embedding_group_grads`` would allocate (``M V d``), for the memory budget."""
    return groups.num_groups * layer.weight.numel()  # a zero (M, V, d) table to fill


register_rule(
    nn.Embedding,
    LayerRule(embedding_group_grads, embedding_group_sq_norms, embedding_weighted_sum, embedding_group_grad_elements),
)
