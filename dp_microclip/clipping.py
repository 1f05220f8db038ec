"""Clip factors from per-group gradient norms. Pure functions: tensors in, tensors out.

For group gradients ``g_j`` (the mean gradient of micro-batch ``j``) with norms
``n_j``, each mode returns factors ``f_j`` such that the clipped group gradient
is ``f_j * g_j``:

* fixed:     ``f_j = min(1, C / (n_j + 1e-6))`` (Abadi et al. 2016, per micro-batch).
* normalize: ``f_j = C / (n_j + gamma)`` ("automatic clipping", Bu et al. 2023; every
  clipped unit has norm < C, so the sensitivity is C like fixed clipping).
* adaptive:  ``f_j = rho / n_j`` with ``rho = min_j n_j`` (Wang, "Revisit Micro-batch
  Clipping", Algorithm 1). The engine applies rho at the step, once every group of
  every accumulated pass is known, so :func:`unit_factors` returns ``1 / n_j`` here.
* per_layer: :func:`fixed_factors` applied per parameter with its own bound ``C_l``.
"""

from __future__ import annotations

import torch

#: Added to norms before dividing, as in Opacus and ``torch.nn.utils.clip_grad_norm_``.
NORM_EPS = 1e-6


def fixed_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, C / (n + 1e-6))`` per group. Shape ``(M,)`` in and out."""
    return (max_norm / (norms + NORM_EPS)).clamp(max=1.0)


def normalize_factors(norms: torch.Tensor, max_norm: float, gamma: float) -> torch.Tensor:
    """``C / (n + gamma)`` per group: every clipped unit has norm below ``C``."""
    return max_norm / (norms + gamma)


def unit_factors(norms: torch.Tensor) -> torch.Tensor:
    """``1 / n`` per group (0 for a zero-norm group): scales each group to unit norm.

    Used by adaptive clipping: the step multiplies the sum by ``rho = min_j n_j``.
    """
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, 1.0 / safe, torch.zeros_like(norms))
