"""Filters over self-aligned generations (METHOD.md): each drops what it targets and counts it.

A generation is kept when it has an answer and no filter objects; the first objecting filter (in
FILTERS order) is recorded as the reason, so the per-filter counts add up to the dropped total.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Callable, Sequence

from soft_jax.data import Exemplar
from soft_jax.data.templates import ANSWER, THOUGHTS, USER

WORD = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    require_marker: bool = True  # False: a completion without "Assistant:" is taken whole as the answer
    min_words: int = 5  # answers with fewer words are dropped
    max_prompt_similarity: float = 0.9  # difflib ratio answer vs prompt above which the answer is a copy
    leak_ngram: int = 10  # an exemplar answer's run of this many words reappearing verbatim is a leak
    max_repeated_ngram_fraction: float = 0.5  # share of repeated word 3-grams above which text is degenerate
    max_line_repeats: int = 3  # the same non-empty line this many times is degenerate


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


class Context:
    """What the filters compare against: the exemplar texts, precomputed once per round."""

    def __init__(self, exemplars: Sequence[Exemplar], principles: str, config: FilterConfig):
        self.config = config
        n = config.leak_ngram
        self.exemplar_ngrams = {g for e in exemplars for g in _ngrams(_words(e.answer), n)}
        self.principle_lines = [line.strip() for line in principles.splitlines() if len(line.strip()) > 30]


def too_short(answer: str, prompt: str, ctx: Context) -> bool:
    return len(_words(answer)) < ctx.config.min_words


def copies_prompt(answer: str, prompt: str, ctx: Context) -> bool:
    a, p = " ".join(_words(answer)), " ".join(_words(prompt))
    return a == p or difflib.SequenceMatcher(None, a, p).ratio() > ctx.config.max_prompt_similarity


def leaked(answer: str, prompt: str, ctx: Context) -> bool:
    """Turn markers, principle lines, or verbatim exemplar text in the answer."""
    if any(m in answer for m in (USER, ANSWER, THOUGHTS, "internal thoughts")):
        return True
    if any(line in answer for line in ctx.principle_lines):
        return True
    return any(g in ctx.exemplar_ngrams for g in _ngrams(_words(answer), ctx.config.leak_ngram))


def repetitive(answer: str, prompt: str, ctx: Context) -> bool:
    grams = _ngrams(_words(answer), 3)
    if len(grams) >= 8 and 1 - len(set(grams)) / len(grams) > ctx.config.max_repeated_ngram_fraction:
        return True
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    return any(lines.count(line) >= ctx.config.max_line_repeats for line in set(lines))


FILTERS: dict[str, Callable[[str, str, Context], bool]] = {
    "too_short": too_short,
    "copies_prompt": copies_prompt,
    "leaked_exemplar_or_marker": leaked,
    "repetition": repetitive,
}
NO_ANSWER = "no_answer_marker"
REASONS = (NO_ANSWER, *FILTERS)


def verdict(answer: str | None, prompt: str, ctx: Context) -> str | None:
    """None when the answer is kept, else the name of the first filter that drops it."""
    if answer is None:
        return NO_ANSWER
    return next((name for name, f in FILTERS.items() if f(answer, prompt, ctx)), None)


def counts(reasons: Sequence[str | None]) -> dict[str, int]:
    out = {"kept": sum(r is None for r in reasons)}
    out.update({name: sum(r == name for r in reasons) for name in REASONS})
    return out
