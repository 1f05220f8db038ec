"""Exception types. Every message says what is wrong, the value found, and the fix."""


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
