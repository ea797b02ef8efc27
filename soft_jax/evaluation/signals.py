"""Degeneracy signals of open-ended answers: distinct-n, repetition, length, truncation.

Each round reports these on the open-ended answers (docs/method.md, "The collapse guard"): late rounds can
collapse into sharper, less diverse, looping output. Words are the lowercased `\\w+` tokens of an answer; n-grams never
cross from one answer into the next.

- `per_answer(text, finish)`: one answer's signals (the per-item scores a paired comparison can use).
- `summary(texts, finishes)`: a round's signals; corpus distinct-n as in Li et al. (2016): unique n-grams
  over all answers / all n-grams over all answers (not the mean of per-answer distinct-n).
- `SIGNALS`: the signals the collapse guard may use as its metric, name -> (per_answer key, higher_is_better).

An answer too short to have any n-gram of a size gets distinct-n 0.0 (an empty or one-word answer is a sign
of collapse, not of diversity) and repeated_ngram_rate 0.0 (nothing in it repeats); its length shows it.
"""

from __future__ import annotations

import re

import numpy as np

# as soft_jax.inference.sampler.FINISH_REASONS; "length": cut by the token limit
FINISH_REASONS = ("eos", "stop", "length")
REPEAT_N = 4  # repeated_ngram_rate counts word 4-grams

SIGNALS = {
    "distinct_2": ("distinct_2", True),  # share of an answer's word bigrams that are unique
    "repeated_ngram_rate": ("repeated_ngram_rate", False),  # share of its 4-grams repeating an earlier one
    "truncation_rate": ("truncated", False),  # 1.0 for an answer cut by the token limit
}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _distinct(grams: list) -> float:
    return len(set(grams)) / len(grams) if grams else 0.0


def _repeated_rate(grams: list) -> float:
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def _truncated(finish: str) -> float:
    if finish not in FINISH_REASONS:
        raise ValueError(f"finish {finish!r}: expected one of {', '.join(FINISH_REASONS)}")
    return 1.0 if finish == "length" else 0.0


def per_answer(text: str, finish: str = "eos") -> dict:
    """{distinct_1, distinct_2, repeated_ngram_rate, length (words), truncated (1.0 if cut by the limit)}."""
    tokens = words(text)
    return {"distinct_1": _distinct(ngrams(tokens, 1)), "distinct_2": _distinct(ngrams(tokens, 2)),
            "repeated_ngram_rate": _repeated_rate(ngrams(tokens, REPEAT_N)), "length": float(len(tokens)),
            "truncated": _truncated(finish)}


def summary(texts: list[str], finishes: list[str]) -> dict:
    """A round's signals: {distinct_1, distinct_2 (corpus-level), repeated_ngram_rate, length (means),
    truncation_rate, n}."""
    if len(texts) != len(finishes):
        raise ValueError(f"{len(texts)} answers but {len(finishes)} finish reasons; give one per answer")
    if not texts:
        raise ValueError("no answers to summarise")
    tokens = [words(t) for t in texts]
    rows = [per_answer(t, f) for t, f in zip(texts, finishes)]
    out = {f"distinct_{n}": _distinct([g for t in tokens for g in ngrams(t, n)]) for n in (1, 2)}
    out.update(repeated_ngram_rate=float(np.mean([r["repeated_ngram_rate"] for r in rows])),
               length=float(np.mean([r["length"] for r in rows])),
               truncation_rate=float(np.mean([r["truncated"] for r in rows])), n=len(texts))
    return out
