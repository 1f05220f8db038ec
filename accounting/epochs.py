"""How many steps an epoch is: one definition for the loader, the calibration and the command line.

An epoch of Poisson sampling at rate ``q`` is ``round(1 / q)`` steps, so that each
record is seen once per epoch on average; ``engine.data_loader`` yields exactly
that many batches per epoch. A plan of ``E`` epochs is ``ceil(E * round(1 / q))``
steps (a fractional epoch rounds up, so a plan never understates its length).
"""

from __future__ import annotations

import math


def steps_per_epoch(sample_rate: float) -> int:
    """Steps in one epoch at sample rate ``q``: ``round(1 / q)``, at least 1."""
    return max(1, round(1.0 / sample_rate))


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Steps in ``epochs`` epochs: ``ceil(epochs * steps_per_epoch(q))``, at least 1.

    Example:
        >>> steps_for_epochs(60, 256 / 60000)   # 60 epochs of 234 steps
        14040
    """
    return max(1, math.ceil(epochs * steps_per_epoch(sample_rate) - 1e-9))
