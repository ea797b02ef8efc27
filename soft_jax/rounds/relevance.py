"""The relevance filter (docs/method.md, "Filtering"): an answer its prompt does not make likelier answers
another question.

The statistic is Li et al.'s (2023) instruction-following difficulty (IFD): the answer's mean per-token loss
(cross-entropy, nats) given its prompt in the engraving format, over its mean loss given an empty prompt in the same
format. It is scale-free (a ratio of two losses of the same tokens in the same unit): below 1 the prompt helps
predict the answer, at 1 or above it does not. `filters.max_relevance_ratio` drops pairs above it (0: off; 1.0 is
the documented threshold). Both losses come from one teacher-forced scoring call over the answers: the empty
prompt's head is the same for every pair, so the scorer runs it once; the losses given the prompt are the ones
SOFT+'s response_ppl difficulty needs, which a round reuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from soft_jax.data import filters
from soft_jax.rounds import curriculum


def losses(model, tokenizer, pairs: Sequence[tuple], batch_size: int = 8, mesh=None,
           max_len: tuple[int, int] | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(mean per-token loss of each answer given its prompt, the same given an empty prompt), float64 [pairs].

    pairs: (prompt, response) or (prompt, response, finished), as training takes them; max_len truncates as training
    does (curriculum.response_logps)."""
    if not pairs:
        return np.zeros(0), np.zeros(0)
    empty = [("", *pair[1:]) for pair in pairs]
    logps = curriculum.response_logps(model, tokenizer, list(pairs) + empty, batch_size, mesh, max_len, progress)
    mean = np.asarray([-float(np.mean(p)) for p in logps], np.float64)
    return mean[:len(pairs)], mean[len(pairs):]


def ratios(with_prompt: np.ndarray, alone: np.ndarray) -> np.ndarray:
    """The IFD ratio of each pair: its loss given the prompt over its loss alone."""
    return np.asarray(with_prompt, np.float64) / np.maximum(np.asarray(alone, np.float64), 1e-12)


def judge(rows: list[dict], model, tokenizer, config: filters.FilterConfig, batch_size: int = 8, mesh=None,
          max_len: tuple[int, int] | None = None, prompt=lambda r: r["prompt"], progress: bool = False) -> list[dict]:
    """Rows (dicts with an "answer"; "kept" ones are judged) with "relevance" (the ratio) and "answer_ppl" (the
    answer's perplexity given its prompt) set on each judged row, and those above config.max_relevance_ratio
    marked dropped by filters.IRRELEVANT. Rows the string filters dropped, and every row when the filter is off,
    are returned as they are. prompt(row): the row's user turn."""
    if not config.max_relevance_ratio:
        return rows
    judged = [i for i, r in enumerate(rows) if r["kept"]]
    pairs = [(prompt(rows[i]), rows[i]["answer"], rows[i].get("finish", "eos") != "length") for i in judged]
    given, alone = losses(model, tokenizer, pairs, batch_size, mesh, max_len, progress)
    out = list(rows)
    for i, loss, ratio in zip(judged, given, ratios(given, alone)):
        drop = bool(ratio > config.max_relevance_ratio)
        out[i] = {**rows[i], "relevance": float(ratio), "answer_ppl": float(np.exp(loss)),
                  **({"kept": False, "dropped_by": filters.IRRELEVANT} if drop else {})}
    return out


def filter_pairs(rows: list[dict], config: filters.FilterConfig, exemplars, principles: str, open_model=None,
                 batch_size: int = 8, max_len: tuple[int, int] | None = None) -> list[dict]:
    """`soft-jax data filter`: every row of a pairs file ({prompt, response}; `thoughts` and `finish` where present)
    with its response cut as config.cut_repeated says, "kept", and "dropped_by" (the first filter that drops it;
    bad_principles only judges rows with thoughts, truncated only rows with a finish). The exemplar-topic words
    count the rows' own prompts as the pool. open_model() -> (model, tokenizer) is called only when the relevance
    filter is on."""
    ctx = filters.Context(exemplars, principles, config, [r["prompt"] for r in rows])
    out = []
    for r in rows:
        answer = filters.cut(r["response"], config.cut_repeated)
        skip = [name for name, key in (("bad_principles", "thoughts"), ("truncated", "finish")) if key not in r]
        reason = filters.verdict(answer, r["prompt"], ctx, r.get("thoughts", ""), r.get("finish", "eos"), skip)
        out.append({**r, "response": answer, "answer": answer, "kept": reason is None, "dropped_by": reason})
    if config.max_relevance_ratio and any(r["kept"] for r in out):
        model, tokenizer = open_model()
        out = judge(out, model, tokenizer, config, batch_size, max_len=max_len, progress=True)
    return [{k: v for k, v in r.items() if k != "answer"} for r in out]
