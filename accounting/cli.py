"""Command line: ``dp-microclip epsilon ...`` and ``dp-microclip noise ...``.

``epsilon`` prints the epsilon of a planned or finished run and its privacy
statement; ``noise`` prints the engine noise multiplier that reaches a target
epsilon. Both take the run as q (``--sample-rate``, or ``--batch-size`` with
``--dataset-size`` for q = B / N) and a number of steps (``--steps``, or
``--epochs``: ceil(epochs * round(1 / q)) steps (``accounting.epochs``: an epoch is round(1/q) steps,
as in ``engine.data_loader``), rounded up so as not to understate
epsilon). The CLI cannot see how batches are drawn, so the statement says the
guarantee assumes Poisson sampling at that rate.

``--json`` prints one JSON object instead; numbers are JSON numbers, and an
infinite epsilon (no noise: no guarantee) is ``null``, as in ``dp-microclip
audit --json``. Bad input prints one line, ``dp-microclip COMMAND: error:
...``, to standard error and exits with status 2; the message names the
command-line flags (``--noise-multiplier``), not the library's parameter
names. With ``--json`` the error is also printed to standard output as one
JSON object, ``{"command": ..., "error": ..., "exit_code": 2}``. When the
dataset size N is given and delta is not below 1 / N, a warning goes to
standard error (and into the JSON's ``warnings``): a mechanism that publishes
one random example in full is (0, 1/N)-DP, so such a delta promises little.

Example:
    python -m accounting.cli epsilon --batch-size 256 --dataset-size 60000 \\
        --noise-multiplier 1.1 --epochs 60 --delta 1e-5 --micro-batch-size 8
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping

from accounting.backends import ACCOUNTANTS
from accounting.calibrate import noise_multiplier_for_epsilon
from accounting.epochs import steps_for_epochs
from accounting.errors import AccountantError, OneLineParser, PrivacyRefusal, UsageError
from accounting.ledger import Ledger
from accounting.mechanism import ADJACENCIES, Mechanism
from accounting.sensitivity import effective_noise_multiplier
from accounting.statement import privacy_statement

PROG = "dp-microclip"

EPSILON_EXAMPLE = (
    "example:\n"
    "  dp-microclip epsilon --batch-size 256 --dataset-size 60000 --noise-multiplier 1.1 \\\n"
    "      --epochs 60 --delta 1e-5 --micro-batch-size 8\n"
    "  dp-microclip epsilon --sample-rate 0.01 --noise-multiplier 1 --steps 1000 --delta 1e-5 --json"
)
NOISE_EXAMPLE = (
    "example:\n"
    "  dp-microclip noise --batch-size 256 --dataset-size 60000 --target-epsilon 3 \\\n"
    "      --epochs 60 --delta 1e-5 --micro-batch-size 8\n"
    "  dp-microclip noise --sample-rate 0.01 --steps 1000 --target-epsilon 2 --delta 1e-5 --json"
)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample-rate", type=float, help="Poisson sampling rate q per step")
    parser.add_argument("--batch-size", type=int, help="expected batch size B (with --dataset-size: q = B / N)")
    parser.add_argument("--dataset-size", type=int, help="number of examples N (also checks that delta < 1 / N)")
    parser.add_argument("--steps", type=int, help="number of steps (or --epochs)")
    parser.add_argument("--epochs", type=float,
                        help="number of epochs, instead of --steps (an epoch is round(1/q) steps, as "
                             "engine.data_loader makes it)")
    parser.add_argument("--delta", type=float, required=True, help="target delta, below 1 / dataset size (e.g. 1e-5)")
    parser.add_argument("--micro-batch-size", type=int, default=1,
                        help="examples per clipping unit b (b > 1: sensitivity 2C, the accountant sees z/2; "
                             "default %(default)s)")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="prv",
                        help="backend (default %(default)s; pld needs the accounting extra)")
    parser.add_argument("--adjacency", choices=ADJACENCIES, default="add_remove",
                        help="neighbouring datasets (default %(default)s; replace_one needs --accountant pld)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (for scripts) instead of text; errors too (exit status 2)")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Privacy accounting for micro-batch DP-SGD.",
                     epilog=EPSILON_EXAMPLE.replace("example:", "examples:") + "\n" + NOISE_EXAMPLE.split("\n", 1)[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{epsilon,noise}")
    eps = sub.add_parser(
        "epsilon", help="epsilon of a run, with its privacy statement",
        description="Epsilon of a planned or finished run of micro-batch DP-SGD (Poisson sampling at rate q), "
                    "followed by its privacy statement.",
        epilog=EPSILON_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(eps)
    eps.add_argument("--noise-multiplier", type=float, required=True, help="the engine's noise multiplier z")
    noise = sub.add_parser(
        "noise", help="engine noise multiplier for a target epsilon",
        description="The engine noise multiplier z that reaches --target-epsilon at --delta (for micro-batches "
                    "of b > 1 this is twice what the accountant sees).",
        epilog=NOISE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_arguments(noise)
    noise.add_argument("--target-epsilon", type=float, required=True, help="epsilon to reach at --delta")
    return parser


def _sample_rate(args: argparse.Namespace) -> float:
    if args.sample_rate is not None:
        if args.batch_size is not None:
            raise UsageError("Give either --sample-rate or --batch-size with --dataset-size, not both.")
        return args.sample_rate
    if args.batch_size is None or args.dataset_size is None:
        raise UsageError("Give --sample-rate, or --batch-size with --dataset-size (q = batch size / dataset size).")
    if args.dataset_size < 1 or not 0 < args.batch_size <= args.dataset_size:
        raise UsageError(
            f"--batch-size must be in [1, --dataset-size]. Found --batch-size {args.batch_size}, "
            f"--dataset-size {args.dataset_size}."
        )
    return args.batch_size / args.dataset_size


def _steps(args: argparse.Namespace, q: float) -> int:
    if (args.steps is None) == (args.epochs is None):
        raise UsageError("Give exactly one of --steps or --epochs.")
    if args.steps is not None:
        if args.steps < 1:
            raise UsageError(f"--steps must be >= 1. Found {args.steps}.")
        return args.steps
    if not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise UsageError(f"--epochs must be a finite number > 0. Found {args.epochs}.")
    if not 0 < q <= 1:  # checked again by Mechanism; here it would divide by zero first
        raise UsageError(f"--sample-rate must be in (0, 1]. Found {q!r}.")
    return steps_for_epochs(args.epochs, q)


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse NaN and infinite values that the library would otherwise pass through or report confusingly."""
    names = ["sample_rate", "delta", "noise_multiplier", "target_epsilon"]
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number. Found {value}.")
    if args.dataset_size is not None and args.dataset_size < 1:
        raise UsageError(f"--dataset-size must be >= 1. Found {args.dataset_size}.")
    if getattr(args, "target_epsilon", None) is not None and not args.target_epsilon > 0:
        raise UsageError(f"--target-epsilon must be > 0. Found {args.target_epsilon}.")


