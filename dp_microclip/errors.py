"""Exception types, and where warnings point. Every message says what is wrong, the value found, and the fix."""

from __future__ import annotations

import os
import sys
from types import FrameType


class MicroclipError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(MicroclipError, ValueError):
    """An argument of ``attach`` (or a later setting) is invalid or inconsistent."""


class UnsupportedModuleError(ConfigurationError):
    """A module of the model cannot be handled exactly; the message names it and the ways out."""


class BatchError(MicroclipError, ValueError):
    """A batch does not fit the grouping (size, batch dimension, ...)."""


class PrivacyError(MicroclipError, ValueError):
    """The engine refuses to report or to promise a privacy guarantee it cannot back."""


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in this function's caller point at the user's line.

    That is the first frame outside dp_microclip and torch: the user's ``attach(...)``, forward,
    ``backward()`` or ``optimizer.step()`` line, however deep in the package (or in torch's module,
    autograd and optimizer wrappers, through which the engine's hooks run) the warning is raised.
    """
    inside = [os.path.dirname(os.path.abspath(__file__)) + os.sep]
    torch = sys.modules.get("torch")
    if torch is not None and torch.__file__:
        inside.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    frame: FrameType | None = sys._getframe(2)
    level = 2  # level 1 is the caller, which calls warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(tuple(inside)):
        frame, level = frame.f_back, level + 1
    return level
