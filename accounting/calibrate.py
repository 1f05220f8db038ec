"""Calibration: the noise multiplier that reaches a target epsilon after a planned number of steps.

The search runs on the accountant's z (the one ``sensitivity.py`` derives) and
the result is converted back to the engine's z exactly once, at the end: for
micro_batch_size > 1 the engine's z is twice the accountant's. The search uses
the same backend that will report epsilon, so the promise and the report
agree. Epsilon decreases with z, and log epsilon is close to linear in log z,
so a bracketing secant search (regula falsi with the Illinois fix) in log-log
space needs a handful of evaluations of the slow tight backends. For them the
bracket comes from a calibration with the millisecond RDP bound, which is
always above the tight epsilon, so its z already meets the target.

We do not call ``dp_accounting.calibrate_dp_mechanism`` or Opacus'
``get_noise_multiplier``: both stop on a tolerance in z (or an absolute 0.01
in epsilon) rather than on the epsilon itself, and Opacus'
does not know about micro-batches; the search below stops when
``target * (1 - tolerance) <= epsilon <= target``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable

from accounting import backends
from accounting.backends import AccountantSpec, Segment
from accounting.errors import AccountingWarning
from accounting.mechanism import Mechanism
from accounting.sensitivity import effective_noise_multiplier

_Z_MIN, _Z_MAX = 1e-3, 1e6
_MAX_EVALUATIONS = 80


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    steps: int,
    micro_batch_size: int = 1,
    adjacency: str = "add_remove",
    grouping: str = "keyed",
    sampling: str = "poisson",
    accountant: AccountantSpec = "prv",
    tolerance: float = 0.005,
    privacy_unit: str = "example",
    max_examples_per_user: int | None = None,
) -> float:
    """The engine's noise multiplier z whose run of ``steps`` steps reaches ``target_epsilon``.

    Args:
        target_epsilon: the epsilon to reach at ``delta`` (> 0).
        delta: target delta in (0, 1).
        sample_rate: Poisson sampling rate q of every step.
        steps: number of steps planned.
        micro_batch_size: b; for b > 1 the returned z is twice the z the
            accountant needs, because the sensitivity is 2C.
        adjacency: as in :class:`~accounting.mechanism.Mechanism`; a shape the rules
            refuse raises here, before any search.
        grouping: as in :class:`~accounting.mechanism.Mechanism`.
        sampling: as in :class:`~accounting.mechanism.Mechanism`.
        accountant: the backend that will report epsilon (same names as
            ``Ledger.epsilon``).
        tolerance: the result's epsilon lies in
            [target * (1 - tolerance), target].
        privacy_unit: as in :class:`~accounting.mechanism.Mechanism` ("user" needs grouping="user").
        max_examples_per_user: as in :class:`~accounting.mechanism.Mechanism`.

    Returns:
        The engine's noise multiplier (pass it to ``attach(noise_multiplier=...)``).

    Raises:
        PrivacyRefusal: the mechanism has no guarantee (see ``sensitivity.py``).
        ValueError: an argument out of range, or a target no z in
            [1e-3, 1e6] reaches.

    Example:
        >>> z = noise_multiplier_for_epsilon(3.0, 1e-5, sample_rate=256 / 60000, steps=14062, accountant="rdp")
        >>> round(z, 2)
        1.02
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, numbers.Real) or not (
        0 < target_epsilon < math.inf
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0. Found {target_epsilon!r}.")
    backends.check_delta(delta)
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1. Found {steps!r}.")
    if not 0 < tolerance <= 0.1:
        raise ValueError(f"tolerance must be in (0, 0.1]. Found {tolerance!r}. The default 0.005 means within 0.5%.")
    probe = Mechanism(
        sample_rate=sample_rate,
        noise_multiplier=1.0,
        micro_batch_size=micro_batch_size,
        adjacency=adjacency,
        grouping=grouping,
        sampling=sampling,
        privacy_unit=privacy_unit,
        max_examples_per_user=max_examples_per_user,
    )
    # The one place the micro-batch factor enters: engine z = accountant z * (engine z / accountant z).
    engine_per_accountant_z = 1.0 / effective_noise_multiplier(probe)
    backend = backends.resolve(accountant)
    q, n = probe.sample_rate, int(steps)

    def epsilon_of(z_acc: float) -> float:
        return backend.epsilon([Segment(z_acc, q, n)], delta, adjacency=adjacency)

    guess = 1.0
    if not backend.name.startswith("rdp") and adjacency == "add_remove":
        # RDP bounds the tight epsilon from above, so the RDP-calibrated z meets the target: a cheap bracket.
        from accounting.backends.rdp import INTEGER_ORDERS, RdpBackend

        # Integer orders only: a subset of orders still gives an upper bound (the conversion minimises over
        # the orders it has), and integer orders have a closed form, so each evaluation costs ~50 ms instead of
        # 0.6 s at large sampling rates, where the fractional-order series is slow.
        rdp = RdpBackend(orders=INTEGER_ORDERS)
        guess = _search(lambda z: rdp.epsilon([Segment(z, q, n)], delta), float(target_epsilon), tolerance, 1.0)
    z_acc = _search(epsilon_of, float(target_epsilon), tolerance, guess)
    return z_acc * engine_per_accountant_z


def _search(epsilon_of: Callable[[float], float], target: float, tolerance: float, guess: float) -> float:
    """Smallest-found z with target * (1 - tolerance) <= epsilon_of(z) <= target.

    Bracket [lo, hi] with epsilon(lo) > target >= epsilon(hi), then regula
    falsi on log epsilon - log target against log z, with the Illinois
    halving so that a stuck end still moves.
    """
    cache: dict[float, float] = {}

    def f(z: float) -> float:
        if z not in cache:
            if len(cache) >= _MAX_EVALUATIONS:
                raise RuntimeError("calibration did not converge")
            eps = epsilon_of(z)
            cache[z] = math.log(eps) - math.log(target) if eps > 0 else -math.inf
        return cache[z]

    def done(fz: float) -> bool:
        return math.log1p(-tolerance) <= fz <= 0.0

    z = min(max(guess, _Z_MIN), _Z_MAX)
    fz = f(z)
    if done(fz):
        return z
    # Bracket, stepping by a factor that grows so far-off guesses are cheap.
    step = 1.1
    if fz > 0:
        lo, flo = z, fz
        hi = z * step
        while f(hi) > 0:
            lo, flo = hi, f(hi)
            step = step**2
            hi = hi * step
            if hi > _Z_MAX:
                raise ValueError(
                    f"No noise multiplier up to {_Z_MAX:g} reaches target_epsilon={target:g}; "
                    "use a larger target_epsilon or fewer steps."
                )
        fhi = f(hi)
    else:
        hi, fhi = z, fz
        lo = z / step
        while f(lo) <= 0:
            if done(f(lo)):
                return lo
            hi, fhi = lo, f(lo)
            step = step**2
            lo = lo / step
            if lo < _Z_MIN:
                raise ValueError(
                    f"Even a noise multiplier of {_Z_MIN:g} keeps epsilon below target_epsilon={target:g}; "
                    "the target is too loose to calibrate."
                )
        flo = f(lo)
    if done(fhi):
        return hi
    side = 0
    while True:
        a, b = math.log(lo), math.log(hi)
        if math.isfinite(flo) and math.isfinite(fhi) and flo != fhi:
            # Aim a little inside the tolerance band, so the secant lands in it rather than next to it.
            aim = 0.5 * math.log1p(-tolerance)
            x = b - (fhi - aim) * (b - a) / (fhi - flo)
            # Stay strictly inside the bracket; bisect if the secant hugs an end.
            width = b - a
            x = min(max(x, a + 0.02 * width), b - 0.02 * width)
        else:
            x = 0.5 * (a + b)
        z = math.exp(x)
        try:
            fz = f(z)
        except RuntimeError:
            break
        if done(fz):
            return z
        if fz > 0:
            lo, flo = z, fz
            if side == -1:
                fhi = 0.5 * fhi  # Illinois: the hi end did not move last time either
            side = -1
        else:
            hi, fhi = z, fz
            if side == 1:
                flo = 0.5 * flo
            side = 1
        if math.log(hi) - math.log(lo) < 1e-12:
            break
    warnings.warn(
        f"Calibration stopped with epsilon {target * math.exp(cache[hi]):.6g}, more than {tolerance:.1%} below "
        f"target_epsilon={target:g}: the backend's epsilon jumps near the target (e.g. PRV falling back to "
        "RDP). The returned noise multiplier is safe, only more than needed.",
        AccountingWarning,
        stacklevel=3,
    )
    return hi


def max_steps_within(within: Callable[[int], bool], cap: int = 10**8) -> int:
    """The largest ``n`` in ``[0, cap]`` with ``within(n)`` true, for a ``within`` that is true up to some
    ``n`` and false after (epsilon grows with the number of steps): doubling, then bisection.

    Used for budget enforcement: how many more steps keep epsilon within the target.
    """
    lo, hi = 0, 1
    while within(hi) and hi < cap:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
    return lo
