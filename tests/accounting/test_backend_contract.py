"""The contract every backend honours (accounting/backends/__init__.py), run for each of them."""

from __future__ import annotations

import math

import pytest

import accounting
from accounting.backends import resolve
from accounting.backends.prv import PrvBackend

ALL = list(accounting.ACCOUNTANTS)
ADD_REMOVE_ONLY = ["rdp", "rdp_google", "prv"]


@pytest.mark.parametrize("name", ALL)
def test_empty_history_is_zero(name):
    assert resolve(name).epsilon([], 1e-5) == 0.0
    assert resolve(name).epsilon([(1.0, 0.01, 0)], 1e-5) == 0.0


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("no_noise", [None, 0.0])
def test_any_noise_free_segment_makes_epsilon_infinite(name, no_noise):
    history = [(1.0, 0.01, 100), (no_noise, 0.01, 1), (1.0, 0.01, 100)]
    assert resolve(name).epsilon(history, 1e-5) == math.inf


@pytest.mark.parametrize("name", ALL)
def test_epsilon_grows_with_steps_and_shrinks_with_noise(name):
    backend = resolve(name)
    e_short = backend.epsilon([(1.0, 0.01, 100)], 1e-5)
    e_long = backend.epsilon([(1.0, 0.01, 1000)], 1e-5)
    e_noisier = backend.epsilon([(2.0, 0.01, 1000)], 1e-5)
    assert 0 < e_short < e_long
    assert 0 < e_noisier < e_long


@pytest.mark.parametrize("name", ALL)
def test_smaller_delta_costs_more_epsilon(name):
    backend = resolve(name)
    assert backend.epsilon([(1.0, 0.01, 500)], 1e-7) > backend.epsilon([(1.0, 0.01, 500)], 1e-4)


@pytest.mark.parametrize("name", ALL)
def test_splitting_a_history_into_segments_changes_nothing(name):
    backend = resolve(name)
    whole = backend.epsilon([(1.5, 0.02, 600)], 1e-5)
    split = backend.epsilon([(1.5, 0.02, 200), (1.5, 0.02, 400)], 1e-5)
    assert split == pytest.approx(whole, rel=0.01)


@pytest.mark.parametrize("name", ADD_REMOVE_ONLY)
def test_replace_one_is_refused_by_backends_that_cannot_analyse_it(name):
    with pytest.raises(accounting.PrivacyRefusal, match='accountant="pld"'):
        resolve(name).epsilon([(1.0, 0.01, 10)], 1e-5, adjacency="replace_one")


def test_pld_analyses_replace_one():
    assert 0 < resolve("pld").epsilon([(1.0, 0.01, 10)], 1e-5, adjacency="replace_one") < math.inf


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("delta", [0, 1, -1e-5, 1.5, True])
def test_delta_out_of_range_is_refused(name, delta):
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
        resolve(name).epsilon([(1.0, 0.01, 10)], delta)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(
    "segment, match",
    [((-1.0, 0.01, 10), "noise_multiplier"), ((1.0, 0.0, 10), "sample_rate"), ((1.0, 1.5, 10), "sample_rate"),
     ((1.0, 0.01, -1), "steps"), ((1.0, 0.01, 2.5), "steps"), ((1.0, 0.01), "must be")],
)
def test_malformed_segments_are_refused(name, segment, match):
    with pytest.raises(ValueError, match=match):
        resolve(name).epsilon([segment], 1e-5)


def test_unknown_accountant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown accountant 'gdp'.*'prv'"):
        resolve("gdp")


def test_prv_too_large_a_grid_falls_back_to_rdp_with_a_warning_or_raises():
    history = [(0.25, 0.1, 20000)]  # Opacus would build a grid of billions of points here
    with pytest.warns(accounting.AccountingWarning, match="RDP upper bound"):
        eps = PrvBackend().epsilon(history, 1e-5)
    assert eps == pytest.approx(resolve("rdp").epsilon(history, 1e-5))
    with pytest.raises(accounting.AccountantError, match='accountant="pld"'):
        PrvBackend(fallback="error").epsilon(history, 1e-5)


def test_prv_error_target_is_relative_for_small_epsilons():
    # Opacus' default eps_error of 0.01 would be 10% of this epsilon; ours stays within 1% of PLD.
    history = [(4.0, 0.005, 200)]
    prv = resolve("prv").epsilon(history, 1e-5)
    pld = resolve("pld").epsilon(history, 1e-5)
    assert pld < 0.2
    assert prv == pytest.approx(pld, rel=0.01)
