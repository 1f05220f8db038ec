"""The statistics of a one-run privacy audit (Steinke, Nasr and Jagielski 2023). No torch needed.

An accountant gives an *upper* bound on epsilon. An audit gives a *lower*
bound: it attacks a real training run and turns the attack's success into a
statistically valid statement "this run is not (eps, delta)-DP for any eps
below eps_lb, with confidence 1 - beta". This module is that statement; the
training run with canaries that feeds it is :mod:`dp_microclip.tools.audit`.

The method (Steinke, Nasr and Jagielski, *Privacy auditing with one (1)
training run*, NeurIPS 2023, arXiv:2305.08846):

1. Make ``m`` canaries and include each in the training set independently
   with probability 1/2 (a fair coin per canary).
2. Train once, with DP, on the real data plus the included canaries.
3. Score every canary (higher = "looks included"), guess "in" for the
   ``k_pos`` highest scores, "out" for the ``k_neg`` lowest, abstain on the rest
   (:func:`make_guesses`, :func:`score_guesses`).
4. If training is (eps, delta)-DP, the number of correct guesses among the
   ``r = k_pos + k_neg`` guesses is (up to a delta term) no larger than a
   Binomial(r, e^eps / (1 + e^eps)) count. Each eps under which the observed
   count would be too unlikely (p-value <= beta) is rejected; the largest
   rejected eps is the lower bound (:func:`p_value`, :func:`epsilon_lower_bound`,
   :func:`audit_lower_bound`).

Bad arguments raise ``ValueError`` with the value found and the fix.
numpy and scipy are imported when this module is (``import accounting`` does
not import it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.special
import scipy.stats

__all__ = [
    "GuessOutcome",
    "audit_lower_bound",
    "epsilon_lower_bound",
    "make_guesses",
    "p_value",
    "score_guesses",
]


def p_value(epsilon: float, num_canaries: int, num_guesses: int, num_correct: int, delta: float) -> float:
    """Upper bound on P[at least ``num_correct`` of ``num_guesses`` guesses are right] under (eps, delta)-DP.

    This is Theorem 3 of Steinke, Nasr and Jagielski (2023). With ``m`` canaries
    each included by a fair coin, and guesses that are any function of the
    output of an (eps, delta)-DP algorithm, the count ``W`` of correct guesses
    among ``r`` satisfies, for ``W' ~ Binomial(r, p)`` with
    ``p = e^eps / (1 + e^eps)``:

        P[W >= v] <= P[W' >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= W' < v] / i.

    Why it is the right test: for delta = 0 each guess is at best as accurate
    as eps-DP randomized response, and accuracies do not compound favourably
    across canaries; the second term pays for the delta slack of each canary.

    Args:
        epsilon: the eps of the null hypothesis "the run is (eps, delta)-DP", >= 0.
        num_canaries: ``m``, the number of canaries (each included with probability 1/2).
        num_guesses: ``r``, guesses made (abstentions excluded), ``r <= m``.
        num_correct: ``v``, correct guesses, ``v <= r``.
        delta: the delta of the null hypothesis, in [0, 1).

    Returns:
        The p-value, in [0, 1]: small means the observed count is unlikely
        under (eps, delta)-DP.
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if epsilon < 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be a finite number >= 0. Found {epsilon!r}.")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1). Found {delta!r}.")
    v, r = num_correct, num_guesses
    if v == 0:
        return 1.0
    p = float(scipy.special.expit(epsilon))
    tail = float(scipy.stats.binom.sf(v - 1, r, p))  # P[W' >= v]
    if delta == 0.0:
        return min(1.0, tail)
    # P[v - i <= W' < v] = pmf(v-1) + ... + pmf(v-i): cumulative sums of the pmf below v, read downwards.
    below = scipy.stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)
    windows = np.cumsum(below)
    slack = float(np.max(windows / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * num_canaries * delta * slack)


def epsilon_lower_bound(num_canaries: int, num_guesses: int, num_correct: int, delta: float,
                        beta: float = 0.05) -> float:
    """The largest eps that the observed count of correct guesses rejects at confidence ``1 - beta``.

    Every eps with :func:`p_value` ``<= beta`` is rejected ("the run is not
    (eps, delta)-DP"), and rejecting eps also rules out every smaller eps, so
    the supremum of the rejected set is a lower bound on the run's true eps,
    wrong with probability at most ``beta``. The search brackets the boundary
    on a grid of 64 points and refines the last crossing by bisection to 1e-6,
    so a p-value that is not monotone in eps is handled up to the grid spacing.

    Args:
        num_canaries: ``m``.
        num_guesses: ``r`` (guesses made).
        num_correct: ``v`` (guesses that were right).
        delta: the delta at which eps is bounded (use the engine's delta).
        beta: the allowed probability that the bound is wrong, in (0, 1).

    Returns:
        The lower bound on eps (0.0 when nothing is rejected).
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), e.g. 0.05 for 95% confidence. Found {beta!r}.")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1). Found {delta!r}.")

    def rejected(eps: float) -> bool:
        return p_value(eps, num_canaries, num_guesses, num_correct, delta) <= beta

    if num_correct == 0 or not rejected(0.0):
        return 0.0
    hi = 1.0
    while rejected(hi):  # p -> 1 as eps -> inf (W' >= v surely), so this stops
        hi *= 2.0
        if hi > 1e4:
            return math.inf  # cannot happen for v <= r, kept as a guard against a silent loop
    grid = np.linspace(0.0, hi, 65)
    last = max(i for i, e in enumerate(grid) if rejected(float(e)))
    lo, hi = float(grid[last]), float(grid[last + 1])
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class GuessOutcome:
    """How the guesses of one audit fared.

    Attributes:
        num_canaries: ``m``.
        k_pos: canaries guessed "in" (the highest scores).
        k_neg: canaries guessed "out" (the lowest scores).
        num_correct: guesses that matched the inclusion coins.
        correct_pos: correct "in" guesses (precision of the "in" side is ``correct_pos / k_pos``).
        correct_neg: correct "out" guesses.
    """

    num_canaries: int
    k_pos: int
    k_neg: int
    num_correct: int
    correct_pos: int
    correct_neg: int

    @property
    def num_guesses(self) -> int:
        """``r = k_pos + k_neg``."""
        return self.k_pos + self.k_neg


def make_guesses(scores: Sequence[float], k_pos: int, k_neg: int) -> np.ndarray:
    """Guess +1 ("in") for the ``k_pos`` highest scores, -1 ("out") for the ``k_neg`` lowest, 0 otherwise.

    ``k_pos`` and ``k_neg`` must be fixed before looking at the scores: trying
    several and keeping the best would be multiple testing, and the bound
    would no longer hold at confidence ``1 - beta``. Ties are broken by index
    (a stable sort), which does not depend on the inclusion coins.

    Args:
        scores: one finite score per canary (higher = more likely included).
        k_pos: number of "in" guesses, >= 0.
        k_neg: number of "out" guesses, >= 0, with ``k_pos + k_neg <= len(scores)``.

    Returns:
        An int array of -1 / 0 / +1, one per canary.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    m = s.size
    for name, k in (("k_pos", k_pos), ("k_neg", k_neg)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"{name} must be an integer >= 0. Found {k!r}.")
    if k_pos + k_neg > m:
        raise ValueError(
            f"k_pos + k_neg = {k_pos + k_neg} guesses, but there are only {m} canaries. Guess fewer."
        )
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (no NaN or inf); check the scoring function.")
    order = np.argsort(-s, kind="stable")  # highest first
    guesses = np.zeros(m, dtype=np.int64)
    guesses[order[:k_pos]] = 1
    if k_neg:
        guesses[order[m - k_neg:]] = -1
    return guesses


def score_guesses(scores: Sequence[float], inclusion: Sequence[bool], k_pos: int, k_neg: int) -> GuessOutcome:
    """Make the guesses of :func:`make_guesses` and count how many match ``inclusion``.

    Args:
        scores: one score per canary.
        inclusion: the canaries' coins (True / 1 = included in training).
        k_pos: as in :func:`make_guesses`.
        k_neg: as in :func:`make_guesses`.

    Returns:
        The :class:`GuessOutcome`.
    """
    guesses = make_guesses(scores, k_pos, k_neg)
    inc = np.asarray(inclusion).reshape(-1)
    if inc.size != guesses.size:
        raise ValueError(
            f"scores has {guesses.size} entries but inclusion has {inc.size}: give one coin per canary."
        )
    if not np.all((inc == 0) | (inc == 1)):
        raise ValueError("inclusion must hold booleans or 0/1, one coin per canary.")
    inc = inc.astype(bool)
    correct_pos = int(np.sum((guesses == 1) & inc))
    correct_neg = int(np.sum((guesses == -1) & ~inc))
    return GuessOutcome(num_canaries=int(guesses.size), k_pos=int(k_pos), k_neg=int(k_neg),
                        num_correct=correct_pos + correct_neg, correct_pos=correct_pos, correct_neg=correct_neg)


def audit_lower_bound(scores: Sequence[float], inclusion: Sequence[bool], k_pos: int, k_neg: int,
                      delta: float, beta: float = 0.05) -> float:
    """Lower bound on epsilon from canary scores and their inclusion coins (one-run audit).

    Guesses "in" for the ``k_pos`` highest scores and "out" for the ``k_neg``
    lowest, counts the correct guesses, and returns
    :func:`epsilon_lower_bound` for that count. Valid only if each canary was
    included by an independent fair coin and ``k_pos``, ``k_neg`` were chosen
    before the scores were seen.

    Args:
        scores: one score per canary, higher = "looks included".
        inclusion: the coins (True = included).
        k_pos: number of "in" guesses.
        k_neg: number of "out" guesses.
        delta: the delta of the guarantee being audited.
        beta: probability that the bound is wrong (0.05: 95% confidence).

    Returns:
        eps_lb >= 0: the run is not (eps, delta)-DP for any eps < eps_lb, with
        confidence ``1 - beta``.

    Example:
        >>> import numpy as np
        >>> inc = np.arange(1000) % 2 == 0
        >>> round(audit_lower_bound(inc.astype(float), inc, 100, 100, delta=1e-5), 2)  # perfect guesses
        4.17
    """
    outcome = score_guesses(scores, inclusion, k_pos, k_neg)
    return epsilon_lower_bound(outcome.num_canaries, outcome.num_guesses, outcome.num_correct, delta, beta)


def _check_counts(m: int, r: int, v: int) -> None:
    for name, x in (("num_canaries", m), ("num_guesses", r), ("num_correct", v)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
            raise ValueError(f"{name} must be an integer >= 0. Found {x!r}.")
    if not v <= r <= m:
        raise ValueError(
            f"Need num_correct <= num_guesses <= num_canaries. Found {v} <= {r} <= {m}."
        )
