"""RDP backends: Opacus' ``RDPAccountant`` ("rdp") and dp_accounting's ``RdpAccountant`` ("rdp_google").

Renyi DP of the Poisson-subsampled Gaussian (Mironov, Talwar, Zhang 2019,
arXiv:1908.10530) composes by adding over steps at each order alpha, then
converts to (epsilon, delta) at the best order (Balle et al. 2020, Thm 21).
The result is an upper bound, typically 5-15% above the tight PRV/PLD number
(``accounting-reference.md``), and costs milliseconds, which is why
calibration uses it to bracket its search.

Both backends use the same grid of orders, wider than either library's
default, so that tiny epsilons (best order above 64) and large ones (best
order near 1) are not overstated. At fractional orders the two libraries
differ: Opacus sums the binomial series with its alternating signs (exact;
``tests/accounting/test_rdp_orders.py`` checks it against quadrature), while
dp_accounting 0.6 sums absolute values, a looser bound. So "rdp" can sit below
"rdp_google" when the best order is below 2 (epsilon above ~30); at integer
orders they agree to 1e-9.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar, Sequence

import numpy as np

from accounting.backends import Segment, begin, dp_accounting_event, import_dp_accounting, opacus_history
from accounting.errors import AccountantError, AccountingWarning

# dp_accounting's default grid (every 0.1 from 1.1 to 10.9, every integer to 63, then 128, 256, 512, 1024), so
# that no epsilon here is looser than dp_accounting's default, plus orders near 1 for large epsilons and steps of
# ~6% between 64 and 1024 for tiny ones. About 250 orders, tens of ms per history segment.
# tests/accounting/test_against_dp_accounting.py checks both properties on random settings.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    float(a)
    for a in np.unique(
        np.concatenate(
            [
                1 + np.geomspace(0.01, 0.1, 8)[:-1],
                np.arange(11, 110) / 10,
                np.arange(11, 65),
                np.round(np.geomspace(64, 1024, 48)),
                [128, 256, 512, 1024],
            ]
        ).round(6)
    )
)
# Integer orders only: Opacus and dp_accounting compute these exactly, by the same closed form.
INTEGER_ORDERS: tuple[float, ...] = tuple(float(a) for a in DEFAULT_ORDERS if float(a).is_integer())


def _import_opacus_accountants():
    try:
        # Importing any opacus submodule runs opacus/__init__.py, which imports torch: only here.
        from opacus import accountants
    except ImportError as err:
        raise ImportError(
            'accountant="rdp" and "prv" use Opacus, which is not installed. Run pip install opacus, '
            'or use accountant="pld" or "rdp_google" (pip install "dp-microclip[accounting]").'
        ) from err
    return accountants


@dataclasses.dataclass(frozen=True)
class RdpBackend:
    """Opacus' RDP accountant on :data:`DEFAULT_ORDERS`.

    Args:
        orders: Renyi orders (> 1) to optimise the conversion over.

    Example:
        >>> RdpBackend().epsilon([(1.1, 256 / 60000, 14062)], 1e-5)  # doctest: +ELLIPSIS
        2.59...
    """

    orders: tuple[float, ...] = DEFAULT_ORDERS
    name: str = dataclasses.field(default="rdp", init=False)
    adjacencies: ClassVar[tuple[str, ...]] = ("add_remove",)

    def epsilon(self, history: Sequence[Segment], delta: float, *, adjacency: str = "add_remove") -> float:
        """Epsilon at ``delta``: an upper bound, from Opacus' RDP analysis.

        Raises:
            PrivacyRefusal: adjacency="replace_one" (Opacus analyses add/remove only).
            AccountantError: Opacus failed even on integer orders.
        """
        history, trivial = begin(self, history, delta, adjacency)
        if trivial is not None:
            return trivial
        accountants = _import_opacus_accountants()
        acc = accountants.RDPAccountant()
        # Reuse Opacus by filling its history of (noise_multiplier, sample_rate, steps).
        acc.history = opacus_history(history)
        try:
            return _opacus_rdp_epsilon(acc, delta, self.orders)
        except (ValueError, OverflowError, FloatingPointError) as err:
            # The fractional-order series can fail numerically; integer orders use a closed form.
            warnings.warn(
                f"Opacus' RDP computation failed at fractional orders ({err}); reporting the RDP bound over "
                "integer orders only, which is valid but may be looser.",
                AccountingWarning,
                stacklevel=2,
            )
            try:
                return _opacus_rdp_epsilon(acc, delta, INTEGER_ORDERS)
            except (ValueError, OverflowError, FloatingPointError) as err2:
                raise AccountantError(
                    f"Opacus' RDP accountant failed for history {acc.history} ({err2}). "
                    'Try accountant="pld".'
                ) from err2


def _opacus_rdp_epsilon(acc, delta: float, orders: Sequence[float]) -> float:
    with warnings.catch_warnings():
        # Opacus warns when the best order is at the end of the grid; the bound is still valid,
        # and our grid already reaches orders where only astronomically large or tiny epsilons sit.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps = float(acc.get_epsilon(delta, alphas=list(orders)))
    if math.isnan(eps) or eps < 0:
        raise ValueError(f"epsilon {eps}")
    return eps


@dataclasses.dataclass(frozen=True)
class RdpGoogleBackend:
    """dp_accounting's RDP accountant on :data:`DEFAULT_ORDERS`.

    Args:
        orders: Renyi orders (> 1) to optimise the conversion over.
    """

    orders: tuple[float, ...] = DEFAULT_ORDERS
    name: str = dataclasses.field(default="rdp_google", init=False)
    adjacencies: ClassVar[tuple[str, ...]] = ("add_remove",)

    def epsilon(self, history: Sequence[Segment], delta: float, *, adjacency: str = "add_remove") -> float:
        """Epsilon at ``delta``: an upper bound, from dp_accounting's RDP analysis.

        Raises:
            PrivacyRefusal: adjacency="replace_one" (dp_accounting's RDP refuses
                Poisson sampling under REPLACE_ONE).
            ImportError: dp_accounting is not installed.
        """
        history, trivial = begin(self, history, delta, adjacency)
        if trivial is not None:
            return trivial
        dpa = import_dp_accounting()
        # Reuse dp_accounting: compose the history's DpEvent and ask for epsilon.
        acc = dpa.rdp.RdpAccountant(orders=list(self.orders))
        acc.compose(dp_accounting_event(history))
        return float(acc.get_epsilon(delta))
