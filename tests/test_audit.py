"""One-run privacy audit: the statistics (accounting.audit), and audits of the engine's epsilon (dp_microclip.tools.audit).

The engine tests train small linear models for a few hundred steps (about a
second each on one CPU thread). Every audit is seeded, so each test is
deterministic; the margins asserted are the ones measured (docs/audit.md).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from accounting.audit import audit_lower_bound, epsilon_lower_bound, make_guesses, p_value, score_guesses
from dp_microclip.errors import ConfigurationError
from dp_microclip.tools.audit import AuditConfig, main, run_audit

DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


# ================================================================ statistics
def _p_value_by_hand(eps, m, r, v, delta):
    """Theorem 3 of Steinke, Nasr and Jagielski (2023), term by term with scipy."""
    p = math.exp(eps) / (1 + math.exp(eps))
    tail = sum(scipy.stats.binom.pmf(j, r, p) for j in range(v, r + 1))
    slack = max(sum(scipy.stats.binom.pmf(j, r, p) for j in range(v - i, v)) / i for i in range(1, v + 1))
    return min(1.0, tail + 2 * m * delta * slack)


@pytest.mark.parametrize("eps,m,r,v,delta", [
    (0.0, 100, 20, 15, 0.0), (1.0, 100, 20, 18, 1e-3), (2.5, 1000, 100, 95, 1e-5), (4.0, 1000, 200, 199, 1e-5),
    (0.3, 50, 50, 30, 0.01),
])
def test_p_value_matches_the_theorem_computed_by_hand(eps, m, r, v, delta):
    assert p_value(eps, m, r, v, delta) == pytest.approx(_p_value_by_hand(eps, m, r, v, delta), rel=1e-9, abs=1e-14)


def test_without_delta_the_p_value_is_the_binomial_tail():
    assert p_value(1.0, 500, 100, 80, 0.0) == pytest.approx(scipy.stats.binom.sf(79, 100, 1 / (1 + math.exp(-1))))


def test_lower_bound_is_where_the_p_value_crosses_beta():
    m, r, v = 1000, 100, 97
    eps = epsilon_lower_bound(m, r, v, DELTA, beta=0.05)
    assert 1.0 < eps < 10
    assert p_value(eps - 1e-3, m, r, v, DELTA) <= 0.05 < p_value(eps + 1e-3, m, r, v, DELTA)


def test_perfect_guesses_give_a_large_bound_and_more_guesses_a_larger_one():
    inclusion = np.arange(1000) % 2 == 0
    scores = inclusion.astype(float)
    bounds = [audit_lower_bound(scores, inclusion, k, k, DELTA) for k in (25, 100, 400)]
    assert bounds[0] > 2.0 and bounds == sorted(bounds) and bounds[-1] > 4.5
    # delta = 0: r perfect guesses reject exactly eps with (e^eps/(1+e^eps))^r = beta
    r = 200
    exact = math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r)))
    assert epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(exact, abs=1e-6)


def test_random_guesses_give_a_bound_near_zero_and_rarely_above():
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(200):
        inclusion = rng.random(1000) < 0.5
        bounds.append(audit_lower_bound(rng.standard_normal(1000), inclusion, 100, 100, DELTA))
    bounds = np.array(bounds)
    assert np.mean(bounds > 0) <= 0.08  # a false positive is allowed with probability beta = 0.05
    assert np.max(bounds) < 0.4


def test_bound_holds_for_randomized_response_at_known_epsilon():
    """A mechanism that is exactly eps-DP per canary: the bound exceeds eps in at most ~beta of the runs."""
    rng = np.random.default_rng(1)
    eps = 2.0
    p_right = math.exp(eps) / (1 + math.exp(eps))
    bounds = []
    for _ in range(100):
        inclusion = rng.random(1000) < 0.5
        told = np.where(rng.random(1000) < p_right, inclusion, ~inclusion)  # eps-DP randomized response
        scores = told + 1e-3 * rng.random(1000)  # tie-break at random among the "told in"
        bounds.append(audit_lower_bound(scores, inclusion, 200, 200, DELTA))
    bounds = np.array(bounds)
    assert np.mean(bounds > eps) <= 0.1
    assert np.median(bounds) > 1.0  # and the audit is not vacuous


def test_guesses_take_the_top_and_bottom_scores():
    g = make_guesses([0.5, 3.0, -1.0, 2.0, 0.0], k_pos=2, k_neg=1)
    assert g.tolist() == [0, 1, -1, 1, 0]
    out = score_guesses([0.5, 3.0, -1.0, 2.0, 0.0], [True, True, False, False, True], 2, 1)
    assert (out.num_correct, out.correct_pos, out.correct_neg, out.num_guesses) == (2, 1, 1, 3)


@pytest.mark.parametrize("call,message,error", [
    # accounting.audit cannot import dp_microclip: it raises ValueError (ConfigurationError is one too).
    (lambda: make_guesses([1.0, 2.0], 2, 1), "Guess fewer", ValueError),
    (lambda: make_guesses([1.0, float("nan")], 1, 0), "finite", ValueError),
    (lambda: audit_lower_bound([1.0, 2.0], [True], 1, 0, DELTA), "one coin per canary", ValueError),
    (lambda: audit_lower_bound([1.0, 2.0], [True, False], 1, 0, DELTA, beta=1.5), "beta", ValueError),
    (lambda: epsilon_lower_bound(10, 5, 6, DELTA), "num_correct <= num_guesses", ValueError),
    (lambda: AuditConfig(canary="pixels"), "canary", ConfigurationError),
    (lambda: AuditConfig(noise_multiplier=0.0), "noise=False", ConfigurationError),
    (lambda: AuditConfig(num_canaries=100, k_pos=80, k_neg=30), "between 1 and num_canaries", ConfigurationError),
])
def test_bad_input_names_the_fix(call, message, error):
    with pytest.raises(error, match=message):
        call()


# ================================================================ audits of the engine
@pytest.mark.parametrize("b", [1, 4])
def test_with_noise_the_bound_stays_below_the_engines_epsilon(b):
    result = run_audit(micro_batch_size=b, noise_multiplier=1.0, sample_rate=0.05, steps=300, seed=3)
    assert math.isfinite(result.claimed_epsilon)
    assert 0 <= result.lower_bound <= result.claimed_epsilon
    assert result.lower_bound <= result.epsilon_at_sensitivity_c  # the canaries move their group by ~C
    assert result.steps == 300 and result.micro_batch_size == b and result.num_canaries == 1000
    assert result.noise_ratio == pytest.approx(1.0, abs=0.02)  # the engine adds the z C it accounts for


def test_without_noise_the_bound_is_far_above_what_a_noisy_run_claims():
    # k_neg = 0: without noise every canary that was never sampled ties with the excluded ones at score 0
    settings = dict(noise_multiplier=1.0, sample_rate=0.02, steps=200, k_pos=400, k_neg=0, seed=4)
    noisy = run_audit(**settings)
    free = run_audit(noise=False, **settings)
    assert math.isinf(free.claimed_epsilon)  # the engine says so itself
    assert noisy.lower_bound <= noisy.claimed_epsilon < 2.0
    assert free.lower_bound > 2 * noisy.claimed_epsilon  # measured: 4.89 (400 of 400 right) against 1.86


def test_the_audit_would_catch_noise_four_times_smaller_than_claimed():
    """Power: a run at z = 0.6 cannot hide behind the epsilon of z = 2.4 (what a 4x noise bug would claim)."""
    from accounting import Ledger, Mechanism

    result = run_audit(noise_multiplier=0.6, sample_rate=0.1, steps=200, k_pos=200, k_neg=0, seed=5)
    ledger = Ledger()
    ledger.record(Mechanism(sample_rate=0.1, noise_multiplier=2.4), steps=200)
    wrong_claim = ledger.epsilon(DELTA)  # 2.65
    assert result.lower_bound > wrong_claim + 0.5  # measured: 4.17
    assert result.lower_bound <= result.claimed_epsilon


def test_micro_batches_the_audit_sees_sensitivity_c_not_2c():
    """b = 4: the claimed epsilon uses z/2 (sensitivity 2C). One-run gradient canaries cannot show the 2C.

    A canary's group-mates would have to point against that canary in particular, which keyed groups
    make impossible for many canaries at once. So the bound stays below the epsilon of the same run
    accounted with sensitivity C, and the noise along the canaries' directions is the promised z C at
    b = 4 as at b = 1 (a direct check that the engine does not add z C / 2).
    """
    common = dict(noise_multiplier=1.0, sample_rate=0.05, steps=300, k_pos=100, k_neg=0, seed=6)
    micro = run_audit(micro_batch_size=4, **common)
    single = run_audit(micro_batch_size=1, **common)
    assert micro.claimed_epsilon > 2 * micro.epsilon_at_sensitivity_c  # 33.8 (rdp) / ~30 (prv) against 5.8
    assert micro.epsilon_at_sensitivity_c == pytest.approx(single.claimed_epsilon)
    assert micro.lower_bound <= single.lower_bound + 0.5 <= micro.epsilon_at_sensitivity_c
    assert micro.noise_ratio == pytest.approx(1.0, abs=0.02) and single.noise_ratio == pytest.approx(1.0, abs=0.02)


def test_input_canaries_black_box():
    result = run_audit(canary="input", num_canaries=500, num_fillers=500, noise_multiplier=1.0, sample_rate=0.1,
                       steps=150, seed=7)
    assert result.score == "loss" and (result.k_pos, result.k_neg) == (50, 50)
    assert 0 <= result.lower_bound <= result.claimed_epsilon


# ================================================================ command line
def test_cli_json(capsys):
    code = main(["--canaries", "200", "--fillers", "200", "--steps", "50", "--sample-rate", "0.05", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_canaries"] == 200 and out["lower_bound"] <= out["claimed_epsilon"]
    assert set(out) >= {"claimed_epsilon", "lower_bound", "k_pos", "k_neg", "num_correct", "micro_batch_size",
                        "noise_multiplier", "sample_rate", "steps", "canary"}


def test_cli_no_noise_prints_null_for_infinite_epsilon(capsys):
    assert main(["--canaries", "100", "--fillers", "50", "--steps", "30", "--no-noise", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"inf"' not in out and "Infinity" not in out and "NaN" not in out
    data = json.loads(out)
    assert data["claimed_epsilon"] is None  # infinite: JSON has no infinity
    assert all(v is None or isinstance(v, (int, float, str, bool, list, dict)) for v in data.values())


@pytest.mark.parametrize("argv,message", [
    (["--sample-rate", "2"], "sample_rate"),
    (["--canaries", "ten"], "invalid int value"),
    (["--canary", "pixels"], "invalid choice"),
    (["--k-pos", "900", "--k-neg", "200"], "k_pos + k_neg"),
])
def test_cli_bad_input_exits_2_with_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("dp-microclip audit: error:")


def test_cli_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "example:" in capsys.readouterr().out


def test_docstring_examples_run():
    import doctest

    import accounting.audit
    import dp_microclip.tools.audit

    assert doctest.testmod(accounting.audit).failed == 0
    assert doctest.testmod(dp_microclip.tools.audit).failed == 0