def delta_warning(delta: float, dataset_size: int | None) -> str | None:
    """The warning to give when delta is not below 1 / N, or None.

    A mechanism that publishes one example of N, chosen at random, in full is
    (0, 1/N)-DP, so a delta of 1 / N or more allows a total leak of some
    example. Use delta well below 1 / N (commonly 1 / N^1.1 or 1e-5 for N up
    to about 10^5).

    Args:
        delta: the delta of the guarantee.
        dataset_size: N, or None when unknown (no warning then).

    Returns:
        One line of text, or None when delta < 1 / N or N is unknown.

    Example:
        >>> delta_warning(1e-5, 60000) is None
        True
        >>> delta_warning(1e-3, 1000).startswith("delta = 0.001 is not below 1/N")
        True
    """
    if dataset_size is None or dataset_size < 1 or delta < 1.0 / dataset_size:
        return None
    return (f"delta = {delta:g} is not below 1/N = {1.0 / dataset_size:.3g} (N = {dataset_size} examples): "
            f"a guarantee with such a delta allows publishing some example in full; use delta well below 1/N.")


def _json_number(value: float) -> float | None:
    """A JSON-safe number: infinity and NaN (which JSON cannot hold) become ``null``."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


# Library names that are not the dest of any flag, and the flag (or words) the command line uses instead; a key
# with "=" or a space is replaced literally.
FLAG_ALIASES = {"expected_batch_size": "--batch-size", "num_canaries": "--canaries", "num_fillers": "--fillers",
                "noise=False": "--no-noise", "learning_rate": "--lr", "must be None (no noise) or a": "must be a"}


def flags_of(parsers: Iterable[argparse.ArgumentParser]) -> dict[str, str]:
    """Each option's Python name (its ``dest``) mapped to its long flag, over several parsers, with
    :data:`FLAG_ALIASES`.

    Args:
        parsers: argument parsers (a command's parser and its sub-parsers).

    Returns:
        ``{"noise_multiplier": "--noise-multiplier", ...}``.

    Example:
        >>> flags_of([_parser()])["noise_multiplier"]
        '--noise-multiplier'
    """
    flags = dict(FLAG_ALIASES)
    for parser in parsers:
        for action in parser._actions:
            long = [o for o in action.option_strings if o.startswith("--")]
            if long and action.dest not in ("help", argparse.SUPPRESS):
                flags[action.dest] = long[0]
        for action in parser._actions:  # sub-parsers of `epsilon` and `noise`
            if isinstance(action, argparse._SubParsersAction):
                flags.update({k: v for k, v in flags_of(action.choices.values()).items() if k not in flags})
    return flags


def _flag_value(flag: str) -> Callable[[re.Match], str]:
    """A replacement for ``name=value`` that writes ``--flag value``."""
    def replace(m: re.Match) -> str:
        return f"{flag} {m.group(2)}"

    return replace


def in_flag_terms(message: str, flags: Mapping[str, str]) -> str:
    """Rewrite a library error message in the command line's terms: Python parameter names become flags.

    ``noise_multiplier`` becomes ``--noise-multiplier``, ``accountant="pld"``
    becomes ``--accountant pld``; a name without an underscore (``delta``,
    ``steps``) is rewritten only where it starts a sentence before "must", so
    ordinary words stay words. Keys of ``flags`` that contain ``=``
    or a space are replaced literally (``noise=False`` by ``--no-noise``).

    Args:
        message: the library's error message.
        flags: Python name to flag, e.g. from :func:`flags_of`.

    Returns:
        The message with flags in place of parameter names.

    Example:
        >>> in_flag_terms('noise_multiplier must be >= 0; use accountant="pld".',
        ...               {"noise_multiplier": "--noise-multiplier", "accountant": "--accountant"})
        '--noise-multiplier must be >= 0; use --accountant pld.'
    """
    for name in sorted(flags, key=len, reverse=True):
        flag = flags[name]
        if "=" in name or " " in name:
            message = message.replace(name, flag)
            continue
        word = rf"(?<![\w\-]){re.escape(name)}"
        message = re.sub(word + r"""=(["']?)([^"'\s,;)]+)\1""", _flag_value(flag), message)
        if "_" in name:
            message = re.sub(word + r"(?![\w=])", flag, message)
        else:
            message = re.sub(rf"(^|(?<=\. )){re.escape(name)}(?= must)", flag, message)
    return message


def json_error(command: str | None, message: str) -> str:
    """The one JSON object that ``--json`` prints to standard output for an error (exit status 2).

    Example:
        >>> json_error("epsilon", "--delta must be in (0, 1).")
        '{"command": "epsilon", "error": "--delta must be in (0, 1).", "exit_code": 2}'
    """
    return json.dumps({"command": command, "error": message, "exit_code": 2})


def wants_json(argv: Iterable[str]) -> bool:
    """Whether ``--json`` is among the options (before any ``--``)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def _run(args: argparse.Namespace) -> tuple[str, dict]:
    """Compute the command's result: (text, JSON-ready dict)."""
    _check_numbers(args)
    q = _sample_rate(args)
    steps = _steps(args, q)
    common = {
        "sample_rate": q, "steps": steps, "delta": args.delta, "micro_batch_size": args.micro_batch_size,
        "adjacency": args.adjacency, "accountant": args.accountant, "dataset_size": args.dataset_size,
        "epochs": steps * q,  # expected epochs
    }
    if args.command == "epsilon":
        mech = Mechanism(sample_rate=q, noise_multiplier=args.noise_multiplier,
                         micro_batch_size=args.micro_batch_size, adjacency=args.adjacency)
        ledger = Ledger()
        ledger.record(mech, steps)
        eps = ledger.epsilon(args.delta, args.accountant)
        statement = privacy_statement(ledger, args.delta, accountant=args.accountant,
                                      sampling_declared_by_user=True, dataset_size=args.dataset_size)
        text = (f"epsilon = {eps:.6g} at delta = {args.delta:g} ({steps} steps, accountant {args.accountant})\n\n"
                + statement)
        data = {"command": "epsilon", "epsilon": _json_number(eps), "noise_multiplier": args.noise_multiplier,
                "accountant_noise_multiplier": effective_noise_multiplier(mech), **common, "statement": statement}
        return text, data
    z = noise_multiplier_for_epsilon(
        args.target_epsilon, args.delta, sample_rate=q, steps=steps, micro_batch_size=args.micro_batch_size,
        adjacency=args.adjacency, accountant=args.accountant,
    )
    mech = Mechanism(sample_rate=q, noise_multiplier=z, micro_batch_size=args.micro_batch_size,
                     adjacency=args.adjacency)
    ledger = Ledger()
    ledger.record(mech, steps)
    eps = ledger.epsilon(args.delta, args.accountant)
    seen = effective_noise_multiplier(mech)
    text = (
        f"noise_multiplier = {z:.6g}\n"
        f"(engine z for micro_batch_size={args.micro_batch_size}; the accountant sees "
        f"{seen:.6g}; epsilon = {eps:.6g} at delta = {args.delta:g} after {steps} steps, "
        f"q = {q:.6g}, accountant {args.accountant})"
    )
    data = {"command": "noise", "noise_multiplier": z, "accountant_noise_multiplier": seen,
            "target_epsilon": args.target_epsilon, "epsilon": _json_number(eps), **common}
    return text, data


def main(argv: list[str] | None = None) -> int:
    """Run the ``epsilon`` or ``noise`` command; returns the exit status.

    Args:
        argv: the arguments after the program name, starting with the command
            (default: ``sys.argv[1:]``).

    Returns:
        0 on success (and after ``--help``); 2 on a usage error or a refusal,
        after one line ``dp-microclip COMMAND: error: ...`` on standard error.

    Example:
        >>> main(["noise", "--sample-rate", "0.01", "--steps", "1000", "--delta", "1e-5",
        ...       "--target-epsilon", "2", "--accountant", "rdp"])  # doctest: +ELLIPSIS
        noise_multiplier = ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("epsilon", "noise") else None
    prog = f"{PROG} {command}" if command else PROG
    parser = _parser()

    def error(message: str) -> int:
        message = in_flag_terms(message, flags_of([parser]))
        print(f"{prog}: error: {message}", file=sys.stderr)
        if wants_json(argv):
            print(json_error(command, message))
        return 2

    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except UsageError as err:
        return error(f"{err} (see {prog} --help)")
    try:
        text, data = _run(args)
    except (UsageError, PrivacyRefusal, AccountantError, ValueError, ImportError) as err:
        return error(str(err))
    warning = delta_warning(args.delta, args.dataset_size)
    if warning:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    if args.json:
        data["warnings"] = [warning] if warning else []
        print(json.dumps(data))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
