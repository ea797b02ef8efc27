"""Benchmark contamination: word n-grams that the training inputs share with the evaluation sets.

`find_overlaps()` compares what a run trains on or is steered by -- the prompt pool (prompt + input), the exemplars
(prompt, thoughts, answer) and the validation pairs (prompt + response) -- with what it is scored on: the
HHH and TruthfulQA MC1 / MC2 items (question and every choice) and the open-ended questions. A shared word
13-gram is the usual contamination test (GPT-3); a shared 8-gram catches copied sentences that a 13-gram
misses. Words are the lowercased alphanumeric runs, so case, punctuation and spacing do not hide a copy.
Topics may repeat (a prompt about the 10% brain myth is fine); copied wording may not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable

from soft_jax import data
from soft_jax.core import storage
from soft_jax.core.errors import UserError

SIZES = (13, 8)
TRAIN = ("pool", "exemplars", "validation")
EVAL = ("hhh", "truthfulqa_mc1", "truthfulqa_mc2", "questions")
_WORD = re.compile(r"[^\W_]+")

Item = tuple[str, list[str]]  # (id, its texts; n-grams never span two texts)


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def train_items(pool: list[dict], exemplars: list, validation: list[dict]) -> dict[str, list[Item]]:
    """The training side's items from loaded rows (load_prompts', load_exemplars', load_pairs')."""
    return {
        "pool": [(p["prompt_id"], [p["prompt"], p["input"]]) for p in pool],
        "exemplars": [(e.id, [e.prompt, e.thoughts, e.answer]) for e in exemplars],
        "validation": [(v["id"], [v["prompt"], v["response"]]) for v in validation],
    }


def train_sources(pool: str = "", exemplars: str = "", validation: str = "") -> dict[str, list[Item]]:
    """The training side's items; "" stands for the built-in asset."""
    return train_items(data.load_prompts(pool), data.load_exemplars(exemplars), data.load_pairs(validation))


def eval_sources(truthfulqa_file: str | None = None, questions: str = "") -> dict[str, list[Item]]:
    """The evaluation side's items: HHH ids are hhh/SUBSET/INDEX, TruthfulQA ids TASK/INDEX (0-based)."""
    from soft_jax import evaluation

    hhh, seen = [], {}
    for item in evaluation.load_items("hhh"):
        k = seen[item.subset] = seen.get(item.subset, -1) + 1
        hhh.append((f"hhh/{item.subset}/{k}", [item.question, *item.choices]))
    out = {"hhh": hhh}
    for task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        out[task] = [(f"{task}/{i}", [it.question, *it.choices])
                     for i, it in enumerate(evaluation.load_items(task, None, truthfulqa_file))]
    out["questions"] = [(q["prompt_id"], [q["prompt"], q["input"]])
                        for q in data.load_prompts(questions or data.asset("questions.jsonl"))]
    return out


def _grams(items: Iterable[Item], n: int) -> dict[str, set[tuple[str, ...]]]:
    return {iid: set().union(*(ngrams(t, n) for t in texts)) for iid, texts in items}


def overlaps(train: dict[str, list[Item]], evals: dict[str, list[Item]], sizes: Iterable[int] = SIZES) -> dict:
    """The report of `check` for given items: per n and pair of sources, the item pairs sharing an n-gram."""
    pairs, found = [], []
    for n in sizes:
        index: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        for source, items in evals.items():
            for iid, grams in _grams(items, n).items():
                for g in grams:
                    index.setdefault(g, []).append((source, iid))
        hits: dict[tuple[str, str, str, str], list[tuple[str, ...]]] = {}
        for source, items in train.items():
            for iid, grams in _grams(items, n).items():
                for g in grams & index.keys():
                    for eval_source, eval_id in index[g]:
                        hits.setdefault((source, iid, eval_source, eval_id), []).append(g)
        for t in train:
            for e in evals:
                mine = [k for k in hits if k[0] == t and k[2] == e]
                pairs.append({"n": n, "train": t, "eval": e, "item_pairs": len(mine),
                              "train_items": len({k[1] for k in mine}), "eval_items": len({k[3] for k in mine})})
        found += [{"n": n, "train": t, "train_id": tid, "eval": e, "eval_id": eid, "shared": len(gs),
                   "ngram": " ".join(min(gs))} for (t, tid, e, eid), gs in hits.items()]
    return {"ngram_sizes": list(sizes), "clean": not found,
            "sources": {s: len(items) for s, items in {**train, **evals}.items()},
            "pairs": pairs, "overlaps": found}


