"""Paired comparisons of two rounds on the same items, for the collapse guard.

docs/method.md ("The collapse guard"): a round is "worse" only beyond noise, judged by a paired comparison
over the validation items.
`paired_bootstrap` gives a percentile bootstrap interval of the mean per-item difference (candidate minus
reference), resampling items so that each resampled item keeps its own pair of scores; `verdict` reads the
interval as better / worse / tie. numpy only.
"""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a, b, confidence: float = 0.95, resamples: int = 2000, seed=0) -> dict:
    """Mean of b - a over the same items with a seeded percentile bootstrap interval.

    a: per-item scores of the reference round; b: the candidate's scores of the same items, in the same order.
    seed: an int or a list of ints (numpy's default_rng seed), so callers can key it, e.g. [seed, round].
    Returns {"diff", "low", "high", "confidence", "n"}. confidence=0 allows no noise: low == high == diff.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired scores need two 1-D arrays of the same length, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired scores are empty; there is nothing to compare")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores contain NaN or infinity")
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    diff = float(np.mean(b - a))
    low = high = diff
    if confidence > 0:
        idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
        means = (b[idx] - a[idx]).mean(axis=1)  # the same items for both rounds: that is the pairing
        tail = (1.0 - confidence) / 2.0
        low, high = (float(q) for q in np.quantile(means, [tail, 1.0 - tail]))
    return {"diff": diff, "low": low, "high": high, "confidence": float(confidence), "n": int(a.size)}


def verdict(ci: dict, higher_is_better: bool, tolerance: float = 0.0) -> str:
    """"better", "worse" or "tie": better or worse only when the whole interval clears +-tolerance."""
    low, high = ci["low"], ci["high"]
    if not higher_is_better:  # mirror: a drop of a lower-is-better score is a gain
        low, high = -high, -low
    if low > tolerance:
        return "better"
    if high < -tolerance:
        return "worse"
    return "tie"
