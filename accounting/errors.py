"""Exception and warning types of ``accounting``.

Every message says what is wrong, the value found, and the fix (STYLE.md,
"Errors that name the fix"). ``accounting`` imports nothing from
``dp_microclip``, so these types are its own; the engine turns them into its
``PrivacyError`` where it needs to. :class:`UsageError` and :class:`OneLineParser`
are the command lines' (``accounting.cli`` and ``dp_microclip``'s commands alike).
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class PrivacyRefusal(ValueError):
    """No epsilon can be reported for this mechanism or history.

    Raised when the step is noisy but the analysis behind the accountant does
    not hold for it (adaptive clipping, contiguous groups of b > 1, shuffled
    epochs, an adjacency a backend cannot compute). A ``ValueError`` so that a
    caller validating its arguments catches it with the rest.
    """


class AccountantError(RuntimeError):
    """A backend could not compute a number it can stand behind.

    Raised instead of returning a number that may be wrong, e.g. when Opacus'
    PRV accountant would need more memory than allowed and the caller asked
    for no fallback.
    """


class AccountingWarning(UserWarning):
    """A number was computed, but not the way the caller asked (e.g. PRV fell back to RDP)."""


class UsageError(ValueError):
    """Bad command-line input: the command prints it as one line, ``PROG: error: ...``, and exits with status 2.

    The one definition for every ``dp-microclip`` command (``epsilon``, ``noise``, ``audit`` and the
    delegated ones); a ``ValueError`` so that code validating its arguments catches it with the rest.
    """


class OneLineParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors raise :class:`UsageError` (to ``main``) instead of printing usage and
    exiting."""

    def error(self, message: str) -> NoReturn:
        """Raise :class:`UsageError` with argparse's message; the command's ``main`` prints it and returns 2."""
        raise UsageError(message)
