"""Calibration round trips: the calibrated z gives the target epsilon within 1%, from below."""

from __future__ import annotations

import pytest

import accounting
from accounting import noise_multiplier_for_epsilon
from tests.accounting import reference


@pytest.mark.parametrize(
    "target, q, steps, b, accountant",
    [
        (3.0, 256 / 60000, 14062, 1, "prv"),
        (3.0, 256 / 60000, 14062, 8, "prv"),
        (1.0, 0.01, 2000, 1, "pld"),
        (8.0, 0.05, 500, 2, "pld"),
        (0.5, 0.002, 5000, 32, "rdp"),
        (20.0, 0.1, 300, 8, "rdp_google"),
    ],
)
def test_calibrated_noise_reaches_the_target_within_1_percent(target, q, steps, b, accountant):
    z = noise_multiplier_for_epsilon(target, 1e-5, sample_rate=q, steps=steps, micro_batch_size=b, accountant=accountant)
    ledger = accounting.Ledger()
    ledger.record(accounting.Mechanism(sample_rate=q, noise_multiplier=z, micro_batch_size=b), steps)
    eps = ledger.epsilon(1e-5, accountant)
    assert target * 0.99 <= eps <= target * (1 + 1e-9)
    # Independently: dp_accounting at the accountant's z (z / 2 for b > 1) gives the same target.
    segments = [(reference.accountant_z(z, b), q, steps)]
    if accountant in ("prv", "pld"):
        assert reference.pld_epsilon(segments, 1e-5) == pytest.approx(target, rel=0.02)
    else:
        assert reference.rdp_epsilon(segments, 1e-5) == pytest.approx(target, rel=0.02)


def test_micro_batches_double_the_engine_noise_for_the_same_target():
    kwargs = dict(sample_rate=0.01, steps=1000, accountant="rdp")
    z1 = noise_multiplier_for_epsilon(2.0, 1e-5, micro_batch_size=1, **kwargs)
    z8 = noise_multiplier_for_epsilon(2.0, 1e-5, micro_batch_size=8, **kwargs)
    assert z8 == pytest.approx(2 * z1, rel=0.01)


def test_agrees_with_dp_accounting_calibration():
    import dp_accounting as dpa

    q, steps, target, delta = 256 / 60000, 14062, 3.0, 1e-5
    ours = noise_multiplier_for_epsilon(target, delta, sample_rate=q, steps=steps, accountant="pld")
    theirs = dpa.calibrate_dp_mechanism(
        lambda: dpa.pld.PLDAccountant(value_discretization_interval=1e-4),
        lambda z: reference.event([(z, q, steps)]),
        target,
        delta,
        bracket_interval=dpa.LowerEndpointAndGuess(0.5, 1.0),
        tol=1e-4,
    )
    # Both give epsilon <= target; ours stops within 0.5% below it, so z differs by well under 1%.
    assert ours == pytest.approx(theirs, rel=0.01)


def test_refused_mechanisms_are_refused_before_any_search():
    with pytest.raises(accounting.PrivacyRefusal, match="contiguous"):
        noise_multiplier_for_epsilon(1.0, 1e-5, sample_rate=0.01, steps=100, micro_batch_size=4, grouping="contiguous")
    with pytest.raises(accounting.PrivacyRefusal, match="shuffle"):
        noise_multiplier_for_epsilon(1.0, 1e-5, sample_rate=0.01, steps=100, sampling="shuffle")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_epsilon=0.0), "target_epsilon must be a finite number > 0"),
        (dict(target_epsilon=float("inf")), "target_epsilon must be a finite number > 0"),
        (dict(steps=0), "steps must be an integer >= 1"),
        (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\]"),
        (dict(delta=1.0), r"delta must be in \(0, 1\)"),
        (dict(tolerance=0.5), r"tolerance must be in \(0, 0.1\]"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    args = dict(target_epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=100, accountant="rdp")
    args.update(kwargs)
    target, delta = args.pop("target_epsilon"), args.pop("delta")
    with pytest.raises(ValueError, match=match):
        noise_multiplier_for_epsilon(target, delta, **args)


def test_unreachable_targets_say_so():
    with pytest.raises(ValueError, match="too loose"):
        noise_multiplier_for_epsilon(1e6, 1e-5, sample_rate=0.001, steps=1, accountant="rdp")
