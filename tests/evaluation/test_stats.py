"""The collapse guard's paired comparison: the bootstrap interval and the better / worse / tie verdict."""

import numpy as np
import pytest

from soft_jax.evaluation.stats import paired_bootstrap, verdict


def test_identical_rounds_differ_by_nothing():
    a = np.random.default_rng(0).normal(2.0, 1.0, 25)
    ci = paired_bootstrap(a, a.copy())
    assert ci["diff"] == ci["low"] == ci["high"] == 0.0
    assert ci["n"] == 25 and ci["confidence"] == 0.95
    assert verdict(ci, higher_is_better=True) == verdict(ci, higher_is_better=False) == "tie"


def test_a_large_consistent_improvement_is_better():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, 40)
    b = a + 1.0 + rng.normal(0.0, 0.2, 40)
    ci = paired_bootstrap(a, b)
    assert 0.8 < ci["low"] < ci["diff"] < ci["high"] < 1.2
    assert verdict(ci, higher_is_better=True) == "better"
    assert verdict(ci, higher_is_better=False) == "worse"


def test_pure_noise_is_a_tie():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, 40)
    b = a + rng.normal(0.0, 1.0, 40)  # true mean difference 0
    ci = paired_bootstrap(a, b)
    assert ci["low"] < 0.0 < ci["high"]
    assert verdict(ci, higher_is_better=True) == verdict(ci, higher_is_better=False) == "tie"


def test_a_tiny_change_on_a_noisy_set_is_not_worse():
    rng = np.random.default_rng(3)
    a = rng.normal(3.0, 1.0, 48)
    noise = rng.normal(0.0, 0.5, 48)
    b = a + noise - noise.mean() - 0.0015  # mean difference exactly -0.0015, per-item sd 0.5
    ci = paired_bootstrap(a, b)
    assert ci["diff"] == pytest.approx(-0.0015)
    assert verdict(ci, higher_is_better=True) == "tie"
    assert verdict(ci, higher_is_better=False) == "tie"


def test_interval_coverage_is_close_to_nominal():
    # A 90% percentile-bootstrap interval of a mean of 30 items undercovers a little (about 0.88 over 2000
    # trials of this setup). 200 trials give a binomial sd of about 0.023, so [0.82, 0.95] is roughly +-3 sd
    # around that and holds the nominal 0.90; an 80% interval (about 0.77) or an unpaired one (about 1.0) fails.
    rng, true_diff, covered = np.random.default_rng(123), 0.3, 0
    for trial in range(200):
        a = rng.normal(0.0, 1.0, 30)
        b = a + true_diff + rng.normal(0.0, 1.0, 30)
        ci = paired_bootstrap(a, b, confidence=0.90, seed=trial)
        covered += ci["low"] <= true_diff <= ci["high"]
    assert 0.82 <= covered / 200 <= 0.95


def test_pairing_removes_the_spread_between_items():
    a = np.random.default_rng(4).normal(0.0, 10.0, 30)  # items differ a lot from each other
    b = a + 0.1
    ci = paired_bootstrap(a, b)
    assert ci["low"] > 0.0 and ci["low"] == pytest.approx(0.1) and ci["high"] == pytest.approx(0.1)
    assert verdict(ci, higher_is_better=True) == "better"
    half_width = 1.96 * np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)  # an unpaired interval
    assert half_width > 0.1 * 10, "an unpaired comparison would see a tie here"


def test_zero_confidence_allows_no_noise():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.0, 1.0, 20), rng.normal(0.01, 1.0, 20)
    ci = paired_bootstrap(a, b, confidence=0.0)
    assert ci["low"] == ci["high"] == ci["diff"] == pytest.approx(np.mean(b - a))


def test_seeded_and_deterministic():
    rng = np.random.default_rng(6)
    a, b = rng.normal(0.0, 1.0, 20), rng.normal(0.0, 1.0, 20)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)


@pytest.mark.parametrize("a,b", [([1.0, 2.0], [1.0]), ([], []), ([1.0, float("nan")], [1.0, 2.0])])
def test_refuses_mismatched_empty_or_nan_scores(a, b):
    with pytest.raises(ValueError):
        paired_bootstrap(a, b)


@pytest.mark.parametrize("low,high,tol,higher,expected", [
    (0.1, 0.3, 0.0, True, "better"),
    (-0.3, -0.1, 0.0, True, "worse"),
    (-0.1, 0.3, 0.0, True, "tie"),
    (0.1, 0.3, 0.0, False, "worse"),
    (-0.3, -0.1, 0.0, False, "better"),
    (-0.1, 0.3, 0.0, False, "tie"),
    (0.1, 0.3, 0.2, True, "tie"),      # the interval must clear the tolerance, not just zero
    (0.25, 0.3, 0.2, True, "better"),
    (-0.3, -0.1, 0.2, True, "tie"),
    (-0.3, -0.25, 0.2, True, "worse"),
    (0.1, 0.3, 0.2, False, "tie"),
    (0.25, 0.3, 0.2, False, "worse"),
    (-0.3, -0.25, 0.2, False, "better"),
    (-0.3, -0.1, 0.2, False, "tie"),
])
def test_verdict_both_directions_and_tolerance(low, high, tol, higher, expected):
    assert verdict({"low": low, "high": high}, higher_is_better=higher, tolerance=tol) == expected
