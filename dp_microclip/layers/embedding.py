"""nn.Embedding.

The weight gradient of one group is a scatter of its output-gradient rows into
the rows of the table they looked up. Its squared norm needs only the rows the
group touched: rows are keyed by (group, index), summed per key with one
``index_add_``, squared and summed per group. Cost O(B T d), no (M, V, d) tensor.
Letters: B examples, T lookups per example, V table size, d embedding dim, M groups.

nn.EmbeddingBag reduces each bag of looked-up rows to one output row (``sum``
with optional per-sample weights ``w``, ``mean`` over the rows that are not
``padding_idx``, or ``max`` per coordinate). A bag's gradient ``g`` goes back to
the rows it looked up: row ``idx_j`` receives ``w_j g`` (sum), ``g / n`` (mean
over ``n`` rows), or, in max mode, coordinate ``c`` of the row that won it
(torch's own ``max_indices``) receives ``g_c``. So the bag is an embedding
lookup with scaled output-gradient rows, and the same keyed scatter gives its
group norms and gradients (max mode on the table seen as ``(V*d, 1)``).
Bags are the output's rows; ids are ``(bags, L)`` (each row a bag), or 1-D
with ``offsets`` (bag ``i`` is ``ids[offsets[i]:offsets[i+1]]``), the form of
torch's text-classification tutorial. Either way the ids carry their own row
map, so the 1-D form needs no batch dimension in the ids: the layout probe
checks the output's rows, one per example, by content.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModuleError

from ..grouping import Groups
from ..tensors import avoid_host_reads
from .registry import LayerRule, register_rule


def _rows(layer: nn.Embedding, idx: torch.Tensor, g: torch.Tensor):
    batch = idx.shape[0]
    idx2 = idx.reshape(batch, -1)  # (B, T)
    g3 = g.reshape(batch, -1, g.shape[-1])  # (B, T, d)
    if layer.padding_idx is not None:
        # torch never updates the padding row: its gradient is zero.
        g3 = g3 * (idx2 != layer.padding_idx).unsqueeze(-1).to(g3.dtype)
    return idx2, g3


def keyed_group_sq_norms(keys: torch.Tensor, values: torch.Tensor, num_groups: int, per_group: int) -> torch.Tensor:
    """``(M,)``: per group, the squared norm of ``values`` rows summed per key (``key = group * per_group + row``).

    ``torch.unique`` finds the distinct keys in the fewest kernels, but its output size is a value the host must
    read: on an accelerator that waits for every queued kernel, once per step. There the keys are sorted instead,
    a key's rows numbered by a running count of where the key changes, and summed into a buffer of one row per
    key at most (fixed sizes, no read; a row no key reached stays zero and adds nothing).
    """
    if not avoid_host_reads(keys.device):
        uniq, inverse = torch.unique(keys, return_inverse=True)
        summed = values.new_zeros((uniq.shape[0], values.shape[-1])).index_add_(0, inverse, values)
        return values.new_zeros(num_groups).index_add_(0, uniq // per_group, summed.pow(2).sum(-1))
    ordered, order = torch.sort(keys)
    starts = torch.cat([ordered.new_ones(1, dtype=torch.bool), ordered[1:] != ordered[:-1]])
    segment = torch.cumsum(starts, 0).sub_(1)  # the index of each sorted row's key among the distinct keys
    summed = values.new_zeros(values.shape).index_add_(0, segment, values[order])
    group = torch.zeros_like(segment).scatter_(0, segment, ordered // per_group)  # a key's rows share its group
    return values.new_zeros(num_groups).index_add_(0, group, summed.pow(2).sum(-1))


def embedding_group_sq_norms(layer: nn.Embedding, inputs, out_grad, groups: Groups) -> dict:
    """Squared norm of each group's embedding-table gradient, ``(M,)``, without an ``(M, V, d)`` tensor."""
    idx, g = _rows(layer, inputs[0], out_grad)
    vocab = layer.num_embeddings
    keys = torch.add(idx, groups.index.to(idx.device)[:, None], alpha=vocab).reshape(-1)  # group*V + index (B*T,)
    # a batched dot (bmm) of the rows would be fewer launches, but 3x slower on the CPU
    return {"weight": keyed_group_sq_norms(keys, g.reshape(-1, g.shape[-1]), groups.num_groups, vocab)}


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


# ------------------------------------------------------------------------------------------ EmbeddingBag
_MAX = 2  # torch.embedding_bag's mode code for "max"


