"""SOFT's inputs: prompt pools, principles, the exemplar pool, validation pairs; templates and filters.

The shipped assets (soft_jax/data/assets/, written in-house) are the defaults; a config path replaces
each. Every prompt carries a stable `prompt_id` (its own `id`, else a hash of its text) so rounds,
generations and training rows can be joined.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from soft_jax.errors import UserError
from soft_jax.io_utils import read_jsonl

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


def asset(name: str) -> str:
    return os.path.join(ASSETS, name)


@dataclasses.dataclass(frozen=True)
class Exemplar:
    id: str
    prompt: str
    thoughts: str
    answer: str


def _text(row: dict, key: str, where: str) -> str:
    value = row.get(key, "")
    if not isinstance(value, str):
        raise UserError(f"{where}: `{key}` must be a string, got {type(value).__name__}")
    return value


def prompt_id(prompt: str, inp: str = "") -> str:
    return "h" + hashlib.sha256((prompt + "\x00" + inp).encode()).hexdigest()[:12]


def load_prompts(path: str = "") -> list[dict]:
    """Rows {prompt_id, prompt, input} of a JSONL prompt file (default: the built-in pool)."""
    path = path or asset("prompts.jsonl")
    rows = read_jsonl(path, required=("prompt",))
    out, seen = [], {}
    for n, row in enumerate(rows, 1):
        where = f"{path}: row {n}"
        prompt, inp = _text(row, "prompt", where).strip(), _text(row, "input", where).strip()
        if not prompt:
            raise UserError(f"{where}: `prompt` is empty; remove the row or fill it in")
        pid = str(row["id"]) if row.get("id") not in (None, "") else prompt_id(prompt, inp)
        if pid in seen:
            raise UserError(f"{where}: prompt id {pid!r} repeats row {seen[pid]}; ids (or prompts) must be unique")
        seen[pid] = n
        out.append({"prompt_id": pid, "prompt": prompt, "input": inp})
    return out


def load_tfds_prompts(name: str, split: str = "train", data_dir: str = "", prompt_key: str = "prompt") -> list[dict]:
    """The pool from a TFDS dataset (array_record), as load_prompts' rows."""
    from soft_jax.data import tfds

    rows = tfds.load_prompts(name, split, data_dir or None, prompt_key=prompt_key)
    return [{"prompt_id": r["id"], "prompt": r["prompt"].strip(), "input": r["input"].strip()} for r in rows]


def load_principles(path: str = "") -> str:
    path = path or asset("principles.txt")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such principles file; give a text file with one numbered principle per line")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text:
        raise UserError(f"{path}: the principles file is empty")
    return text


def load_exemplars(path: str = "") -> list[Exemplar]:
    """The exemplar pool: JSONL rows {id, prompt, thoughts, answer} in the internal-thoughts format."""
    path = path or asset("exemplars.jsonl")
    rows = read_jsonl(path, required=("prompt", "thoughts", "answer"))
    out, seen = [], set()
    for n, row in enumerate(rows, 1):
        where = f"{path}: row {n}"
        fields = {k: _text(row, k, where).strip() for k in ("prompt", "thoughts", "answer")}
        empty = [k for k, v in fields.items() if not v]
        if empty:
            raise UserError(f"{where}: empty {', '.join(empty)}; every exemplar needs a prompt, thoughts and answer")
        eid = str(row.get("id") or f"ex{n:03d}")
        if eid in seen:
            raise UserError(f"{where}: exemplar id {eid!r} is used twice; ids must be unique")
        seen.add(eid)
        out.append(Exemplar(eid, **fields))
    return out


def load_pairs(path: str = "") -> list[dict]:
    """Validation pairs {id, prompt, response} (default: the built-in held-out set)."""
    path = path or asset("validation.jsonl")
    rows = read_jsonl(path, required=("prompt", "response"))
    return [{"id": str(r.get("id", n)), "prompt": _text(r, "prompt", f"{path}: row {n}"),
             "response": _text(r, "response", f"{path}: row {n}")} for n, r in enumerate(rows, 1)]


def round_sizes(per_round, rounds: int) -> list[int]:
    """Prompts per round: one int for every round, or a list with one entry per round."""
    sizes = [int(per_round)] * rounds if isinstance(per_round, (int, np.integer)) else [int(s) for s in per_round]
    if len(sizes) != rounds:
        raise UserError(f"prompts_per_round lists {len(sizes)} sizes for {rounds} rounds; give one per round "
                        "or a single number")
    if any(s < 1 for s in sizes):
        raise UserError(f"prompts_per_round {sizes} has a size below 1")
    return sizes


def split_rounds(pool: list[dict], sizes: list[int], seed: int, difficulty: list[float] | None = None,
                 pool_name: str = "the prompt pool") -> list[list[dict]]:
    """Disjoint round slices: a seeded shuffle, or (curriculum across rounds) easiest prompts first."""
    if sum(sizes) > len(pool):
        raise UserError(f"the rounds need {sum(sizes)} prompts ({' + '.join(map(str, sizes))}) but {pool_name} has "
                        f"{len(pool)}; lower rounds or prompts_per_round, or give a larger pool")
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(pool))
    if difficulty is not None:  # stable sort of the shuffled order: ties stay seeded-random
        order = order[np.argsort(np.asarray(difficulty, np.float64)[order], kind="stable")]
    bounds = np.cumsum([0] + sizes)
    return [[pool[i] for i in order[lo:hi]] for lo, hi in zip(bounds[:-1], bounds[1:])]


def sample_exemplars(pool: list[Exemplar], k: int, strategy: str, seed_key: list[int]) -> list[Exemplar]:
    """k exemplars: the pool's first k ("fixed") or k drawn without replacement from a seeded rng ("random")."""
    if k > len(pool):
        raise UserError(f"exemplars.k = {k} but the exemplar pool has {len(pool)}; lower k or add exemplars")
    if strategy == "fixed":
        return pool[:k]
    idx = np.random.default_rng(seed_key).choice(len(pool), size=k, replace=False)
    return [pool[i] for i in idx]
