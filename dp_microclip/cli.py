"""The ``dp-microclip`` command: ``demo``, ``epsilon``, ``noise``, ``sweep``, ``bench`` and ``audit``.

Every command takes ``--help`` (with an example). ``epsilon``, ``noise`` and
``audit`` take ``--json`` and then print one JSON object, for scripts (numbers
as JSON numbers; an infinite epsilon as ``null``). Bad input prints one line,
``dp-microclip COMMAND: error: ...``, to standard error and exits with status
2; there is no traceback, and the message names the flags (``--noise-multiplier``),
not the library's parameter names. With ``--json`` the error is also printed to
standard output as ``{"command": ..., "error": ..., "exit_code": 2}``. When the dataset size N is
known (``epsilon``/``noise`` with ``--dataset-size``; ``audit``, whose data
holds at most ``--fillers`` + ``--canaries`` examples) and delta is not below
1 / N, a warning goes to standard error.

The installed command needs only the installed packages ``dp_microclip`` and
``accounting``. ``demo`` (``tutorials/demo_digits.py``) and ``bench``
(``benchmarks/``) run code that the wheel does not include: they find it in the
source checkout of an editable install (``pip install -e .``), and otherwise
say that they need a source checkout.

Example:
    dp-microclip epsilon --batch-size 256 --dataset-size 60000 --noise-multiplier 1.1 \\
        --epochs 60 --delta 1e-5 --micro-batch-size 8 --json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

from accounting.errors import OneLineParser, UsageError
from accounting.cli import FLAG_ALIASES, flags_of, in_flag_terms, json_error, wants_json

PROG = "dp-microclip"


class Command(NamedTuple):
    """One sub-command: what it does, an example, and where its code lives."""

    summary: str
    example: str
    module: str  # a module with ``main(argv) -> int | None``, imported when the command runs
    missing: str = ""  # what to tell the user when ``module`` is not installed


COMMANDS: dict[str, Command] = {
    "demo": Command(
        "train a small CNN on scikit-learn's digits with and without micro-batch clipping",
        "dp-microclip demo --epochs 5 --micro-batch-size 8",
        "tutorials.demo_digits",
        "the demo needs a source checkout: it lives in the repository's tutorials/ folder, which the installed "
        "package does not include. Clone the dp-microclip repository and run `make demo` there (or "
        "`pip install -e \".[demo]\"` in the checkout, then `dp-microclip demo`)",
    ),
    "epsilon": Command(
        "epsilon of a DP-SGD run with micro-batches, and its privacy statement",
        "dp-microclip epsilon --batch-size 256 --dataset-size 60000 --noise-multiplier 1.1 --epochs 60 "
        "--delta 1e-5 --micro-batch-size 8",
        "accounting.cli",
    ),
    "noise": Command(
        "the noise multiplier that reaches a target epsilon",
        "dp-microclip noise --batch-size 256 --dataset-size 60000 --target-epsilon 3 --epochs 60 "
        "--delta 1e-5 --micro-batch-size 8 --json",
        "accounting.cli",
    ),
    "sweep": Command(
        "compare plain training with micro-batch clipping, each with its own tuned learning rate",
        "dp-microclip sweep --label-noise 0.2 --micro-batch-sizes 1 8 --seeds 0 1 --out sweep-results",
        "dp_microclip.tools.sweep",
        "this installation has no dp_microclip.tools.sweep module (the sweep command came with a later version "
        "of dp-microclip); upgrade the package, or install it from a current checkout with `pip install -e .`",
    ),
    "bench": Command(
        "time one training step against plain PyTorch, Opacus and the naive loop",
        "dp-microclip bench --quick",
        "benchmarks.bench",
        "the benchmarks need a source checkout: they live in the repository's benchmarks/ folder, which the "
        "installed package does not include. Clone the dp-microclip repository and run `make bench` there (or "
        "`pip install -e \".[dev]\"` in the checkout, then `dp-microclip bench`)",
    ),
    "audit": Command(
        "empirical lower bound on epsilon from one training run with canaries",
        "dp-microclip audit --canaries 1000 --micro-batch-size 4 --noise-multiplier 2 --sample-rate 0.02 "
        "--steps 300 --json",
        "dp_microclip.tools.audit",
    ),
}

# How a delegated module names itself in its own --help, replaced by ``dp-microclip COMMAND``.
_FOREIGN_PROGS = ("python -m benchmarks.bench", "python -m tutorials.demo_digits")


def usage() -> str:
    """The text of ``dp-microclip --help``."""
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} {{{','.join(COMMANDS)}}} [options]",
        "",
        "Micro-batch gradient clipping for PyTorch: noise-free for accuracy, or DP-SGD with an honest epsilon.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()),
        "",
        f"Run `{PROG} COMMAND --help` for a command's options. epsilon, noise and audit take --json.",
        "",
        "examples:",
        *(f"  {COMMANDS[name].example}" for name in ("epsilon", "noise", "demo")),
    ]
    return "\n".join(lines)


def _error(command: str | None, message: str, *, as_json: bool = False,
           flags: Mapping[str, str] | None = None, stderr=None) -> int:
    """One error line on stderr (in flag terms), and with ``--json`` the JSON object on stdout; returns 2."""
    message = in_flag_terms(message, FLAG_ALIASES if flags is None else flags)
    prefix = f"{PROG} {command}" if command else PROG
    print(f"{prefix}: error: {message}", file=stderr or sys.stderr)
    if as_json:
        print(json_error(command, message))
    return 2


class _ErrorLines(io.TextIOBase):
    """Standard error while a delegated command runs: its own ``dp-microclip COMMAND: error: ...`` lines pass
    through :func:`_error` (flags, JSON); everything else (progress bars, warnings) is written through at once."""

    def __init__(self, stream, command: str, as_json: bool, flags: Callable[[], Mapping[str, str]]):
        self._stream, self._command, self._as_json, self._flags = stream, command, as_json, flags
        self._prefix = f"{PROG} {command}: error: "
        self._line = ""  # an error line being written (print writes the text and the newline separately)

    def write(self, text: str) -> int:
        if not self._line and not text.startswith(self._prefix):
            return self._stream.write(text)
        self._line += text
        while "\n" in self._line:
            line, self._line = self._line.split("\n", 1)
            if line.startswith(self._prefix):
                _error(self._command, line[len(self._prefix):], as_json=self._as_json, flags=self._flags(),
                       stderr=self._stream)
            else:
                self._stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self._line:
            self.write("\n")
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")


def _checkout_root() -> str | None:
    """The source checkout this package was imported from (an editable install or a run from the checkout), if any."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    return root if os.path.isfile(os.path.join(root, "pyproject.toml")) else None


