"""Filters over self-aligned generations (docs/method.md, "Filtering"): each drops what it targets and counts it.

A generation is kept when it has an answer and no filter objects; the first objecting filter (in
FILTERS order) is recorded as the reason, so the per-filter counts add up to the dropped total.
Every filter is `f(answer, prompt, ctx, thoughts, finish) -> bool` (True: drop), where `finish` is why
generation stopped: "eos" (end-of-turn token), "stop" (a stop string) or "length" (the token limit).
One more reason, IRRELEVANT, comes from the model rather than the text (soft_jax.rounds.relevance): it is judged
after these, on the answers they keep.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import zlib
from collections.abc import Callable, Sequence

from soft_jax.core.errors import check_fields
from soft_jax.data import Exemplar
from soft_jax.data.templates import ANSWER, THOUGHTS, USER

WORD = re.compile(r"\w+")
SENTENCE = re.compile(r"[^.!?\n]*[.!?]+|[^.!?\n]+")  # a run up to . ! ? (inclusive) or a newline
MIN_SENTENCE_WORDS = 3  # shorter fragments ("1.", "Yes.", "e.g.") never count as a repeated sentence
CODE_BLOCK = re.compile(r"```.*?(?:```|$)", re.S)  # code repeats lines legitimately: never cut inside it
# principle numbers: a line "1 (ethical). ...", "1. ..." or "1) ..."
PRINCIPLE_LINE = re.compile(r"^\s*(\d+)\s*[(.)]", re.M)
# citations: numbers right after "principle(s)", a list of them ("Principles 1 (ethical), 7 and 21"), and any
# one- or two-digit number followed by a principle-like name in parentheses ("13 (step-by-step)")
_CITED = r"\d+(?:\s*\([a-z][a-z -]{0,30}\))?"
_SEP = r"(?:\s*,\s*(?:(?:and|or|&)\s+)?|\s+(?:and|or|&)\s+)"  # ", " ", and " " and " " or "
AFTER_PRINCIPLE = re.compile(rf"\bprinciples?\s+({_CITED}(?:{_SEP}{_CITED})*)", re.I)
NAMED = re.compile(r"\b(\d{1,2})\s*\([a-z][a-z -]{0,30}\)", re.I)


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    require_marker: bool = True  # False: a completion without "Assistant:" is taken whole as the answer
    keep_truncated: bool = False  # True: keep answers cut by the token limit (trained without end of turn)
    min_words: int = 5  # answers with fewer words are dropped
    max_prompt_similarity: float = 0.9  # difflib ratio answer vs prompt above which the answer is a copy
    leak_ngram: int = 10  # an exemplar answer's run of this many words reappearing verbatim is a leak
    min_cited_principles: int = 1  # thoughts must cite this many existing principles (0: no minimum)
    repeat_ngram: int = 4  # word n-gram size of the repeated-n-gram check
    max_repeated_ngram_fraction: float = 0.4  # share of word n-grams repeating an earlier one: degenerate above
    max_line_repeats: int = 3  # the same non-empty line this many times is degenerate
    max_compression_ratio: float = 4.0  # bytes / zlib-compressed bytes above which a long text is a loop
    min_compression_chars: int = 200  # shorter texts skip the compression test (zlib's overhead dominates)
    # Dromedary-2's merge script's string rules (docs/method.md, "Filtering"), each off unless turned on:
    min_chars: int = 0  # answers shorter than this many characters are dropped (Dromedary-2: 160; 0: off)
    cut_repeated: str = "sentence"  # an answer is cut at its first repeated sentence | clause (Dromedary-2) | off
    exemplar_topics: bool = False  # drop answers using a word of the exemplars' topics their prompt does not use
    # The relevance filter (Li et al.'s instruction-following difficulty, computed from the model's scores): the
    # answer's mean per-token loss given its prompt over its loss given an empty prompt; above this the prompt
    # does not make the answer likelier, so the pair is off-topic (0: off; 1.0 is the documented default)
    max_relevance_ratio: float = 0.0

    def __post_init__(self):
        check_fields(self, [
            ("min_chars", lambda v: v >= 0, "an integer >= 0 (0: off)"),
            ("cut_repeated", lambda v: v in CUTS, " | ".join(CUTS)),
            ("max_relevance_ratio", lambda v: 0 <= v <= MAX_RELEVANCE_RATIO,
             f"between 0 (off) and {MAX_RELEVANCE_RATIO} (1.0: the prompt makes the answer no likelier)")])


CUTS = ("sentence", "clause", "off")
MAX_RELEVANCE_RATIO = 2.0  # above it a ratio would keep answers the prompt makes twice as hard to predict
CLAUSE = re.compile(r"[^.!?\n,;:]*[.!?,;:]+|[^.!?\n,;:]+")  # a run up to , ; : . ! ? (inclusive) or a newline
TOPIC_MIN_EXEMPLARS = 2  # a topic word is in the answers of at least this many exemplars ...
TOPIC_MAX_POOL_SHARE = 0.005  # ... and in at most this share of the pool's prompts
TOPIC_MIN_LETTERS = 4  # shorter words are never topic words


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def principle_numbers(principles: str) -> set[int]:
    return {int(n) for n in PRINCIPLE_LINE.findall(principles)}


def cited_principles(thoughts: str) -> set[int]:
    """The principle numbers the thoughts cite ("Principle 3 (helpful) and 13 (step-by-step) apply")."""
    lists = [m.group(1) for m in AFTER_PRINCIPLE.finditer(thoughts)]
    return {int(n) for s in lists for n in re.findall(r"\d+", s)} | {int(n) for n in NAMED.findall(thoughts)}


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw, 9))


def cut_repeated_sentence(answer: str, unit: re.Pattern = SENTENCE) -> str:
    """The answer up to the first sentence (or, with unit=CLAUSE, clause) that repeats an earlier one (Dromedary's
    post-processing; Dromedary-2's cuts at clauses).

    Sentences end at . ! ? or a newline, clauses also at , ; :; they are compared lowercased, without punctuation,
    with collapsed whitespace; fragments under MIN_SENTENCE_WORDS words (list numbers, "Yes.") and code blocks are
    skipped."""
    code = [m.span() for m in CODE_BLOCK.finditer(answer)]
    seen = set()
    for m in unit.finditer(answer):
        key = " ".join(_words(m.group()))
        if len(key.split()) < MIN_SENTENCE_WORDS or any(a <= m.start() < b for a, b in code):
            continue
        if key in seen:
            return answer[:m.start()].rstrip()
        seen.add(key)
    return answer


def cut(answer: str, how: str) -> str:
    """The answer cut as FilterConfig.cut_repeated says: at its first repeated sentence or clause, or not at all."""
    return answer if how == "off" else cut_repeated_sentence(answer, CLAUSE if how == "clause" else SENTENCE)


def topic_words(exemplars: Sequence[Exemplar], pool: Sequence[str]) -> set[str]:
    """Dromedary-2's exemplar-topic blacklist, built from the run's own data: words (of TOPIC_MIN_LETTERS letters
    or more) in the answers of at least TOPIC_MIN_EXEMPLARS exemplars and in at most TOPIC_MAX_POOL_SHARE of the
    pool's prompts. An answer using one its prompt does not use copied an exemplar's topic, not its prompt's."""
    counts: dict[str, int] = {}
    for e in exemplars:
        for w in {w for w in _words(e.answer) if len(w) >= TOPIC_MIN_LETTERS and w.isalpha()}:
            counts[w] = counts.get(w, 0) + 1
    candidates = {w for w, n in counts.items() if n >= TOPIC_MIN_EXEMPLARS}
    in_pool = dict.fromkeys(candidates, 0)
    for prompt in pool:
        for w in candidates.intersection(_words(prompt)):
            in_pool[w] += 1
    return {w for w in candidates if in_pool[w] <= TOPIC_MAX_POOL_SHARE * max(1, len(pool))}


class Context:
    """What the filters compare against: the exemplar texts and the principles, precomputed once per round."""

    def __init__(self, exemplars: Sequence[Exemplar], principles: str, config: FilterConfig,
                 pool: Sequence[str] = ()):
        """pool: the prompt pool's texts (the exemplar-topic blacklist counts its words there)."""
        self.config = config
        n = config.leak_ngram
        self.exemplar_ngrams = {g for e in exemplars for g in _ngrams(_words(e.answer), n)}
        self.principle_lines = [line.strip() for line in principles.splitlines() if len(line.strip()) > 30]
        self.principle_numbers = principle_numbers(principles)
        self.topic_words = topic_words(exemplars, pool) if config.exemplar_topics else set()


def truncated(answer: str, prompt: str, ctx: Context, thoughts: str, finish: str) -> bool:
    """Answers cut by the token limit (unless keep_truncated): they end mid-sentence."""
    return finish == "length" and not ctx.config.keep_truncated


def too_short(answer: str, prompt: str, ctx: Context, thoughts: str, finish: str) -> bool:
    """Answers with fewer than min_words words, or (Dromedary-2) fewer than min_chars characters."""
    return len(_words(answer)) < ctx.config.min_words or len(answer.strip()) < ctx.config.min_chars


def exemplar_topic(answer: str, prompt: str, ctx: Context, thoughts: str, finish: str) -> bool:
    """Answers using a word of the exemplars' topics (Context.topic_words) that their prompt does not use."""
    return bool(ctx.topic_words) and bool(ctx.topic_words.intersection(_words(answer)) - set(_words(prompt)))


def copies_prompt(answer: str, prompt: str, ctx: Context, thoughts: str, finish: str) -> bool:
    """Answers that repeat the prompt (difflib ratio above max_prompt_similarity)."""
    a, p = " ".join(_words(answer)), " ".join(_words(prompt))
    return a == p or difflib.SequenceMatcher(None, a, p).ratio() > ctx.config.max_prompt_similarity


def leaked(answer: str, prompt: str, ctx: Context, thoughts: str, finish: str) -> bool:
    """Turn markers, principle lines, or verbatim exemplar text in the answer."""
    if any(m in answer for m in (USER, ANSWER, THOUGHTS, "internal thoughts")):
        return True
    if any(line in answer for line in ctx.principle_lines):
        return True
    return any(g in ctx.exemplar_ngrams for g in _ngrams(_words(answer), ctx.config.leak_ngram))


def bad_principles(answer: str, prompt: str, ctx: Context, thoughts: str, finish: str) -> bool:
    """Thoughts citing a principle number that does not exist, or fewer than min_cited_principles that do."""
    cited = cited_principles(thoughts)
    return bool(cited - ctx.principle_numbers) or len(cited) < ctx.config.min_cited_principles


def repetitive(answer: str, prompt: str, ctx: Context, thoughts: str, finish: str) -> bool:
    """Degenerate repetition: many repeated word n-grams, a line repeated max_line_repeats times, or (for
    texts of min_compression_chars or more) a zlib compression ratio above max_compression_ratio."""
    c = ctx.config
    grams = _ngrams(_words(answer), c.repeat_ngram)
    if len(grams) >= 8 and 1 - len(set(grams)) / len(grams) > c.max_repeated_ngram_fraction:
        return True
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    if any(lines.count(line) >= c.max_line_repeats for line in set(lines)):
        return True
    return len(answer) >= c.min_compression_chars and compression_ratio(answer) > c.max_compression_ratio


Filter = Callable[[str, str, Context, str, str], bool]
FILTERS: dict[str, Filter] = {
    "truncated": truncated,
    "too_short": too_short,
    "copies_prompt": copies_prompt,
    "leaked_exemplar_or_marker": leaked,
    "bad_principles": bad_principles,
    "repetition": repetitive,
    "exemplar_topic": exemplar_topic,
}
NO_ANSWER = "no_answer_marker"
IRRELEVANT = "irrelevant"  # the relevance filter's reason (it needs the model's scores: soft_jax.rounds.relevance)
FINISHES = ("eos", "stop", "length")
REASONS = (NO_ANSWER, *FILTERS, IRRELEVANT)


def verdict(answer: str | None, prompt: str, ctx: Context, thoughts: str = "", finish: str = "eos",
            skip: Sequence[str] = ()) -> str | None:
    """None when the answer is kept, else the name of the first filter that drops it.

    thoughts: the model's internal thoughts (checked for principle citations); finish: "eos", "stop" or
    "length", why generation stopped; skip: filters not to apply (pairs without thoughts skip bad_principles)."""
    if finish not in FINISHES:
        raise ValueError(f"finish must be one of {FINISHES}, not {finish!r}")
    if answer is None:
        return NO_ANSWER
    return next((name for name, f in FILTERS.items()
                 if name not in skip and f(answer, prompt, ctx, thoughts, finish)), None)


def counts(reasons: Sequence[str | None]) -> dict[str, int]:
    out = {"kept": sum(r is None for r in reasons)}
    out.update({name: sum(r == name for r in reasons) for name in REASONS})
    return out
