"""Observers of the engine's passes and steps (``engine.add_observer``) and what DP mode lets them see.

An observer receives the pass's captured records and clip statistics: exact
batch sizes, un-noised per-group norms, unclipped update norms. Published,
they are functions of the private batch that no noise covers, so DP mode
refuses an observer unless the caller opts in with ``release_unnoised=True``;
the privacy statement then says that un-noised statistics were observed.
"""

from __future__ import annotations

from .errors import PrivacyError


def check_observer(observer, dp: bool, release_unnoised: bool) -> None:
    """Refuse an observer on a DP engine unless the caller opted in to un-noised statistics."""
    if dp and not release_unnoised:
        raise PrivacyError(
            f"engine.add_observer({type(observer).__name__}) on a DP engine: observers see un-noised statistics of "
            "each private batch (its exact size, per-micro-batch gradient norms, the unclipped update), which no "
            "noise covers and epsilon does not account for. Observe a noise-free run instead, or opt in with "
            "engine.add_observer(observer, release_unnoised=True) and keep what it records as private as the "
            "training data; the privacy statement then says so."
        )


class ObserverHandle:
    """Removes one observer from its engine."""

    def __init__(self, observers: list, observer):
        self._observers, self._observer = observers, observer

    def remove(self) -> None:
        """Stop calling the observer (idempotent)."""
        if self._observer in self._observers:
            self._observers.remove(self._observer)