def _warn(command: str, message: str) -> None:
    print(f"{PROG} {command}: warning: {message}", file=sys.stderr)


def _load(command: str) -> Callable[[list[str]], int | None] | str:
    """The command's ``main``, or the one-line reason it is not installed."""
    spec = COMMANDS[command]
    try:
        module = _import_from_checkout(spec.module)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if spec.module == missing or spec.module.startswith(missing + "."):
            return spec.missing or f"the module {spec.module} is not installed"
        raise  # the command's code is there but one of its imports is not: handled by the caller
    main = getattr(module, "main", None)
    if main is None:
        return f"{spec.module} has no main(argv); this installation of dp-microclip is inconsistent"
    return main


def _import_from_checkout(name: str):
    """Import ``name``, from the source checkout when it is not installed.

    tutorials/ and benchmarks/ are not in the wheel, and an editable install
    maps only the installed packages. When this package was imported from a
    checkout that holds ``name``, the checkout goes first on ``sys.path``;
    a module of the same top-level name from another distribution is dropped
    first (Opacus installs a top-level ``benchmarks`` package). A module set
    to None in ``sys.modules`` (blocked) stays blocked.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        root, top, missing = _checkout_root(), name.split(".")[0], err.name or ""
        if (root is None or not (name == missing or name.startswith(missing + "."))
                or not os.path.isfile(os.path.join(root, *name.split(".")) + ".py")):
            raise
        loaded = [m for m in sys.modules if m == top or m.startswith(top + ".")]
        if any(sys.modules[m] is None for m in loaded):
            raise
        for module in loaded:
            del sys.modules[module]
        if root not in sys.path:
            sys.path.insert(0, root)
        importlib.invalidate_caches()
        return importlib.import_module(name)


def _wants_help(argv: Sequence[str]) -> bool:
    head = list(argv[: argv.index("--")]) if "--" in argv else list(argv)
    return "-h" in head or "--help" in head


@contextlib.contextmanager
def _one_line_argparse_errors(parsers: list[argparse.ArgumentParser] | None = None) -> Iterator[None]:
    """Make a delegated module's argparse errors one line and exit status 2 (argparse prints usage first).

    The patch is on ``argparse.ArgumentParser.error`` for the duration of the
    command only; parsers that define their own ``error`` keep it. Every
    parser that parses arguments meanwhile is appended to ``parsers`` (its
    flags name the library's parameters in error messages).
    """
    original = argparse.ArgumentParser.error
    original_parse = argparse.ArgumentParser.parse_known_args

    def error(self: argparse.ArgumentParser, message: str):
        raise UsageError(message)

    def parse_known_args(self: argparse.ArgumentParser, *args, **kwargs):
        if parsers is not None:
            parsers.append(self)
        return original_parse(self, *args, **kwargs)

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]
        argparse.ArgumentParser.parse_known_args = original_parse  # type: ignore[method-assign]


@contextlib.contextmanager
def _program_name(command: str, argv: Sequence[str]) -> Iterator[None]:
    """``sys.argv`` as the delegated module would see it run as ``dp-microclip COMMAND`` (argparse's default prog)."""
    saved = sys.argv
    sys.argv = [f"{PROG} {command}", *argv]
    try:
        yield
    finally:
        sys.argv = saved


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _run_delegated(command: str, argv: list[str]) -> int:
    """Run a command whose code lives in a module imported now (``demo``, ``sweep``, ``bench``, ``audit``)."""
    spec = COMMANDS[command]
    as_json = wants_json(argv)
    try:
        main = _load(command)
    except ImportError as err:
        return _error(command, _import_hint(err), as_json=as_json)
    if isinstance(main, str):
        if _wants_help(argv):
            print(f"usage: {PROG} {command} [options]\n\n{spec.summary}.\n\nnot available: {main}.\n\n"
                  f"example (once installed):\n  {spec.example}")
            return 0
        return _error(command, f"{main}.", as_json=as_json)
    if _wants_help(argv):
        out = io.StringIO()
        with _one_line_argparse_errors(), _program_name(command, argv), contextlib.redirect_stdout(out):
            try:
                main(argv)
            except SystemExit:
                pass
            except UsageError:
                pass
        text = out.getvalue().rstrip("\n")
        ours = f"{PROG} {command}"
        for foreign in (f for f in _FOREIGN_PROGS if f in text):  # the usage line and its continuation lines
            text = text.replace("\n" + " " * len(f"usage: {foreign} "), "\n" + " " * len(f"usage: {ours} "))
            text = text.replace(foreign, ours)
        if "example" not in text.lower():
            text += f"\n\nexample:\n  {spec.example}"
        print(text)
        return 0
    from accounting.errors import AccountantError, PrivacyRefusal

    from .errors import MicroclipError

    parsers: list[argparse.ArgumentParser] = []

    def flags() -> dict[str, str]:
        return flags_of(parsers)

    stderr = _ErrorLines(sys.stderr, command, as_json, flags)
    try:
        with _one_line_argparse_errors(parsers), _program_name(command, argv), contextlib.redirect_stderr(stderr):
            return _exit_status(main(argv))
    except UsageError as err:
        return _error(command, f"{err} (see {PROG} {command} --help)", as_json=as_json, flags=flags())
    except (MicroclipError, PrivacyRefusal, AccountantError) as err:  # settings the library refuses
        return _error(command, str(err), as_json=as_json, flags=flags())
    except ImportError as err:
        return _error(command, _import_hint(err), as_json=as_json)
    except SystemExit as exit_:
        return _exit_status(exit_.code)
    finally:
        stderr.flush()


def _import_hint(err: ImportError) -> str:
    name = getattr(err, "name", None) or str(err)
    return (f"this command needs the Python package {name!r}, which is not installed: "
            f"pip install \"dp-microclip[dev]\" installs every optional dependency ({err}).")


def _audit_delta_warning(argv: Sequence[str]) -> str | None:
    """The delta >= 1/N warning for ``audit``, where N <= fillers + canaries; None when fine or not parseable."""
    from accounting.cli import delta_warning

    from .tools.audit import AuditConfig

    defaults = AuditConfig()
    parser = OneLineParser(add_help=False)
    parser.add_argument("--delta", type=float, default=defaults.delta)
    parser.add_argument("--canaries", type=int, default=defaults.num_canaries)
    parser.add_argument("--fillers", type=int, default=defaults.num_fillers)
    try:
        known, _ = parser.parse_known_args(list(argv))
    except UsageError:
        return None  # audit's own parser reports it
    if known.canaries < 0 or known.fillers < 0:
        return None
    return delta_warning(known.delta, known.canaries + known.fillers)


def main(argv: list[str] | None = None) -> int:
    """Run ``dp-microclip COMMAND ...``; returns the exit status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success or after ``--help``; 2 after one line
        ``dp-microclip COMMAND: error: ...`` on standard error for bad input,
        an unknown command, or a command whose code is not installed; a
        delegated command's own status otherwise.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except BrokenPipeError:  # `dp-microclip ... | head`: stop quietly, as other command-line tools do
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (no flush error at interpreter exit)
        return 1


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"{PROG} {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return _error(None, f"unknown command {command!r}; choose from {', '.join(COMMANDS)} (see {PROG} --help)",
                      as_json=wants_json(rest))
    if command in ("epsilon", "noise"):
        from accounting.cli import main as accounting_main

        return accounting_main([command, *rest])
    if command == "audit" and not _wants_help(rest):
        warning = _audit_delta_warning(rest)
        if warning:
            _warn(command, warning)
    return _run_delegated(command, rest)


if __name__ == "__main__":
    raise SystemExit(main())