def find_overlaps(pool: str = "", exemplars: str = "", validation: str = "", *, truthfulqa_file: str | None = None,
          questions: str = "", sizes: Iterable[int] = SIZES) -> dict:
    """A JSON-able contamination report of the pool, exemplars and validation set ("" = built-in) vs the evals.

    {"ngram_sizes", "clean", "sources": {name: items}, "paths": {name: file},
     "pairs": [{"n", "train", "eval", "item_pairs", "train_items", "eval_items"}],
     "overlaps": [{"n", "train", "train_id", "eval", "eval_id", "shared" (n-grams), "ngram" (the first)}]}"""
    report = overlaps(train_sources(pool, exemplars, validation), eval_sources(truthfulqa_file, questions), sizes)
    report["paths"] = {"pool": pool or data.asset("prompts.jsonl"),
                       "exemplars": exemplars or data.asset("exemplars.jsonl"),
                       "validation": validation or data.asset("validation.jsonl"),
                       "questions": questions or data.asset("questions.jsonl")}
    return report


def describe(report: dict, limit: int = 50) -> list[str]:
    """The lines `data check` prints: per n-gram size a table of item pairs sharing one, then the overlaps."""
    evals = list(dict.fromkeys(p["eval"] for p in report["pairs"]))
    trains = list(dict.fromkeys(p["train"] for p in report["pairs"]))
    width = max(len(f"{t} ({report['sources'][t]})") for t in trains) + 2
    lines = []
    for n in report["ngram_sizes"]:
        lines += [f"word {n}-grams shared with the evaluation sets (item pairs):",
                  " " * width + "".join(f"  {e}" for e in evals)]
        for t in trains:
            cells = {p["eval"]: p["item_pairs"] for p in report["pairs"] if p["n"] == n and p["train"] == t}
            lines.append(f"  {t} ({report['sources'][t]})".ljust(width)
                         + "".join(f"  {cells[e]:{len(e)}d}" for e in evals))
    for o in report["overlaps"][:limit]:
        lines.append(f"{o['n']}-gram: {o['train']} {o['train_id']} ~ {o['eval']} {o['eval_id']} "
                     f"({o['shared']} shared): {o['ngram']!r}")
    if len(report["overlaps"]) > limit:
        lines.append(f"... and {len(report['overlaps']) - limit} more overlaps (write them all with --out)")
    return lines


def check_run(inputs, path: str, truthfulqa_file: str = "", questions: str = "",
              log: Callable[[str], None] = print) -> None:
    """A run's check of what it reads (`inputs`: its pool, exemplars and validation pairs) against HHH,
    TruthfulQA and the open-ended questions, once per work dir: the report goes to `path` (contamination.json);
    overlaps are listed in the log, not fatal. Without the benchmark files (offline, no archive) it is skipped,
    saying why."""
    from soft_jax.experiment.workdir import save_json

    if storage.exists(path):
        return
    try:
        evals = eval_sources(truthfulqa_file or None, questions)
    except UserError as e:
        log(f"[data check] skipped: {e}")
        save_json(path, {"skipped": str(e)})
        return
    report = overlaps(train_items(inputs.pool, inputs.exemplars, inputs.validation), evals)
    save_json(path, report)
    if report["clean"]:
        log(f"[data check] clean: the pool, exemplars and validation pairs share no word "
            f"{' or '.join(map(str, report['ngram_sizes']))}-gram with the benchmarks ({os.path.basename(path)})")
        return
    for line in describe(report, limit=10):
        log(f"[data check] {line}")
    log(f"[data check] warning: inputs share word n-grams with the evaluation sets (all in {path}); reword or "
        "drop them, or the benchmarks measure memory")
