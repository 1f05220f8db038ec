"""Rules for parameters used through recognised functions, whatever class holds them (the usage route).

A module without a rule often uses its own parameters only through a few
functions: a linear map (``F.linear``, ``x @ W.T``, ``torch.matmul(x, W)``,
``addmm``; ``W @ x`` is the linear map of ``x``'s columns, ``F.linear(x.mT, W)``,
its output gradient read transposed), a convolution (``F.conv1d/2d/3d``: the
convolution rule's group gradients), an embedding lookup (``F.embedding``,
``W[ids]``), or a broadcast element-wise op with the batched activation (a
scale ``gamma * x``, a shift ``x + b``, both at once in ``addcmul``, a
positional table added, a class token concatenated to the sequence).
``layers/usage_mode.py`` watches those calls during the module's forward;
each recognised call becomes one record whose ``layer`` is one of the
NamedTuples below, and whose rule is one of the rules here, built on the
existing maths (``linear.py``, ``conv.py``, ``embedding.py``).

A parameter may reach the call through shape-only transforms first (``.T``,
``transpose``, ``reshape``, ``unsqueeze``, basic slicing, a dtype cast, a
multiplication by a number): its ``Chain``. The rules compute each group's
gradient with respect to the tensor the call saw, then carry it back to the
parameter with the chain's vector-Jacobian product (``torch.func.vjp``, vmapped
over groups; the chain is linear, so this is exact). When every step of the
chain keeps norms (a permutation, a reshape, a selection of distinct entries),
ghost norms computed for the transformed tensor are the parameter's own, and
the Linear and Embedding rules keep their ghost routes.

Broadcast uses (letters: B examples, S the per-example output shape, P the
parameter's shape right-aligned to the output): the output is ``y = x (op) p``
with ``p`` broadcast along the batch, so example i's gradient of ``p`` is
``sum over broadcast dims of G_i * c_i``, with ``c`` the other operand for a
product and 1 for a sum or a concatenation (``G`` restricted to the
parameter's slice of the output). Group gradients are these per-example sums
summed per group; they have the parameter's size, so they are materialised.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch.func import vjp, vmap

from ..grouping import Groups
from .conv import conv_group_grads
from .embedding import embedding_group_grad_elements, embedding_group_grads, embedding_group_sq_norms
from .embedding import embedding_weighted_sum
from .linear import linear_group_grads, linear_group_sq_norms, linear_weighted_sum
from .registry import LayerRule


class Step(NamedTuple):
    """One transform on the way from a parameter to the tensor a recognised call saw."""

    func: Callable
    args: tuple  # the call's positional arguments; the transformed tensor goes at ``pos``
    kwargs: dict
    pos: int
    cast: bool = False  # a dtype cast: the identity for gradients (skipped when pulling back)


class Chain(NamedTuple):
    """A parameter, the transforms applied to it, and whether they keep norms (then ghost norms carry over)."""

    name: str  # the parameter's local name in its module
    param: torch.Tensor
    steps: tuple = ()
    isometric: bool = True

    def then(self, step: Step, isometric: bool) -> "Chain":
        """This chain followed by one more transform."""
        return Chain(self.name, self.param, self.steps + (step,), self.isometric and isometric)


def replay(chain: Chain, value: torch.Tensor) -> torch.Tensor:
    """The chain's transforms applied to ``value`` (casts skipped: gradients stay in ``value``'s dtype)."""
    for step in chain.steps:
        if step.cast:
            continue
        args = list(step.args)
        args[step.pos] = value
        value = step.func(*args, **step.kwargs)
    return value


def pull_back(chain: Chain, grads: torch.Tensor, batched: bool) -> torch.Tensor:
    """Gradients with respect to the transformed tensor (``(M, *shape)`` if ``batched``) carried to the parameter."""
    if not chain.steps:
        return grads.reshape(grads.shape[:1] + chain.param.shape) if batched else grads.reshape(chain.param.shape)
    point = chain.param.detach().to(grads.dtype)
    pullback = vjp(lambda v: replay(chain, v), point)[1]
    if batched:
        return vmap(pullback)(grads)[0]
    return pullback(grads)[0]


# ------------------------------------------------------------------------------------------ linear
class LinearUse(NamedTuple):
    """``y = x W^T + b`` with ``W`` (and/or ``b``) reached from the module's parameters through chains."""

    weight: Chain | None
    bias: Chain | None


