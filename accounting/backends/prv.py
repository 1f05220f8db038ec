"""PRV backend ("prv", the default): Opacus' ``PRVAccountant``.

Numerical composition of privacy loss random variables (Gopi, Lee, Wutschitz
2021, arXiv:2106.02848): each step's privacy loss distribution is discretised
on a grid and composed by FFT; the result is an upper bound within an error
``eps_error`` of the exact epsilon. It agrees with dp_accounting's PLD within
0.5% (``accounting-reference.md``).

Two things this wrapper adds to Opacus, both so that no wrong or absurd
result is returned silently:

* Opacus' error target ``eps_error`` is absolute (0.01 by default), which is
  10% of an epsilon of 0.1. Here it is relative: ``relative_error`` times a
  cheap RDP upper bound, capped at 0.01.
* Opacus sizes its grid from the history; for small noise or huge epsilons it
  asks for billions of points and exhausts memory (24 GB at q = 0.1, z = 0.25,
  20000 steps) or raises OverflowError. The grid size is computed first, by
  Opacus itself, and above ``max_grid_points`` (or on any failure) the backend
  falls back to the RDP bound with an ``AccountingWarning`` that says so, or
  raises ``AccountantError`` with ``fallback="error"``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar, Sequence

from accounting.backends import Segment, begin, opacus_history
from accounting.backends.rdp import INTEGER_ORDERS, RdpBackend, _import_opacus_accountants
from accounting.errors import AccountantError, AccountingWarning

FALLBACKS = ("rdp", "error")


@dataclasses.dataclass(frozen=True)
class PrvBackend:
    """Opacus' PRV accountant, with a relative error target and a memory guard.

    Args:
        relative_error: target error of epsilon relative to its RDP bound
            (Opacus' absolute ``eps_error`` is set to this times the bound,
            capped at 0.01). Smaller is tighter and slower.
        max_grid_points: largest PRV grid to build; about 200 bytes and 1 us
            per point. Above it the backend does not run Opacus' PRV.
        fallback: "rdp" (report the RDP upper bound with an
            ``AccountingWarning``) or "error" (raise ``AccountantError``) when
            the PRV cannot be computed.

    Example:
        >>> PrvBackend().epsilon([(1.1, 256 / 60000, 14062)], 1e-5)  # doctest: +ELLIPSIS
        2.3...
    """

    relative_error: float = 0.002
    max_grid_points: int = 5_000_000
    fallback: str = "rdp"
    name: str = dataclasses.field(default="prv", init=False)
    adjacencies: ClassVar[tuple[str, ...]] = ("add_remove",)

    def __post_init__(self) -> None:
        if not 0 < self.relative_error <= 0.1:
            raise ValueError(f"relative_error must be in (0, 0.1]. Found {self.relative_error!r}.")
        if self.max_grid_points < 1000:
            raise ValueError(f"max_grid_points must be >= 1000. Found {self.max_grid_points!r}.")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}. Found {self.fallback!r}.")

    def epsilon(self, history: Sequence[Segment], delta: float, *, adjacency: str = "add_remove") -> float:
        """Epsilon at ``delta``: Opacus' PRV upper bound.

        Raises:
            PrivacyRefusal: adjacency="replace_one" (Opacus analyses add/remove only).
            AccountantError: the PRV cannot be computed and ``fallback="error"``.
        """
        history, trivial = begin(self, history, delta, adjacency)
        if trivial is not None:
            return trivial
        # The error target only needs the bound's scale: integer orders give it by a closed form (tens of ms),
        # where the full grid's fractional orders cost about a second at large sampling rates. The full,
        # tighter bound is computed only when it is reported (a fallback).
        rough_bound = RdpBackend(orders=INTEGER_ORDERS).epsilon(history, delta)
        if math.isinf(rough_bound) and math.isinf(RdpBackend().epsilon(history, delta)):
            return math.inf
        accountants = _import_opacus_accountants()
        eps_error = min(0.01, max(self.relative_error * rough_bound, 1e-6))
        delta_error = delta / 1000  # Opacus' default
        acc = accountants.PRVAccountant()
        # Reuse Opacus by filling its history of (noise_multiplier, sample_rate, steps).
        acc.history = opacus_history(history)
        try:
            with warnings.catch_warnings():
                # Opacus sizes the grid from an RDP bound and warns when its best order is at the end of its
                # default grid; that only makes the grid larger, never the epsilon wrong.
                warnings.filterwarnings("ignore", message="Optimal order is the")
                eps = self._opacus_prv(acc, eps_error, delta_error, delta)
        except (ArithmeticError, ValueError, MemoryError, RuntimeError) as err:
            return self._fall_back(f"failed ({type(err).__name__}: {err})", history, delta)
        if eps is None:
            return self._fall_back(
                f"would need a grid of more than max_grid_points={self.max_grid_points:.3g} points", history, delta
            )
        if math.isnan(eps) or eps < 0:
            return self._fall_back(f"returned {eps}", history, delta)
        return eps

    def _opacus_prv(self, acc, eps_error: float, delta_error: float, delta: float) -> float | None:
        """Opacus' PRV epsilon for ``acc.history``, or None when its grid would exceed ``max_grid_points``.

        The grid (Opacus' own sizing rule, a private method) is asked for first, so that an oversized one is
        never built, and then used directly: ``PRVAccountant.get_epsilon`` would size it a second time, and
        sizing costs an RDP computation at fractional orders (about a second at large sampling rates).
        """
        from opacus.accountants.analysis.prv import (
            PoissonSubsampledGaussianPRV,
            TruncatedPrivacyRandomVariable,
            compose_heterogeneous,
            discretize,
        )

        losses = [PoissonSubsampledGaussianPRV(q, z) for z, q, _ in acc.history]
        compositions = [n for _, _, n in acc.history]
        domain = acc._get_domain(
            prvs=losses, num_self_compositions=compositions, eps_error=eps_error, delta_error=delta_error
        )
        if domain.size > self.max_grid_points:
            return None
        on_grid = [discretize(TruncatedPrivacyRandomVariable(loss, domain.t_min, domain.t_max), domain)
                   for loss in losses]
        composed = compose_heterogeneous(dprvs=on_grid, num_self_compositions=compositions)
        _, _, eps_upper = composed.compute_epsilon(delta, delta_error, eps_error)  # the bound, not the estimate
        return float(eps_upper)

    def _fall_back(self, reason: str, history: Sequence[Segment], delta: float) -> float:
        message = f"Opacus' PRV accountant {reason} for this history"
        if self.fallback == "error":
            raise AccountantError(
                f"{message}. Use accountant=\"pld\" (dp_accounting), or PrvBackend(fallback=\"rdp\") to accept "
                "the RDP upper bound."
            )
        rdp_bound = RdpBackend().epsilon(history, delta)
        warnings.warn(
            f"{message}; reporting the RDP upper bound {rdp_bound:.6g} instead (valid, typically 5-15% above the "
            'tight number). For a tight number use accountant="pld", or PrvBackend(max_grid_points=...).',
            AccountingWarning,
            stacklevel=3,
        )
        return rdp_bound
