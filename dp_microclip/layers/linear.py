"""nn.Linear, with any number of leading (sequence) dimensions.

Letters: B examples, T positions per example (all leading dims flattened),
d input features, p output features, M groups, N = rows per group x T.

For group j with input rows A_j (N, d) and output-gradient rows G_j (N, p):
  weight gradient  = G_j^T A_j                        (p, d)
  squared norm     = ||G_j^T A_j||^2 = <A_j A_j^T, G_j G_j^T>   (Gram form)
The Gram form costs ~N^2 (d + p) per group instead of N d p: cheaper when
N < d p / (d + p) (ghost clipping, Li et al. 2021; book-keeping, Bu et al. 2023,
here per micro-batch instead of per example).
"""

from __future__ import annotations

import torch
from torch import nn

from ..grouping import Groups
from .registry import GramDot, LayerRule, NormProduct, Unsquared, register_rule


def _as_rows(a: torch.Tensor, g: torch.Tensor):
    batch = a.shape[0]
    return a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])  # (B, T, d), (B, T, p)


def linear_group_grads(a, g, groups: Groups, with_bias: bool) -> dict:
    """Materialised group gradients ``{"weight": (M, p, d), "bias": (M, p)}`` with one batched matmul."""
    a3, g3 = _as_rows(a, g)
    pa = groups.pad(a3).flatten(1, 2)  # (M, N, d)
    pg = groups.pad(g3).flatten(1, 2)  # (M, N, p)
    out = {"weight": torch.bmm(pg.transpose(1, 2), pa)}  # (M, p, d)
    if with_bias:
        out["bias"] = groups.sum(_rows_per_example(g3))  # (M, p)
    return out


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    # One reduction kernel; the engine combines unsquared norms without squaring each one.
    return torch.linalg.vector_norm(x, dim=-1)


def _rows_per_example(x3: torch.Tensor) -> torch.Tensor:
    # (B, T, p) -> (B, p): a free view when T = 1 (an MLP), else a sum over positions.
    return x3[:, 0] if x3.shape[1] == 1 else x3.sum(1)


def linear_group_sq_norms(a, g, groups: Groups, with_bias: bool) -> dict:
    """Group-gradient norms ``(M,)`` from Gram matrices (ghost norms), no group gradient built.

    Squared from the Gram matrices as :class:`~dp_microclip.layers.registry.GramDot` (the bias's is the sum of
    the output gradients' Gram entries), or for one
    row per group unsquared: the weight's a :class:`~dp_microclip.layers.registry.NormProduct`
    (``||g a^T|| = ||a|| ||g||``), the bias's ``||g||``.
    """
    a3, g3 = _as_rows(a, g)
    if a3.shape[1] == 1 and groups.equal_size == 1:
        # One row per group: ||g a^T|| = ||a|| ||g||, and the bias norm is ||g||.
        g_norm = _row_norms(g3[:, 0])  # (B,)
        out: dict = {"weight": NormProduct(_row_norms(a3[:, 0]), g_norm)}
        if with_bias:
            out["bias"] = Unsquared(g_norm)
        return out
    pa = groups.pad(a3).flatten(1, 2)  # (M, N, d)
    pg = groups.pad(g3).flatten(1, 2)  # (M, N, p)
    gram_a = torch.bmm(pa, pa.transpose(1, 2))  # (M, N, N)
    gram_g = torch.bmm(pg, pg.transpose(1, 2))  # (M, N, N)
    # Left unformed: the engine multiplies every pair of a pass in one launch and sums them all in one.
    # (A batched dot, bmm of (M, 1, N^2) by (M, N^2, 1), would be one launch, but ran 5x slower on the CPU.)
    out = {"weight": GramDot(gram_a, gram_g)}  # sum of <A A^T, G G^T>  (M,)
    if with_bias:
        # ||sum of a group's rows of g||^2 = the sum of the entries of its Gram matrix  (M,)
        out["bias"] = GramDot(gram_g)
    return out


def _rows_of(x3: torch.Tensor, y3: torch.Tensor) -> tuple:
    """Both ``(B, T, .)`` tensors as ``(B*T, .)`` rows in one order, as free views where their memory allows:
    rows in T-major order when both are transposed views of ``(T, B, .)`` (attention inside torch's function),
    which ``flatten(0, 1)`` would copy. The order of the rows does not change a sum over them."""
    if x3.shape[1] > 1 and not (x3.is_contiguous() and y3.is_contiguous()) \
            and x3.transpose(0, 1).is_contiguous() and y3.transpose(0, 1).is_contiguous():
        return x3.transpose(0, 1).flatten(0, 1), y3.transpose(0, 1).flatten(0, 1)
    return x3.flatten(0, 1), y3.flatten(0, 1)


def linear_weighted_sum(a, g, row_weight: dict, with_bias: bool) -> dict:
    """The row-weighted weight and bias gradients: one matmul over all rows."""
    a3, g3 = _as_rows(a, g)
    out = {}
    if "weight" in row_weight:
        gw = g3 * row_weight["weight"].to(g3.dtype)[:, None, None]  # (B, T, p)
        g_rows, a_rows = _rows_of(gw, a3)
        out["weight"] = g_rows.t() @ a_rows  # (p, d)
    if with_bias and "bias" in row_weight:
        rows = row_weight["bias"].to(g3.dtype)
        if "weight" in row_weight and rows is row_weight["weight"].to(g3.dtype) and g3.shape[1] > 1:
            out["bias"] = gw.sum((0, 1))  # the same row weights: one reduction of the weighted rows  (p,)
            return out
        out["bias"] = torch.mv(g3.sum(1).t(), rows) if g3.shape[1] > 1 else torch.mv(g3[:, 0].t(), rows)  # (p,)
    return out


def _group_grads(layer: nn.Linear, inputs, out_grad, groups):
    return linear_group_grads(inputs[0], out_grad, groups, layer.bias is not None)


def _group_sq_norms(layer: nn.Linear, inputs, out_grad, groups):
    return linear_group_sq_norms(inputs[0], out_grad, groups, layer.bias is not None)


def _weighted_sum(layer: nn.Linear, inputs, out_grad, row_weight):
    return linear_weighted_sum(inputs[0], out_grad, row_weight, layer.bias is not None)


def _row_factors(layer: nn.Linear, inputs, out_grad):
    """Each example's weight gradient is ``g_i a_i^T`` and its bias gradient ``g_i``, for 2-D input and output
    gradient (one position per example); None otherwise (positions would sum several products)."""
    a = inputs[0]
    if a.dim() != 2 or out_grad.dim() != 2:
        return None
    return {"weight": (out_grad, a), "bias": (out_grad,)} if layer.bias is not None else {"weight": (out_grad, a)}


def _group_grad_elements(layer: nn.Linear, inputs, out_grad, groups) -> int:
    return groups.num_groups * layer.weight.numel()  # (M, p, d); the bias adds only M x p


register_rule(nn.Linear, LayerRule(_group_grads, _group_sq_norms, _weighted_sum, _group_grad_elements,
                                   row_factors=_row_factors))