def _linear_names(use: LinearUse) -> dict[str, Chain]:
    return {key: chain for key, chain in (("weight", use.weight), ("bias", use.bias)) if chain is not None}


def _linear_group_grads(use: LinearUse, inputs, out_grad, groups: Groups) -> dict:
    grads = linear_group_grads(inputs[0], out_grad, groups, use.bias is not None)
    return {chain.name: pull_back(chain, grads[key], True) for key, chain in _linear_names(use).items()}


def _linear_group_sq_norms(use: LinearUse, inputs, out_grad, groups: Groups) -> dict:
    norms = linear_group_sq_norms(inputs[0], out_grad, groups, use.bias is not None)
    return {chain.name: norms[key] for key, chain in _linear_names(use).items()}


def _linear_weighted_sum(use: LinearUse, inputs, out_grad, row_weight: dict) -> dict:
    names = _linear_names(use)
    weights = {key: row_weight[chain.name] for key, chain in names.items()}
    ones = torch.ones(out_grad.shape[0], dtype=out_grad.dtype, device=out_grad.device)
    weights.setdefault("weight", ones)  # the product is computed either way; only tracked names are returned
    sums = linear_weighted_sum(inputs[0], out_grad, weights, use.bias is not None)
    return {chain.name: pull_back(chain, sums[key], False) for key, chain in names.items()}


def _linear_elements(use: LinearUse, inputs, out_grad, groups: Groups) -> int:
    return groups.num_groups * sum(chain.param.numel() for chain in _linear_names(use).values())


# --------------------------------------------------------------------------------------- embedding
class EmbeddingUse(NamedTuple):
    """A lookup of rows of ``table`` (the transformed parameter's value, detached) by integer ids."""

    chain: Chain
    weight: torch.Tensor  # (V, d): only its shape and dtype are read
    padding_idx: int | None

    @property
    def num_embeddings(self) -> int:
        """V, as ``nn.Embedding`` names it (the embedding rule reads it)."""
        return int(self.weight.shape[0])


def _as_layer(use: EmbeddingUse) -> Any:
    """The use, where the Embedding rule's functions expect an ``nn.Embedding`` (they read the same fields)."""
    return use


def _embedding_group_grads(use: EmbeddingUse, inputs, out_grad, groups: Groups) -> dict:
    grads = embedding_group_grads(_as_layer(use), inputs, out_grad, groups)["weight"]
    return {use.chain.name: pull_back(use.chain, grads, True)}


def _embedding_group_sq_norms(use: EmbeddingUse, inputs, out_grad, groups: Groups) -> dict:
    return {use.chain.name: embedding_group_sq_norms(_as_layer(use), inputs, out_grad, groups)["weight"]}


def _embedding_weighted_sum(use: EmbeddingUse, inputs, out_grad, row_weight: dict) -> dict:
    sums = embedding_weighted_sum(_as_layer(use), inputs, out_grad, {"weight": row_weight[use.chain.name]})["weight"]
    return {use.chain.name: pull_back(use.chain, sums.to(out_grad.dtype), False)}


def _embedding_elements(use: EmbeddingUse, inputs, out_grad, groups: Groups) -> int:
    return embedding_group_grad_elements(_as_layer(use), inputs, out_grad, groups)


# ------------------------------------------------------------------------------------- convolution
class ConvUse(NamedTuple):
    """``F.conv1d/2d/3d(x, W, b, stride, padding, dilation, groups)`` with ``W`` (and/or ``b``) reached from the
    module's parameters through chains; the other fields are what the convolution rule reads of a layer."""

    weight_chain: Chain | None
    bias_chain: Chain | None
    weight: torch.Tensor  # (O, C/groups, *K), detached: only its shape is read
    bias: torch.Tensor | None
    stride: tuple
    padding: tuple | str
    dilation: tuple
    groups: int
    padding_mode: str = "zeros"

    @property
    def kernel_size(self) -> tuple:
        """``K``, as ``nn.Conv2d`` names it."""
        return tuple(self.weight.shape[2:])


