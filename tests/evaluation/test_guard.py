"""The collapse guard (soft_jax.evaluation.guard): a round is better or worse than the best only beyond noise (the
paired bootstrap interval of the per-item difference); the best round moves, and the run stops after `patience`
worse rounds. Its use in a run: tests/rounds/test_experiments.py (a degeneracy signal as the metric)."""

import numpy as np

from soft_jax.evaluation import guard


def _rounds(*items):
    return [{"round": t, "items": list(x)} for t, x in enumerate(items)]


def test_guard_does_not_call_noise_a_better_round():
    # issue #15: a -0.0015 nat change of the validation loss made round 1 "best"
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.5, 26)
    noisy = base + rng.normal(-0.0015, 0.05, 26)
    d = guard.decide(_rounds(base, noisy), "valid_nll", patience=1)
    assert d["best_round"] == 0 and d["comparisons"]["1"]["verdict"] == "tie" and d["stopped"] is None
    # with no noise allowance the point estimate decides, as before
    point = guard.decide(_rounds(base, noisy), "valid_nll", patience=1, confidence=0)
    assert point["comparisons"]["1"]["verdict"] == ("better" if np.mean(noisy) < np.mean(base) else "worse")


def test_guard_moves_to_a_better_round_and_stops_after_patience_worse_rounds():
    rng = np.random.default_rng(1)
    r0 = rng.normal(2.0, 0.5, 40)
    r1 = r0 - 0.2 + rng.normal(0, 0.02, 40)  # clearly better
    r2 = r1 + 0.3 + rng.normal(0, 0.02, 40)  # clearly worse than round 1
    r3 = r1 + 0.4 + rng.normal(0, 0.02, 40)
    d = guard.decide(_rounds(r0, r1, r2, r3), "valid_nll", patience=2)
    assert d["best_round"] == 1 and d["worse"] == 2 and "keeping round 1" in d["stopped"]
    assert [d["comparisons"][t]["vs"] for t in ("1", "2", "3")] == [0, 1, 1]
    assert [d["comparisons"][t]["verdict"] for t in ("1", "2", "3")] == ["better", "worse", "worse"]
    assert guard.decide(_rounds(r0, r1, r2), "valid_nll", patience=2)["stopped"] is None
    # accuracy-like metrics: higher is better
    acc = guard.decide(_rounds(1 - (r0 > 2), 1 - (r0 > 2.5)), "hhh", patience=1)
    assert acc["comparisons"]["1"]["diff"] > 0 and acc["comparisons"]["1"]["verdict"] in ("better", "tie")


def test_an_lm_eval_metric_takes_its_direction_from_its_task():
    rng = np.random.default_rng(2)
    r0 = (rng.random(60) < 0.3).astype(float)
    r1 = np.maximum(r0, (rng.random(60) < 0.5).astype(float))  # clearly more items right
    assert guard.lm_eval_metric("lm_eval:arc_easy:acc") == ("arc_easy", "acc")
    assert guard.lm_eval_metric("lm_eval:arc_easy") is None and guard.lm_eval_metric("hhh") is None
    up = guard.decide(_rounds(r0, r1), "lm_eval:arc_easy:acc", patience=1, higher=True)
    down = guard.decide(_rounds(r0, r1), "lm_eval:arc_easy:acc", patience=1, higher=False)
    assert (up["best_round"], up["comparisons"]["1"]["verdict"]) == (1, "better")
    assert (down["best_round"], down["comparisons"]["1"]["verdict"]) == (0, "worse")
