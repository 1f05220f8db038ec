"""Privacy accounting for micro-batch DP-SGD (no torch needed).

A :class:`Mechanism` describes one step; ``sensitivity.py`` turns it into the
noise multiplier the accountant sees (z / 2 for micro-batches of b > 1) or
refuses it; a :class:`Ledger` records the steps and computes epsilon with a
backend (Opacus' RDP and PRV accountants, Google's dp_accounting PLD and RDP);
``noise_multiplier_for_epsilon`` calibrates; ``privacy_statement`` explains.

Importing this package loads neither torch, Opacus nor dp_accounting: the
backends import them when they compute.

Example:
    >>> import accounting
    >>> ledger = accounting.Ledger()
    >>> ledger.record(accounting.Mechanism(sample_rate=256 / 60000, noise_multiplier=1.1), steps=14062)
    >>> round(ledger.epsilon(1e-5, accountant="rdp"), 3)
    2.597
"""

from accounting.backends import ACCOUNTANTS, Segment
from accounting.calibrate import noise_multiplier_for_epsilon
from accounting.errors import AccountantError, AccountingWarning, PrivacyRefusal
from accounting.ledger import Ledger, LedgerEntry
from accounting.mechanism import Mechanism
from accounting.sensitivity import Sensitivity, check_accountable, effective_noise_multiplier, sensitivity
from accounting.statement import privacy_statement

__all__ = [
    "ACCOUNTANTS",
    "AccountantError",
    "AccountingWarning",
    "Ledger",
    "LedgerEntry",
    "Mechanism",
    "PrivacyRefusal",
    "Segment",
    "Sensitivity",
    "check_accountable",
    "effective_noise_multiplier",
    "noise_multiplier_for_epsilon",
    "privacy_statement",
    "sensitivity",
]