def bag_inputs(layer: nn.EmbeddingBag, args: tuple, kwargs: dict) -> tuple:
    """An EmbeddingBag call as ``(ids (bags, L), coefficients (bags, L)[, winners (bags, d)])``, one bag per row.

    ``coefficients`` is what each looked-up row's gradient is scaled by: the per-sample weight (sum; 0 for
    ``padding_idx``), ``1 / n`` (mean over the ``n`` rows that are not ``padding_idx``), 1 (max; 0 for
    padding). 1-D ids with offsets are padded to the longest bag (padding repeats a real id of the bag, with
    coefficient 0; an empty bag's row is id 0), so every input holds one row per bag and the layout probe
    checks it by content. In max mode ``winners`` are torch's own ``max_indices``: the table row that gave
    each output coordinate.
    """
    names = ("input", "offsets", "per_sample_weights")
    given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    ids, offsets, weights = given["input"], given.get("offsets"), given.get("per_sample_weights")
    if ids.dim() == 2:
        flat, length = ids.reshape(-1), ids.shape[1]
        offsets = torch.arange(0, flat.shape[0], length, device=ids.device)
        include_last = False
    elif ids.dim() == 1 and offsets is not None:
        flat, include_last = ids, layer.include_last_offset
    else:
        raise UnsupportedModuleError(
            f"nn.EmbeddingBag was called with {ids.dim()}-D ids and {'no' if offsets is None else ''} offsets, "
            "which dp_microclip does not read. Pass (B, L) ids, or 1-D ids with offsets.")
    dtype = layer.weight.dtype
    starts = offsets[:-1] if include_last else offsets
    ends = torch.cat([starts[1:], starts.new_tensor([flat.shape[0]])]) if not include_last else offsets[1:]
    sizes = ends - starts  # (bags,)
    length = max(int(sizes.max()) if sizes.numel() else 0, 1)
    slot = torch.arange(length, device=flat.device)
    real = slot[None, :] < sizes[:, None]  # (bags, L)
    position = (starts[:, None] + slot[None, :].minimum((sizes[:, None] - 1).clamp(min=0))).clamp(max=max(
        flat.shape[0] - 1, 0))
    padded = flat[position] if flat.numel() else torch.zeros_like(real, dtype=flat.dtype)  # pads repeat a real id
    padded = padded.masked_fill(sizes[:, None] == 0, 0)  # an empty bag's row: 0, nothing of another bag
    coef = real.to(dtype)
    if layer.padding_idx is not None:
        coef = coef * (padded != layer.padding_idx).to(dtype)
    if layer.mode == "mean":
        coef = coef / coef.sum(1, keepdim=True).clamp(min=1)
    elif layer.mode == "sum" and weights is not None:
        coef = coef * weights.detach().reshape(-1).to(dtype)[position]
    if layer.mode != "max":
        return padded, coef
    with torch.no_grad():
        _, _, _, winners = torch.embedding_bag(layer.weight, flat, offsets, False, _MAX, False, None, include_last,
                                               layer.padding_idx)
    return padded, coef, winners


def _bag_rows(layer: nn.EmbeddingBag, inputs, out_grad: torch.Tensor):
    """``(example, key, values, rows)``: what each looked-up id adds to which row of the table, seen as
    ``(rows, values.shape[1])`` (in max mode ``(V*d, 1)``: one entry per id and coordinate)."""
    ids, coef = inputs[0], inputs[1]
    batch, d = out_grad.shape[0], out_grad.shape[-1]
    length = ids.shape[-1]
    g = out_grad.reshape(-1, d)  # (bags, d), batch-first: bag i belongs to example i // k
    bags = g.shape[0]
    per_example = bags // batch
    bag_example = torch.arange(bags, device=g.device) // per_example
    if layer.mode == "max":
        alive = (coef.reshape(bags, length).sum(1) > 0).to(g.dtype)[:, None]  # an empty bag gives no gradient
        key = (inputs[2].reshape(bags, d) * d + torch.arange(d, device=g.device)).reshape(-1)
        return bag_example.repeat_interleave(d), key, (g * alive).reshape(-1, 1), layer.num_embeddings * d
    values = coef.reshape(bags, length, 1).to(g.dtype) * g[:, None, :]  # (bags, L, d)
    return (bag_example.repeat_interleave(length), ids.reshape(-1), values.reshape(-1, d), layer.num_embeddings)


def bag_group_sq_norms(layer: nn.EmbeddingBag, inputs, out_grad, groups: Groups) -> dict:
    """``{"weight": (M,)}``: the rows each group touched, summed per (group, row) and squared."""
    example, key, values, rows = _bag_rows(layer, inputs, out_grad)
    keys = groups.index.to(key.device)[example] * rows + key
    return {"weight": keyed_group_sq_norms(keys, values, groups.num_groups, rows)}


def bag_group_grads(layer: nn.EmbeddingBag, inputs, out_grad, groups: Groups) -> dict:
    """Materialised group gradients of the table, ``{"weight": (M, V, d)}``."""
    example, key, values, rows = _bag_rows(layer, inputs, out_grad)
    keys = groups.index.to(key.device)[example] * rows + key
    out = values.new_zeros((groups.num_groups * rows, values.shape[1])).index_add_(0, keys, values)
    return {"weight": out.reshape(groups.num_groups, *layer.weight.shape)}


def bag_weighted_sum(layer: nn.EmbeddingBag, inputs, out_grad, row_weight) -> dict:
    """The row-weighted sum of per-example table gradients: one scatter-add."""
    example, key, values, rows = _bag_rows(layer, inputs, out_grad)
    scaled = values * row_weight["weight"].to(values.dtype)[example][:, None]
    table = torch.zeros((rows, values.shape[1]), dtype=layer.weight.dtype, device=values.device)
    return {"weight": table.index_add_(0, key, scaled).reshape(layer.weight.shape)}


register_rule(
    nn.EmbeddingBag,
    LayerRule(bag_group_grads, bag_group_sq_norms, bag_weighted_sum, embedding_group_grad_elements,
              present=bag_inputs),
)
register_rule(
    nn.Embedding,
    LayerRule(embedding_group_grads, embedding_group_sq_norms, embedding_weighted_sum, embedding_group_grad_elements),
)
