"""The rule table (accounting/sensitivity.py) and the Mechanism's validation."""

from __future__ import annotations

import math

import pytest

from accounting import Mechanism, PrivacyRefusal, effective_noise_multiplier, sensitivity


@pytest.mark.parametrize(
    "b, adjacency, contribution, distance",
    [(1, "add_remove", 1, 1), (2, "add_remove", 2, 2), (32, "add_remove", 2, 2),
     (1, "replace_one", 1, 2), (8, "replace_one", 2, 4)],
)
def test_rule_table(b, adjacency, contribution, distance):
    m = Mechanism(sample_rate=0.01, noise_multiplier=3.0, micro_batch_size=b, adjacency=adjacency)
    s = sensitivity(m)
    assert (s.contribution, s.neighbour_distance) == (contribution, distance)
    assert effective_noise_multiplier(m) == pytest.approx(3.0 / contribution)


@pytest.mark.parametrize("clipping", ["fixed", "per_layer", "normalize"])
def test_bounded_clipping_modes_follow_the_fixed_rule(clipping):
    m = Mechanism(sample_rate=0.01, noise_multiplier=2.0, micro_batch_size=4, clipping=clipping)
    assert effective_noise_multiplier(m) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clipping="adaptive"), r'clipping="adaptive".*Use clipping="fixed"'),
        (dict(micro_batch_size=4, grouping="contiguous"), r'contiguous.*grouping="keyed"'),
        (dict(sampling="shuffle"), r"not Poisson sampling.*engine.data_loader"),
    ],
)
def test_refusals_name_the_problem_and_the_fix(kwargs, match):
    m = Mechanism(sample_rate=0.01, noise_multiplier=1.0, **kwargs)
    with pytest.raises(PrivacyRefusal, match=match):
        effective_noise_multiplier(m)


def test_contiguous_b1_is_per_example_and_accountable():
    m = Mechanism(sample_rate=0.01, noise_multiplier=1.0, micro_batch_size=1, grouping="contiguous")
    assert effective_noise_multiplier(m) == 1.0


@pytest.mark.parametrize("z", [None, 0.0])
def test_noise_free_steps_have_zero_effective_noise(z):
    assert effective_noise_multiplier(Mechanism(sample_rate=0.01, noise_multiplier=z, clipping="adaptive")) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sample_rate=0.0), r"sample_rate must be in \(0, 1\]"),
        (dict(sample_rate=1.5), r"sample_rate must be in \(0, 1\]"),
        (dict(noise_multiplier=-1.0), "noise_multiplier must be None"),
        (dict(noise_multiplier=math.inf), "noise_multiplier must be None"),
        (dict(micro_batch_size=0), "micro_batch_size must be an integer >= 1"),
        (dict(micro_batch_size=2.5), "micro_batch_size must be an integer >= 1"),
        (dict(adjacency="zero_out"), "adjacency must be one of"),
        (dict(grouping="random"), "grouping must be one of"),
        (dict(sampling="fixed"), "sampling must be one of"),
        (dict(clipping="auto"), "clipping must be one of"),
    ],
)
def test_mechanism_validation(kwargs, match):
    args = dict(sample_rate=0.01, noise_multiplier=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Mechanism(**args)


def test_numpy_scalars_are_normalised():
    import numpy as np

    m = Mechanism(sample_rate=np.float32(0.25), noise_multiplier=np.float64(1.0), micro_batch_size=np.int64(4))
    assert type(m.sample_rate) is float and type(m.micro_batch_size) is int
    assert m == Mechanism(sample_rate=0.25, noise_multiplier=1.0, micro_batch_size=4)
