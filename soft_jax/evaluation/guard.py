"""The collapse guard (claim 3; docs/method.md, "The collapse guard"): which round is best, and when to stop.

Rounds are compared on the same validation items: the per-item scores of a round and of the best round so
far give a paired bootstrap interval of the mean difference (soft_jax.evaluation.stats). A round replaces the best
only when it is better beyond noise, and counts as worse only when it is worse beyond noise; after
`patience` worse rounds since the best, the run stops and keeps the best. With confidence 0 the point
estimate decides (the interval has no width).

The decision is a pure function of every evaluated round's per-item scores, so a resumed run (or one
whose last round is redone) recomputes it from the rounds' eval.json files instead of patching state.
"""

from __future__ import annotations

from collections.abc import Sequence

from soft_jax.evaluation import signals, stats

# metric -> higher is better. valid_nll: mean response NLL per held-out pair; the tasks: per-item accuracy
# (MC2: the true-answer mass); the degeneracy signals of each open-ended answer (soft_jax.evaluation.signals).
METRICS = {"valid_nll": False, "hhh": True, "truthfulqa_mc1": True, "truthfulqa_mc2": True,
           **{name: higher for name, (_, higher) in signals.SIGNALS.items()}}
# An lm-eval metric of a task the run evaluates (eval.lm_eval.tasks), per-item values compared: "lm_eval:TASK:METRIC"
# (which way is better: the task's own higher_is_better, recorded with the round's validation)
LM_EVAL = "lm_eval:"


def lm_eval_metric(metric: str) -> tuple[str, str] | None:
    """(task, metric) of an "lm_eval:TASK:METRIC" validation metric, else None."""
    if not metric.startswith(LM_EVAL) or metric.count(":") != 2:
        return None
    task, name = metric[len(LM_EVAL):].split(":")
    return (task, name) if task and name else None


def decide(rounds: Sequence[dict], metric: str, patience: int, confidence: float = 0.95, tolerance: float = 0.0,
           resamples: int = 2000, seed: int = 0, higher: bool | None = None) -> dict:
    """{"best_round", "comparisons": {round: interval vs the best before it, with "vs" and "verdict"},
    "worse": worse rounds since the best, "stopped": why the run stops, or None}.

    rounds: {"round": t, "items": per-item scores} in round order, round 0 (the base model) first.
    higher: whether higher is better; None: METRICS says (an lm-eval metric's comes from its task)."""
    higher = METRICS[metric] if higher is None else higher
    best, worse, comparisons, stopped = None, 0, {}, None
    for r in rounds:
        t = r["round"]
        if best is None:
            best, best_items = t, r["items"]
            continue
        ci = stats.paired_bootstrap(best_items, r["items"], confidence, resamples, seed=[seed, t])
        verdict = stats.verdict(ci, higher, tolerance)
        comparisons[str(t)] = {"vs": best, "verdict": verdict, **ci}
        if verdict == "better":
            best, best_items, worse = t, r["items"], 0
        elif verdict == "worse":
            worse += 1
        if worse >= patience and stopped is None:
            stopped = (f"collapse guard: validation {metric} worse than round {best} beyond noise "
                       f"({confidence:.0%} paired bootstrap) in {worse} round(s); keeping round {best}")
    return {"best_round": best, "comparisons": comparisons, "worse": worse, "stopped": stopped}


def describe(c: dict | None) -> str:
    """One table cell: a comparison's difference to the best round before it, with its interval and verdict."""
    if not c:
        return "-"
    return f"{c['diff']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] vs r{c['vs']}: {c['verdict']}"
