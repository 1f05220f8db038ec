"""Command line: ``dp-microclip epsilon ...`` and ``dp-microclip noise ...``.

``epsilon`` prints the epsilon of a planned or finished run and its privacy
statement; ``noise`` prints the engine noise multiplier that reaches a target
epsilon. Both take the run as q (``--sample-rate``, or ``--batch-size`` with
``--dataset-size`` for q = B / N) and a number of steps (``--steps``, or
``--epochs``: ceil(epochs / q) steps, rounded up so as not to understate
epsilon). The CLI cannot see how batches are drawn, so the statement says the
guarantee assumes Poisson sampling at that rate.

Example:
    python -m accounting.cli epsilon --batch-size 256 --dataset-size 60000 \\
        --noise-multiplier 1.1 --epochs 60 --delta 1e-5 --micro-batch-size 8
"""

from __future__ import annotations

import argparse
import math
import sys

from accounting.backends import ACCOUNTANTS
from accounting.calibrate import noise_multiplier_for_epsilon
from accounting.errors import AccountantError, PrivacyRefusal
from accounting.ledger import Ledger
from accounting.mechanism import ADJACENCIES, Mechanism
from accounting.sensitivity import effective_noise_multiplier
from accounting.statement import privacy_statement


class _UsageError(ValueError):
    pass


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-rate", type=float, help="Poisson sampling rate q per step")
    parser.add_argument("--batch-size", type=int, help="expected batch size B (with --dataset-size: q = B / N)")
    parser.add_argument("--dataset-size", type=int, help="number of examples N")
    parser.add_argument("--steps", type=int, help="number of steps")
    parser.add_argument("--epochs", type=float, help="number of epochs (steps = ceil(epochs / q))")
    parser.add_argument("--delta", type=float, required=True, help="target delta, below 1 / dataset size (e.g. 1e-5)")
    parser.add_argument("--micro-batch-size", type=int, default=1,
                        help="examples per clipping unit b (b > 1: sensitivity 2C, the accountant sees z/2)")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="prv", help="backend (default: prv)")
    parser.add_argument("--adjacency", choices=ADJACENCIES, default="add_remove",
                        help="neighbouring datasets (replace_one needs --accountant pld)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dp-microclip", description="Privacy accounting for micro-batch DP-SGD.")
    sub = parser.add_subparsers(dest="command", required=True)
    eps = sub.add_parser("epsilon", help="epsilon of a run, with its privacy statement")
    _add_run_arguments(eps)
    eps.add_argument("--noise-multiplier", type=float, required=True, help="the engine's noise multiplier z")
    noise = sub.add_parser("noise", help="engine noise multiplier for a target epsilon")
    _add_run_arguments(noise)
    noise.add_argument("--target-epsilon", type=float, required=True, help="epsilon to reach at --delta")
    return parser


def _sample_rate(args: argparse.Namespace) -> float:
    if args.sample_rate is not None:
        if args.batch_size is not None:
            raise _UsageError("Give either --sample-rate or --batch-size with --dataset-size, not both.")
        return args.sample_rate
    if args.batch_size is None or args.dataset_size is None:
        raise _UsageError("Give --sample-rate, or --batch-size with --dataset-size (q = batch size / dataset size).")
    if args.dataset_size < 1 or not 0 < args.batch_size <= args.dataset_size:
        raise _UsageError(
            f"--batch-size must be in [1, --dataset-size]. Found --batch-size {args.batch_size}, "
            f"--dataset-size {args.dataset_size}."
        )
    return args.batch_size / args.dataset_size


def _steps(args: argparse.Namespace, q: float) -> int:
    if (args.steps is None) == (args.epochs is None):
        raise _UsageError("Give exactly one of --steps or --epochs.")
    if args.steps is not None:
        return args.steps
    if not args.epochs > 0:
        raise _UsageError(f"--epochs must be > 0. Found {args.epochs}.")
    return max(1, math.ceil(args.epochs / q - 1e-9))


def _run(args: argparse.Namespace) -> str:
    q = _sample_rate(args)
    steps = _steps(args, q)
    if args.command == "epsilon":
        mech = Mechanism(sample_rate=q, noise_multiplier=args.noise_multiplier,
                         micro_batch_size=args.micro_batch_size, adjacency=args.adjacency)
        ledger = Ledger()
        ledger.record(mech, steps)
        eps = ledger.epsilon(args.delta, args.accountant)
        statement = privacy_statement(ledger, args.delta, accountant=args.accountant,
                                      sampling_declared_by_user=True, dataset_size=args.dataset_size)
        return f"epsilon = {eps:.6g} at delta = {args.delta:g} ({steps} steps, accountant {args.accountant})\n\n" + statement
    z = noise_multiplier_for_epsilon(
        args.target_epsilon, args.delta, sample_rate=q, steps=steps, micro_batch_size=args.micro_batch_size,
        adjacency=args.adjacency, accountant=args.accountant,
    )
    mech = Mechanism(sample_rate=q, noise_multiplier=z, micro_batch_size=args.micro_batch_size,
                     adjacency=args.adjacency)
    ledger = Ledger()
    ledger.record(mech, steps)
    eps = ledger.epsilon(args.delta, args.accountant)
    return (
        f"noise_multiplier = {z:.6g}\n"
        f"(engine z for micro_batch_size={args.micro_batch_size}; the accountant sees "
        f"{effective_noise_multiplier(mech):.6g}; epsilon = {eps:.6g} at delta = {args.delta:g} after {steps} steps, "
        f"q = {q:.6g}, accountant {args.accountant})"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the ``epsilon`` or ``noise`` command; returns the exit status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success; 2 on a usage error or a refusal (the message goes to stderr).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        print(_run(args))
    except (_UsageError, PrivacyRefusal, AccountantError, ValueError, ImportError) as err:
        print(f"dp-microclip {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
