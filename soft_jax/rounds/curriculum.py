"""SOFT+'s curriculum: difficulty scores and orders.

Difficulty of a (prompt, response) pair, by default the perplexity of the response given the prompt in
the engraving format under the current model (what the next SFT will see); alternatives: the response's
token count, and the prompt's own perplexity (which needs no response, so it can order a whole pool
before any generation: the across-rounds curriculum).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from soft_jax.core.errors import UserError
from soft_jax.data.templates import engraving_parts
from soft_jax.experiment.config import CURRICULUM_ORDERS, DIFFICULTY_SCORES
from soft_jax.inference import scorer

ORDERS = CURRICULUM_ORDERS


def _engraved(tokenizer, prompt: str, response: str, finished: bool = True) -> tuple[list[int], list[int]]:
    head, tail, templated = engraving_parts(tokenizer, prompt, response, finished)
    return (tokenizer(head, add_special_tokens=not templated)["input_ids"],
            tokenizer(tail, add_special_tokens=False)["input_ids"])


def _perplexity(model, contexts, continuations, batch_size, mesh) -> list[float]:
    per = scorer.score_tokens(model, contexts, continuations, batch_size=batch_size, mesh=mesh)
    return [float(np.exp(-np.mean(p))) for p in per]


def response_logps(model, tokenizer, pairs, batch_size=8, mesh=None, max_len=None,
                   progress: bool = False) -> list[np.ndarray]:
    """Per-token log-probs of each response given its prompt, both in the engraving format.

    pairs: (prompt, response) or (prompt, response, finished), as training takes them; max_len (prompt,
    response) truncates as training does: the prompt on the left, the response on the right; progress: a bar."""
    parts = [_engraved(tokenizer, *pair) for pair in pairs]
    if max_len:
        parts = [(h[-max_len[0]:], t[:max_len[1]]) for h, t in parts]
    return scorer.score_tokens(model, [h for h, _ in parts], [t for _, t in parts], batch_size=batch_size,
                               mesh=mesh, progress=progress)


def response_perplexity(model, tokenizer, pairs, batch_size=8, mesh=None, max_len=None) -> list[float]:
    return [float(np.exp(-np.mean(p))) for p in response_logps(model, tokenizer, pairs, batch_size, mesh, max_len)]


def response_length(model, tokenizer, pairs, batch_size=8, mesh=None, max_len=None) -> list[float]:
    return [float(len(_engraved(tokenizer, *pair)[1])) for pair in pairs]


def prompt_perplexity(model, tokenizer, pairs, batch_size=8, mesh=None, max_len=None) -> list[float]:
    """Perplexity of the prompt's tokens under the model, given BOS (or, without one, the first token)."""
    rows = [tokenizer(pair[0], add_special_tokens=False)["input_ids"] for pair in pairs]
    if max_len:
        rows = [r[:max_len[0]] for r in rows]
    bos = tokenizer.bos_token_id
    if bos is not None:
        return _perplexity(model, [[bos]] * len(rows), rows, batch_size, mesh)
    if any(len(r) < 2 for r in rows):
        raise UserError("prompt_ppl needs a BOS token or prompts of at least two tokens; use another score")
    return _perplexity(model, [r[:1] for r in rows], [r[1:] for r in rows], batch_size, mesh)


SCORES = {"response_ppl": response_perplexity, "response_length": response_length, "prompt_ppl": prompt_perplexity}
assert tuple(SCORES) == DIFFICULTY_SCORES  # the run config's choices (soft_jax.experiment.config)


def difficulty(kind: str, model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8, mesh=None,
               max_len: tuple[int, int] | None = None) -> list[float]:
    if kind not in SCORES:
        raise UserError(f"unknown difficulty score {kind!r}; choose from {', '.join(SCORES)}")
    if not pairs:
        return []
    return SCORES[kind](model, tokenizer, pairs, batch_size=batch_size, mesh=mesh, max_len=max_len)


def order(scores: Sequence[float], how: str, seed_key: list[int]) -> np.ndarray:
    """Indices in training order. Ties keep their given order (stable sort)."""
    if how not in ORDERS:
        raise UserError(f"unknown curriculum order {how!r}; choose from {', '.join(ORDERS)}")
    n = len(scores)
    if how == "none":
        return np.arange(n)
    if how == "random":
        return np.random.default_rng(seed_key).permutation(n)
    s = np.asarray(scores, np.float64)
    return np.argsort(s if how == "easy_to_hard" else -s, kind="stable")