def _conv_names(use: ConvUse) -> dict[str, Chain]:
    return {key: chain for key, chain in (("weight", use.weight_chain), ("bias", use.bias_chain)) if chain is not None}


def _conv_group_grads(use: ConvUse, inputs, out_grad, groups: Groups) -> dict:
    grads = conv_group_grads(use, inputs, out_grad, groups)
    return {chain.name: pull_back(chain, grads[key], True) for key, chain in _conv_names(use).items()}


def _conv_elements(use: ConvUse, inputs, out_grad, groups: Groups) -> int:
    return groups.num_groups * sum(chain.param.numel() for chain in _conv_names(use).values())


# --------------------------------------------------------------------------------------- broadcast
class BroadcastUse(NamedTuple):
    """A transformed parameter broadcast along the batch into an element-wise op or a concatenation.

    ``aligned`` is the transformed tensor's shape right-aligned to the (batch-first) output and with a
    size-1 batch dimension first; ``sign`` is -1 for the subtracted operand.
    """

    chain: Chain
    shape: tuple  # the transformed tensor's own shape
    aligned: tuple  # (1, *S'): its broadcast shape against the batch-first output
    sign: float = 1.0


def per_example(use: BroadcastUse, inputs, out_grad) -> torch.Tensor:
    """``(B, *shape)``: each example's gradient of the transformed tensor (the module docstring's sum)."""
    contrib = out_grad * inputs[0] if inputs else out_grad  # (B, *S)
    dims = [d for d in range(1, contrib.dim()) if use.aligned[d] == 1 and contrib.shape[d] != 1]
    if dims:
        contrib = contrib.sum(dims, keepdim=True)
    contrib = contrib.reshape(contrib.shape[0], *use.shape)
    return contrib if use.sign == 1.0 else contrib * use.sign


def _broadcast_group_grads(use: BroadcastUse, inputs, out_grad, groups: Groups) -> dict:
    rows = per_example(use, inputs, out_grad)
    summed = groups.sum(rows.reshape(rows.shape[0], -1)).reshape(groups.num_groups, *use.shape)  # (M, *shape)
    return {use.chain.name: pull_back(use.chain, summed, True)}


def _broadcast_elements(use: BroadcastUse, inputs, out_grad, groups: Groups) -> int:
    return groups.num_groups * use.chain.param.numel()


LINEAR_USE = LayerRule(_linear_group_grads, _linear_group_sq_norms, _linear_weighted_sum, _linear_elements)
EMBEDDING_USE = LayerRule(_embedding_group_grads, _embedding_group_sq_norms, _embedding_weighted_sum,
                          _embedding_elements)
#: Where a chain does not keep norms, ghost norms of the transformed tensor are not the parameter's:
#: group gradients only (materialised, then pulled back).
LINEAR_USE_MATERIALISED = LayerRule(_linear_group_grads, group_grad_elements=_linear_elements)
EMBEDDING_USE_MATERIALISED = LayerRule(_embedding_group_grads, group_grad_elements=_embedding_elements)
BROADCAST_USE = LayerRule(_broadcast_group_grads, group_grad_elements=_broadcast_elements)
CONV_USE = LayerRule(_conv_group_grads, group_grad_elements=_conv_elements)  # materialised, as conv.py's rule


def rule_of(use: Any) -> LayerRule:
    """The rule that serves one recognised use (ghost routes only where every chain keeps norms)."""
    if isinstance(use, LinearUse):
        isometric = all(c.isometric for c in _linear_names(use).values())
        return LINEAR_USE if isometric else LINEAR_USE_MATERIALISED
    if isinstance(use, EmbeddingUse):
        return EMBEDDING_USE if use.chain.isometric else EMBEDDING_USE_MATERIALISED
    if isinstance(use, ConvUse):
        return CONV_USE
    return BROADCAST_USE
