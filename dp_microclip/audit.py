"""Empirical privacy audit from ONE training run (Steinke, Nasr and Jagielski 2023).

An accountant gives an *upper* bound on epsilon. An audit gives a *lower*
bound: it attacks a real training run and turns the attack's success into a
statistically valid statement "this run is not (eps, delta)-DP for any eps
below eps_lb, with confidence 1 - beta". If ``eps_lb`` ever exceeds the
engine's reported epsilon, the implementation (or its accounting) is wrong.
That is what this module is for: a regression test of the engine's privacy
claim that costs one small training run, not hundreds.

The method (Steinke, Nasr and Jagielski, *Privacy auditing with one (1)
training run*, NeurIPS 2023, arXiv:2305.08846):

1. Make ``m`` canaries and include each in the training set independently
   with probability 1/2 (a fair coin per canary).
2. Train once, with DP, on the real data plus the included canaries.
3. Score every canary (higher = "looks included"), guess "in" for the
   ``k_pos`` highest scores, "out" for the ``k_neg`` lowest, abstain on the rest.
4. If training is (eps, delta)-DP, the number of correct guesses among the
   ``r = k_pos + k_neg`` guesses is (up to a delta term) no larger than a
   Binomial(r, e^eps / (1 + e^eps)) count. Each eps under which the observed
   count would be too unlikely (p-value <= beta) is rejected; the largest
   rejected eps is the lower bound. See :func:`p_value`.

Two kinds of canaries are built in (:func:`run_audit`):

- ``"gradient"`` (white box, strongest): a linear model; canary ``i`` is a
  one-hot input on its own private input coordinate, so its gradient lives in
  its own column of the weight matrix, nowhere else, with norm well above C.
  The adversary sees every noisy gradient (``p.grad`` right after
  ``optimizer.step()``, which DP-SGD's accounting covers: it composes over the
  released steps) and scores each canary by the log-likelihood ratio of those
  gradients along the canary's direction (or their plain sum).
- ``"input"`` (black box): mislabeled inputs; only the final model is seen;
  the score is minus the final model's loss on the canary.

Limits (see docs/audit.md): the audit can only show that an epsilon is *too
small*; a bound below the claimed epsilon does not prove the claim. One-run
audits are known to be loose for moderate epsilon and delta > 0, and they
cannot exhibit the 2C sensitivity of micro-batches (b > 1) with many canaries
at once, because a canary's group-mates would have to cancel that particular
canary (Keinan, Shenfeld and Ligett 2025, arXiv:2503.07199, on interference).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np
import scipy.special
import scipy.stats

from .errors import ConfigurationError

CANARY_KINDS = ("gradient", "input")
SCORES = ("llr", "sum")

__all__ = [
    "AuditConfig",
    "AuditResult",
    "GuessOutcome",
    "audit_lower_bound",
    "epsilon_lower_bound",
    "main",
    "make_guesses",
    "p_value",
    "run_audit",
    "score_guesses",
]


# ======================================================================= statistics
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
        raise ConfigurationError(f"epsilon must be a finite number >= 0. Found {epsilon!r}.")
    if not 0 <= delta < 1:
        raise ConfigurationError(f"delta must be in [0, 1). Found {delta!r}.")
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
        raise ConfigurationError(f"beta must be in (0, 1), e.g. 0.05 for 95% confidence. Found {beta!r}.")
    if not 0 <= delta < 1:
        raise ConfigurationError(f"delta must be in [0, 1). Found {delta!r}.")

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
            raise ConfigurationError(f"{name} must be an integer >= 0. Found {k!r}.")
    if k_pos + k_neg > m:
        raise ConfigurationError(
            f"k_pos + k_neg = {k_pos + k_neg} guesses, but there are only {m} canaries. Guess fewer."
        )
    if not np.all(np.isfinite(s)):
        raise ConfigurationError("scores must be finite (no NaN or inf); check the scoring function.")
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
        raise ConfigurationError(
            f"scores has {guesses.size} entries but inclusion has {inc.size}: give one coin per canary."
        )
    if not np.all((inc == 0) | (inc == 1)):
        raise ConfigurationError("inclusion must hold booleans or 0/1, one coin per canary.")
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
            raise ConfigurationError(f"{name} must be an integer >= 0. Found {x!r}.")
    if not v <= r <= m:
        raise ConfigurationError(
            f"Need num_correct <= num_guesses <= num_canaries. Found {v} <= {r} <= {m}."
        )


# ======================================================================= the run
@dataclass(frozen=True)
class AuditConfig:
    """Everything one audit run does, fixed before it starts (so the guesses are honest).

    Attributes:
        canary: ``"gradient"`` (white box: one-hot canaries on private input
            coordinates of a linear model, scored from every noisy gradient) or
            ``"input"`` (black box: mislabeled inputs, scored by the final
            model's loss).
        num_canaries: ``m``; each is included with probability 1/2.
        num_fillers: ordinary training examples (a small synthetic task) that
            are always included; they are the canaries' group-mates at b > 1.
        micro_batch_size: ``b`` of :func:`dp_microclip.attach`.
        max_grad_norm: ``C``.
        noise_multiplier: the engine's ``z``; ``noise=False`` trains without noise
            (``engine.noise = False``: the engine then reports epsilon = inf).
        noise: add noise (True) or not.
        sample_rate: ``q`` (Poisson sampling by ``engine.data_loader``).
        steps: optimizer steps.
        delta: the delta of the claimed and the audited guarantee.
        beta: the audit is wrong with probability at most beta.
        k_pos: "in" guesses; ``None`` picks ``m // 10``.
        k_neg: "out" guesses; ``None`` picks 0 for ``"gradient"`` (precise guesses
            beat many guesses) and ``m // 10`` for ``"input"``.
        score: ``"llr"`` (white box: the Neyman-Pearson log-likelihood ratio of
            the subsampled Gaussian along the canary's direction) or ``"sum"``
            (the plain sum of those projections). The input kind always uses the loss.
        lr: SGD learning rate; ``None`` picks 0.02 for ``"gradient"`` (small, so a
            canary's gradient stays above C for the whole run: its private weights
            move only by its own updates and the noise) and 0.5 for ``"input"``.
        canary_scale: gradient canaries: input magnitude relative to C; the
            canary's gradient norm starts at about ``0.7 * canary_scale * C``.
        epochs: input canaries: set ``steps`` from epochs instead (ignored if None).
        accountant: the engine's accountant (``"prv"``, ``"rdp"``, ``"pld"``).
        seed: seeds the coins, the data and the engine (reproducible audits).
    """

    canary: str = "gradient"
    num_canaries: int = 1000
    num_fillers: int = 1000
    micro_batch_size: int = 1
    max_grad_norm: float = 1.0
    noise_multiplier: float = 1.0
    noise: bool = True
    sample_rate: float = 0.02
    steps: int = 200
    delta: float = 1e-5
    beta: float = 0.05
    k_pos: int | None = None
    k_neg: int | None = None
    score: str = "llr"
    lr: float | None = None
    canary_scale: float = 10.0
    accountant: str = "prv"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canary not in CANARY_KINDS:
            raise ConfigurationError(f"canary={self.canary!r} is not one of {CANARY_KINDS}.")
        if self.score not in SCORES:
            raise ConfigurationError(f"score={self.score!r} is not one of {SCORES}.")
        _positive_int("num_canaries", self.num_canaries, minimum=2)
        _positive_int("num_fillers", self.num_fillers, minimum=0)
        _positive_int("micro_batch_size", self.micro_batch_size)
        _positive_int("steps", self.steps)
        _positive_int("seed", self.seed, minimum=0)
        for name in ("max_grad_norm", "learning_rate", "canary_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ConfigurationError(f"{name} must be a finite number > 0. Found {value!r}.")
        if not (isinstance(self.noise_multiplier, (int, float)) and self.noise_multiplier > 0):
            raise ConfigurationError(
                f"noise_multiplier must be > 0 (use noise=False for a run without noise). Found "
                f"{self.noise_multiplier!r}."
            )
        if not 0 < self.sample_rate <= 1:
            raise ConfigurationError(f"sample_rate must be in (0, 1]. Found {self.sample_rate!r}.")
        if not 0 < self.delta < 1:
            raise ConfigurationError(f"delta must be in (0, 1). Found {self.delta!r}.")
        if not 0 < self.beta < 1:
            raise ConfigurationError(f"beta must be in (0, 1), e.g. 0.05. Found {self.beta!r}.")
        k_pos, k_neg = self.guesses
        if k_pos + k_neg > self.num_canaries or k_pos + k_neg == 0:
            raise ConfigurationError(
                f"k_pos + k_neg = {k_pos + k_neg} must be between 1 and num_canaries = {self.num_canaries}."
            )
        if self.num_fillers == 0 and self.canary == "input":
            raise ConfigurationError("canary='input' needs num_fillers > 0: the model must learn a real task.")

    @property
    def learning_rate(self) -> float:
        """``lr`` after its default (0.02 for gradient canaries, 0.5 for input canaries)."""
        if self.lr is not None:
            return self.lr
        return 0.02 if self.canary == "gradient" else 0.5

    @property
    def guesses(self) -> tuple[int, int]:
        """``(k_pos, k_neg)`` after defaults."""
        if self.canary == "gradient":
            default = (max(1, self.num_canaries // 10), 0)
        else:
            default = (max(1, self.num_canaries // 10), max(1, self.num_canaries // 10))
        k_pos = default[0] if self.k_pos is None else self.k_pos
        k_neg = default[1] if self.k_neg is None else self.k_neg
        _positive_int("k_pos", k_pos, minimum=0)
        _positive_int("k_neg", k_neg, minimum=0)
        return k_pos, k_neg


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigurationError(f"{name} must be an integer >= {minimum}. Found {value!r}.")


@dataclass(frozen=True)
class AuditResult:
    """The outcome of one audit run: the claim, the evidence against it, and the settings.

    Attributes:
        claimed_epsilon: ``engine.epsilon(delta)`` after training (inf without noise).
        epsilon_at_sensitivity_c: the epsilon of the same history if one example
            moved the noisy sum by C only (b = 1 accounting: the accountant sees
            ``z`` instead of ``z / 2``). Equal to ``claimed_epsilon`` at b = 1.
        lower_bound: the audit's eps_lb at ``delta``, confidence ``1 - beta``.
        num_canaries: ``m``.
        num_included: canaries whose coin said "in".
        k_pos: "in" guesses made.
        k_neg: "out" guesses made.
        num_correct: correct guesses.
        correct_pos: correct "in" guesses.
        correct_neg: correct "out" guesses.
        canary: the canary kind.
        score: the scoring rule used.
        micro_batch_size: the run's ``b``.
        max_grad_norm: the run's ``C``.
        noise_multiplier: the run's ``z``.
        noise: whether noise was on.
        sample_rate: the run's ``q``.
        steps: the run's steps.
        delta: the audited delta.
        beta: the audit's failure probability.
        accountant: the accountant of the claim.
        seed: the run's seed.
        dataset_size: records trained on (fillers + included canaries).
        seconds: wall time of the whole audit.
        noise_ratio: gradient canaries only (else None): the standard deviation of
            ``M * p.grad`` along the directions of the *excluded* canaries (which
            only noise reaches), divided by the promised ``z C``. About 1 when the
            engine adds the noise it accounts for; 0 with noise off.
    """

    claimed_epsilon: float
    epsilon_at_sensitivity_c: float
    lower_bound: float
    num_canaries: int
    num_included: int
    k_pos: int
    k_neg: int
    num_correct: int
    correct_pos: int
    correct_neg: int
    canary: str
    score: str
    micro_batch_size: int
    max_grad_norm: float
    noise_multiplier: float
    noise: bool
    sample_rate: float
    steps: int
    delta: float
    beta: float
    accountant: str
    seed: int
    dataset_size: int
    seconds: float
    noise_ratio: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready fields: numbers stay numbers, and inf or NaN (which JSON cannot hold) become None (null)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        """One line per fact, for the command line."""
        claimed = "inf (no noise)" if math.isinf(self.claimed_epsilon) else f"{self.claimed_epsilon:.4g}"
        lines = [
            f"one-run privacy audit ({self.canary} canaries, score {self.score})",
            f"  claimed epsilon:            {claimed} at delta = {self.delta:g} ({self.accountant})",
        ]
        if self.micro_batch_size > 1 and not math.isinf(self.epsilon_at_sensitivity_c):
            lines.append(f"  epsilon if sensitivity C:   {self.epsilon_at_sensitivity_c:.4g} (z instead of z/2)")
        if self.noise_ratio is not None:
            lines.append(f"  measured noise / (z C):     {self.noise_ratio:.3f} (excluded canaries' directions)")
        lines += [
            f"  audit lower bound:          {self.lower_bound:.4g} (confidence {1 - self.beta:g})",
            f"  guesses:                    {self.num_correct} correct of {self.k_pos} 'in' + {self.k_neg} 'out' "
            f"({self.correct_pos} + {self.correct_neg}); {self.num_included} of {self.num_canaries} canaries in",
            f"  run:                        b={self.micro_batch_size}, C={self.max_grad_norm:g}, "
            f"z={self.noise_multiplier:g}{'' if self.noise else ' (noise off)'}, q={self.sample_rate:g}, "
            f"steps={self.steps}, N={self.dataset_size}, {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


def run_audit(config: AuditConfig | None = None, **overrides) -> AuditResult:
    """Run one DP training with canaries, attack it, and return the lower bound next to the claim.

    Uses the public engine only: ``dp_microclip.attach(model, opt, micro_batch_size=b,
    max_grad_norm=C, noise_multiplier=z, sample_rate=q, delta=..., seed=...)``,
    batches from ``engine.data_loader(dataset)`` (Poisson sampling), and
    ``engine.epsilon(delta)`` for the claim. Runs on CPU with one thread's worth
    of work (small models); a few seconds for the defaults.

    Args:
        config: the :class:`AuditConfig` (default settings if None).
        **overrides: fields of :class:`AuditConfig` to change, e.g.
            ``run_audit(micro_batch_size=4, noise_multiplier=2.0)``.

    Returns:
        The :class:`AuditResult`.

    Raises:
        ConfigurationError: an invalid setting (the message names it).
    """
    config = replace(config or AuditConfig(), **overrides) if overrides else (config or AuditConfig())
    start = time.perf_counter()
    if config.canary == "gradient":
        scores, inclusion, engine, n, noise_ratio = _gradient_run(config)
    else:
        scores, inclusion, engine, n = _input_run(config)
        noise_ratio = None
    k_pos, k_neg = config.guesses
    outcome = score_guesses(scores, inclusion, k_pos, k_neg)
    bound = epsilon_lower_bound(outcome.num_canaries, outcome.num_guesses, outcome.num_correct,
                                config.delta, config.beta)
    claimed = float(engine.epsilon(config.delta))
    return AuditResult(
        claimed_epsilon=claimed,
        epsilon_at_sensitivity_c=_epsilon_at_sensitivity_c(config),
        lower_bound=bound, num_canaries=config.num_canaries, num_included=int(np.sum(inclusion)),
        k_pos=k_pos, k_neg=k_neg, num_correct=outcome.num_correct, correct_pos=outcome.correct_pos,
        correct_neg=outcome.correct_neg, canary=config.canary,
        score=("loss" if config.canary == "input" else ("sum" if not config.noise else config.score)),
        micro_batch_size=config.micro_batch_size, max_grad_norm=float(config.max_grad_norm),
        noise_multiplier=float(config.noise_multiplier), noise=config.noise, sample_rate=config.sample_rate,
        steps=config.steps, delta=config.delta, beta=config.beta, accountant=config.accountant, seed=config.seed,
        dataset_size=n, seconds=time.perf_counter() - start, noise_ratio=noise_ratio,
    )


def _epsilon_at_sensitivity_c(config: AuditConfig) -> float:
    """Epsilon of the same (q, z, steps) history accounted as b = 1 (sensitivity C, accountant sees z)."""
    if not config.noise:
        return math.inf
    from accounting import Ledger, Mechanism

    ledger = Ledger()
    ledger.record(Mechanism(sample_rate=config.sample_rate, noise_multiplier=config.noise_multiplier,
                            micro_batch_size=1), steps=config.steps)
    return float(ledger.epsilon(config.delta, accountant=config.accountant))


def _coins(config: AuditConfig):
    import torch

    gen = torch.Generator().manual_seed(config.seed * 7919 + 17)
    inclusion = torch.rand(config.num_canaries, generator=gen, dtype=torch.float64) < 0.5
    return inclusion.numpy(), gen


def _attach(config: AuditConfig, model, optimizer):
    from .configure import attach

    engine = attach(model, optimizer, micro_batch_size=config.micro_batch_size, max_grad_norm=config.max_grad_norm,
                    noise_multiplier=config.noise_multiplier, sample_rate=config.sample_rate, delta=config.delta,
                    accountant=config.accountant, seed=config.seed)
    if not config.noise:
        engine.noise = False
    return engine


def _train(config: AuditConfig, engine, model, optimizer, dataset, after_step=None) -> None:
    """``steps`` DP-SGD steps on Poisson batches from ``engine.data_loader``; empty batches still step."""
    import torch.nn.functional as F

    step = 0
    while step < config.steps:
        for x, y in engine.data_loader(dataset):
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            if len(x) == 0:
                (out.sum() * 0.0).backward()  # an empty batch: noise-only step, as the engine requires
            else:
                F.cross_entropy(out, y).backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            step += 1
            if step == config.steps:
                return


def _filler_task(config: AuditConfig, gen, dim: int, classes: int):
    """A small linearly separable Gaussian task: the 'real' data around the canaries."""
    import torch

    n = config.num_fillers
    x = torch.randn(n, dim, generator=gen)
    w = torch.randn(dim, classes, generator=gen)
    y = (x @ w).argmax(dim=1)
    return x, y


def _gradient_run(config: AuditConfig):
    """White-box gradient canaries on ``nn.Linear(d0 + m, 2, bias=False)``.

    Canary ``i`` is ``s * e_{d0+i}`` with label 0 (``s = canary_scale * C``), so
    its loss gradient is ``s * p_1 * (-1, +1)`` in column ``d0 + i`` and zero
    elsewhere: a fixed unit direction ``u_i`` that no other record touches. After
    each ``optimizer.step()`` the adversary reads ``p.grad`` (the engine's
    ``(clipped sum + noise) / M``) and projects ``M * p.grad`` on every ``u_i``:
    ``x_t,i ~ N(0, (zC)^2)`` plus ``C`` (about) when canary ``i`` was sampled.
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from .grouping import public_groups

    torch.manual_seed(config.seed)
    inclusion, gen = _coins(config)
    m, d0, c = config.num_canaries, 16, config.max_grad_norm
    fx, fy = _filler_task(config, gen, d0, 2)
    included = np.flatnonzero(inclusion)
    cx = torch.zeros(len(included), d0 + m)
    cx[torch.arange(len(included)), d0 + torch.as_tensor(included, dtype=torch.long)] = config.canary_scale * c
    x = torch.cat([torch.cat([fx, torch.zeros(len(fx), m)], dim=1), cx])
    y = torch.cat([fy, torch.zeros(len(included), dtype=torch.long)])
    dataset = TensorDataset(x, y)
    n = len(dataset)

    model = nn.Linear(d0 + m, 2, bias=False)
    with torch.no_grad():
        model.weight[:, d0:] = 0.0  # canary columns start at p = (1/2, 1/2): gradient norm 0.71 * s
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    engine = _attach(config, model, optimizer)
    groups = public_groups(config.sample_rate * n, config.micro_batch_size)  # the public M the engine divides by
    u = torch.tensor([-1.0, 1.0]) / math.sqrt(2.0)
    projections = torch.zeros(config.steps, m, dtype=torch.float64)

    def record(step: int) -> None:
        if model.weight.grad is None:  # noise off and an empty batch: the engine leaves no gradient (all zero)
            return
        g = model.weight.grad[:, d0:]  # (2, m): canary columns of the noisy clipped average
        projections[step] = (u @ g).double() * groups

    _train(config, engine, model, optimizer, dataset, after_step=record)
    sigma = config.noise_multiplier * c
    excluded = torch.as_tensor(~inclusion)
    noise_ratio = float(projections[:, excluded].std()) / sigma if excluded.any() else math.nan
    if config.noise and config.score == "llr":
        # log[(1 - q) + q exp((C x - C^2 / 2) / sigma^2)]: the likelihood ratio of "sampled with probability q,
        # shifted by C" against "not there", summed over steps (Neyman-Pearson for independent steps).
        a = (c * projections - 0.5 * c * c) / sigma**2
        q = config.sample_rate
        llr = torch.logaddexp(torch.full_like(a, math.log1p(-q)) if q < 1 else torch.full_like(a, -math.inf),
                              a + math.log(q))
        scores = llr.sum(dim=0)
    else:
        scores = projections.sum(dim=0)
    return scores.numpy(), inclusion, engine, n, noise_ratio


def _input_run(config: AuditConfig):
    """Black-box input canaries: a small MLP on a Gaussian task; canaries are random inputs with random labels.

    Only the final model is used: score = minus the cross-entropy of the final
    model on the canary with its (wrong) label, so memorised canaries score high.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset

    torch.manual_seed(config.seed)
    inclusion, gen = _coins(config)
    dim, classes, m = 32, 10, config.num_canaries
    fx, fy = _filler_task(config, gen, dim, classes)
    canary_x = torch.randn(m, dim, generator=gen) * 2.0  # off the data's scale: easier to memorise
    canary_y = torch.randint(0, classes, (m,), generator=gen)
    included = torch.as_tensor(np.flatnonzero(inclusion), dtype=torch.long)
    dataset = TensorDataset(torch.cat([fx, canary_x[included]]), torch.cat([fy, canary_y[included]]))
    model = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate)
    engine = _attach(config, model, optimizer)
    _train(config, engine, model, optimizer, dataset)
    with torch.no_grad():
        scores = -F.cross_entropy(model(canary_x), canary_y, reduction="none")
    return scores.double().numpy(), inclusion, engine, len(dataset)


# ======================================================================= command line
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2 (raised to main)
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dp-microclip audit",
        description="Empirical lower bound on epsilon from one DP training run with canaries (Steinke, Nasr "
                    "and Jagielski 2023), printed next to the engine's claimed epsilon. A lower bound above "
                    "the claim means a privacy bug.",
        epilog="example:\n  dp-microclip audit --canary gradient --canaries 1000 --micro-batch-size 4 "
               "--noise-multiplier 2 --sample-rate 0.02 --steps 300 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = AuditConfig()
    parser.add_argument("--canary", choices=CANARY_KINDS, default=d.canary,
                        help="gradient: white box, every noisy gradient seen (default); input: black box, final model")
    parser.add_argument("--canaries", type=int, default=d.num_canaries, help="m, number of canaries (default %(default)s)")
    parser.add_argument("--fillers", type=int, default=d.num_fillers,
                        help="ordinary examples always in the data (default %(default)s)")
    parser.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="b (default %(default)s)")
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="C (default %(default)s)")
    parser.add_argument("--noise-multiplier", type=float, default=d.noise_multiplier,
                        help="engine z (default %(default)s)")
    parser.add_argument("--no-noise", action="store_true", help="train with engine.noise = False (epsilon = inf)")
    parser.add_argument("--sample-rate", type=float, default=d.sample_rate, help="q (default %(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    parser.add_argument("--delta", type=float, default=d.delta, help="delta (default %(default)s)")
    parser.add_argument("--beta", type=float, default=d.beta,
                        help="probability that the bound is wrong (default %(default)s: 95%% confidence)")
    parser.add_argument("--k-pos", type=int, default=None, help="'in' guesses (default: m/10 gradient, m/10 input)")
    parser.add_argument("--k-neg", type=int, default=None, help="'out' guesses (default: 0 gradient, m/10 input)")
    parser.add_argument("--score", choices=SCORES, default=d.score,
                        help="gradient canaries: llr (default) or sum of projections")
    parser.add_argument("--lr", type=float, default=None,
                        help="SGD learning rate (default 0.02 gradient, 0.5 input)")
    parser.add_argument("--accountant", default=d.accountant, help="prv (default), rdp or pld")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of coins, data and engine (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def config_from_args(args: argparse.Namespace) -> AuditConfig:
    """Turn parsed ``dp-microclip audit`` arguments into an :class:`AuditConfig` (validated)."""
    return AuditConfig(
        canary=args.canary, num_canaries=args.canaries, num_fillers=args.fillers,
        micro_batch_size=args.micro_batch_size, max_grad_norm=args.max_grad_norm,
        noise_multiplier=args.noise_multiplier, noise=not args.no_noise, sample_rate=args.sample_rate,
        steps=args.steps, delta=args.delta, beta=args.beta, k_pos=args.k_pos, k_neg=args.k_neg,
        score=args.score, lr=args.lr, accountant=args.accountant, seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``dp-microclip audit``: run :func:`run_audit` from the command line.

    Prints a short summary (or, with ``--json``, one JSON object) and returns
    0; on bad input prints one line ``dp-microclip audit: error: ...`` to
    standard error and returns 2, like the ``epsilon`` and ``noise`` commands.

    Args:
        argv: the arguments after ``audit`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
        config = config_from_args(args)
        result = run_audit(config)
    except _UsageError as err:
        print(f"dp-microclip audit: error: {err} (see dp-microclip audit --help)", file=sys.stderr)
        return 2
    except (ConfigurationError, ValueError) as err:
        print(f"dp-microclip audit: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
