"""Opacus' RDP of the subsampled Gaussian at fractional orders, against numerical integration.

The "rdp" backend relies on Opacus' series at fractional orders (our grid has
many). Here the Renyi divergence D_alpha((1-q) N(0, s^2) + q N(1, s^2) || N(0, s^2))
is integrated directly with scipy: an independent check of the number the
composition starts from.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats


def _renyi_by_quadrature(q: float, sigma: float, alpha: float) -> float:
    def integrand(x):
        # log of (1 - q) + q exp((2x - 1) / (2 sigma^2)), the likelihood ratio, without overflow
        log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * sigma**2))
        return math.exp(stats.norm.logpdf(x, 0, sigma) + alpha * log_ratio)

    # The integrand peaks between 0 and alpha with width ~sigma: integrate far past both ends.
    lo, hi = -40 * sigma, alpha + 40 * sigma
    value, _ = integrate.quad(integrand, lo, hi, points=[0.0, 0.5, alpha], limit=500, epsabs=0, epsrel=1e-12)
    return math.log(value) / (alpha - 1)


@pytest.mark.parametrize("q, sigma", [(0.01, 1.0), (0.05, 2.0), (0.004, 0.8), (0.1, 4.0)])
@pytest.mark.parametrize("alpha", [1.5, 2.5, 7.3, 10.9, 20.0])
def test_opacus_fractional_order_rdp_matches_quadrature(q, sigma, alpha):
    from opacus.accountants.analysis.rdp import compute_rdp

    ours = float(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[alpha])[0])
    want = _renyi_by_quadrature(q, sigma, alpha)
    assert ours == pytest.approx(want, rel=1e-6, abs=1e-12)
