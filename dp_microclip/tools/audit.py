"""Empirical privacy audit from ONE training run (Steinke, Nasr and Jagielski 2023): the run.

An accountant gives an *upper* bound on epsilon. An audit gives a *lower*
bound: it attacks a real training run and turns the attack's success into a
statistically valid statement "this run is not (eps, delta)-DP for any eps
below eps_lb, with confidence 1 - beta". If ``eps_lb`` ever exceeds the
engine's reported epsilon, the implementation (or its accounting) is wrong.
That is what this module is for: a regression test of the engine's privacy
claim that costs one small training run, not hundreds.

This module trains with canaries and scores them (:func:`run_audit`, and
``dp-microclip audit``: :func:`main`); the statistics that turn scores into
the bound (the method's four steps, :func:`~accounting.audit.p_value`,
:func:`~accounting.audit.audit_lower_bound`) are in the torch-free
:mod:`accounting.audit`.

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

from accounting.audit import epsilon_lower_bound, score_guesses
from accounting.errors import OneLineParser, UsageError

from ..errors import ConfigurationError
from ..settings import check_int
from .audit_canaries import gradient_canary_run, input_canary_run

CANARY_KINDS = ("gradient", "input")
SCORES = ("llr", "sum")

__all__ = ["AuditConfig", "AuditResult", "config_from_args", "main", "run_audit"]


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
        check_int("num_canaries", self.num_canaries, minimum=2)
        check_int("num_fillers", self.num_fillers, minimum=0)
        check_int("micro_batch_size", self.micro_batch_size)
        check_int("steps", self.steps)
        check_int("seed", self.seed, minimum=0)
        for name in ("max_grad_norm", "learning_rate", "canary_scale"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                    or not math.isfinite(value)):
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
        check_int("k_pos", k_pos, minimum=0)
        check_int("k_neg", k_neg, minimum=0)
        return k_pos, k_neg


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
        scores, inclusion, engine, n, noise_ratio = gradient_canary_run(config)
    else:
        scores, inclusion, engine, n, noise_ratio = input_canary_run(config)
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


# ======================================================================= command line
def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    parser.add_argument("--canaries", type=int, default=d.num_canaries, help="m, number of canaries (default "
                                                                             "%(default)s)")
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
    except UsageError as err:
        print(f"dp-microclip audit: error: {err} (see dp-microclip audit --help)", file=sys.stderr)
        return 2
    except (ConfigurationError, ValueError) as err:
        print(f"dp-microclip audit: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict()) if args.json else result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
