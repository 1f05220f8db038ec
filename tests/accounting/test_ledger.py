"""The ledger: recording, merging, noise toggles, budgets, checkpoints."""

from __future__ import annotations

import json
import math

import pytest

import accounting
from accounting import Ledger, Mechanism


def _mech(z=1.0, b=1, **kw):
    return Mechanism(sample_rate=kw.pop("q", 0.01), noise_multiplier=z, micro_batch_size=b, **kw)


def test_identical_consecutive_steps_are_merged():
    ledger = Ledger()
    for _ in range(5):
        ledger.record(_mech())
    ledger.record(_mech(z=2.0), steps=3)
    ledger.record(_mech())
    assert [e.steps for e in ledger.entries] == [5, 3, 1]
    assert ledger.steps == 9


def test_micro_batches_halve_the_accountant_noise():
    ledger = Ledger()
    ledger.record(_mech(z=1.1, b=8), 10)
    assert ledger.history()[0].noise_multiplier == pytest.approx(0.55)


def test_a_noise_free_step_makes_epsilon_infinite_for_ever():
    ledger = Ledger()
    ledger.record(_mech(), 100)
    finite = ledger.epsilon(1e-5, "rdp")
    assert 0 < finite < math.inf
    ledger.record(_mech(z=None))  # the toggle: noise off for one step
    ledger.record(_mech(), 100)
    assert ledger.first_nonprivate_step == 100
    for name in accounting.ACCOUNTANTS:
        assert ledger.epsilon(1e-5, name) == math.inf


def test_noise_free_steps_of_unaccountable_shape_are_recorded_not_refused():
    # Adaptive clipping without noise is the paper's Algorithm 1: not DP, epsilon inf, but allowed.
    ledger = Ledger()
    ledger.record(_mech(z=0.0, clipping="adaptive", b=4, grouping="contiguous"))
    assert ledger.epsilon(1e-5, "rdp") == math.inf


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clipping="adaptive"), "adaptive"),
        (dict(b=4, grouping="contiguous"), "contiguous"),
        (dict(sampling="shuffle"), "shuffle"),
    ],
)
def test_noisy_steps_without_a_guarantee_are_refused_and_leave_the_ledger_unchanged(kwargs, match):
    ledger = Ledger()
    ledger.record(_mech(), 10)
    with pytest.raises(accounting.PrivacyRefusal, match=match):
        ledger.record(_mech(**kwargs))
    assert ledger.steps == 10


def test_mixing_adjacencies_is_refused():
    ledger = Ledger()
    ledger.record(_mech())
    with pytest.raises(accounting.PrivacyRefusal, match="adjacency"):
        ledger.record(_mech(adjacency="replace_one"))


def test_epsilon_after_predicts_without_recording():
    ledger = Ledger()
    ledger.record(_mech(), 100)
    predicted = ledger.epsilon_after(_mech(), 50, 1e-5, "rdp")
    assert ledger.steps == 100
    ledger.record(_mech(), 50)
    assert ledger.epsilon(1e-5, "rdp") == pytest.approx(predicted)
    assert ledger.epsilon_after(_mech(), 0, 1e-5, "rdp") == pytest.approx(predicted)


def test_state_dict_is_json_and_round_trips():
    ledger = Ledger()
    ledger.record(_mech(z=1.3, b=8), 40)
    ledger.record(_mech(z=None), 1)
    state = json.loads(json.dumps(ledger.state_dict()))
    again = Ledger.from_state_dict(state)
    assert again.entries == ledger.entries
    assert again.epsilon(1e-5, "rdp") == math.inf


def test_state_dict_is_revalidated_on_load():
    ledger = Ledger()
    ledger.record(_mech(), 5)
    state = ledger.state_dict()
    state["entries"][0]["mechanism"]["clipping"] = "adaptive"
    with pytest.raises(accounting.PrivacyRefusal, match="adaptive"):
        Ledger().load_state_dict(state)
    with pytest.raises(ValueError, match="Not a ledger state_dict"):
        Ledger().load_state_dict({"entries": []})
    state = ledger.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        Ledger().load_state_dict(state)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_bad_step_counts_are_refused(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        Ledger().record(_mech(), steps)


def test_record_takes_a_mechanism():
    with pytest.raises(TypeError, match="accounting.Mechanism"):
        Ledger().record((1.0, 0.01, 10))
