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

:func:`group_factors` is the one dispatch from a mode's name to its factors of the
whole group gradient (the engine's aggregation and the diagnostics both use it).
"""

from __future__ import annotations

import torch

from .errors import ConfigurationError

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


def group_weights(mode: str, norms: torch.Tensor, max_norm: float, gamma: float,
                  scale: "float | torch.Tensor", norm_scale: float = 1.0) -> torch.Tensor:
    """``group_factors(mode, norms, ...) * scale`` in as few kernels as possible (the engine's hot path).

    Fixed clipping as ``scale C / fmax(C, n + 1e-6)`` (equal to ``min(1, C / (n + 1e-6)) * scale``): three
    kernels instead of six. On a GPU each launch counts (``benchmarks/launches.py``). ``norm_scale``: the
    norms are ``norm_scale * norms`` (fixed and normalize take the product in their one ``add``). A NaN norm gets the
    finite weight ``scale`` here (``fmax`` ignores NaN), an inf norm 0: the caller zeroes such a group's rows.
    """
    if mode in ("fixed", "normalize"):
        # A CPU scalar numerator (no kernel; a 0-d CPU tensor may divide a tensor on any device): one division.
        top = scale * max_norm if torch.is_tensor(scale) else torch.tensor(scale * max_norm, dtype=norms.dtype)
        shift = torch.tensor(gamma if mode == "normalize" else NORM_EPS, dtype=norms.dtype)  # CPU scalars
        shifted = torch.add(shift, norms, alpha=norm_scale)  # shift + norm_scale * n: one kernel
        if mode == "normalize":
            return torch.div(top, shifted)
        return torch.div(top, torch.fmax(shifted, torch.tensor(max_norm, dtype=norms.dtype)))
    return group_factors(mode, norms * norm_scale if norm_scale != 1.0 else norms, max_norm, gamma) * scale


#: The modes whose factors scale each group's whole gradient (per_layer clips each parameter instead).
WHOLE_GRADIENT_MODES = ("fixed", "normalize", "adaptive")


def group_factors(mode: str, norms: torch.Tensor, max_norm: float, gamma: float) -> torch.Tensor:
    """The factors of ``mode`` for group norms ``norms``: fixed, normalize, or adaptive's ``1 / n``.

    Adaptive returns :func:`unit_factors`; the caller multiplies by ``rho = min_j n_j`` once it
    knows every group of the step. ``per_layer`` is not a whole-gradient mode: apply
    :func:`fixed_factors` per parameter with its own bound.

    Raises:
        ConfigurationError: ``mode`` is not one of :data:`WHOLE_GRADIENT_MODES`.
    """
    if mode == "fixed":
        return fixed_factors(norms, max_norm)
    if mode == "normalize":
        return normalize_factors(norms, max_norm, gamma)
    if mode == "adaptive":
        return unit_factors(norms)
    raise ConfigurationError(
        f"clipping={mode!r} has no whole-gradient clip factors: use 'fixed', 'adaptive' or 'normalize' "
        "('per_layer' clips each parameter with fixed_factors)."
    )
