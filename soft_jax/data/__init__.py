"""SOFT's inputs: prompt pools, principles, the exemplar pool, validation pairs; templates and filters.

The shipped assets (soft_jax/data/assets/, written in-house) are the defaults; a config path replaces
each. Every prompt carries a stable `prompt_id` (its own `id`, else a hash of its text) so rounds,
generations and training rows can be joined.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
from collections.abc import Sequence

import numpy as np

from soft_jax.core import storage
from soft_jax.core.errors import UserError
from soft_jax.core.io_utils import read_jsonl

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
    """Rows {prompt_id, prompt, input, category} of a JSONL prompt file (default: the built-in pool).

    `category` (optional, "" when absent) keeps each round's topic mix equal to the pool's (split_rounds)."""
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
        out.append({"prompt_id": pid, "prompt": prompt, "input": inp, "category": _text(row, "category", where)})
    return out


def load_tfds_prompts(name: str, split: str = "train", data_dir: str = "", prompt_key: str = "prompt") -> list[dict]:
    """The pool from a TFDS dataset (array_record), as load_prompts' rows."""
    from soft_jax.data import tfds

    rows = tfds.load_prompts(name, split, data_dir or None, prompt_key=prompt_key)
    return [{"prompt_id": r["id"], "prompt": r["prompt"].strip(), "input": r["input"].strip(), "category": ""}
            for r in rows]


def load_principles(path: str = "") -> str:
    path = path or asset("principles.txt")
    if not storage.isfile(storage.check(path)):
        raise UserError(f"{path}: no such principles file; give a text file with one numbered principle per line")
    text = storage.read_text(path).strip()
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
                 pool_name: str = "the prompt pool", hardest_first: bool = False) -> list[list[dict]]:
    """Disjoint round slices whose category mix is the pool's (each round within +-1 prompt of proportional).

    Within each category prompts go in a seeded shuffle, or with `difficulty` easiest first (hardest first
    with `hardest_first`; ties stay seeded-random), so an across-rounds curriculum orders prompts by
    difficulty inside each topic instead of sorting the pool by topic. A pool without categories is one."""
    if sum(sizes) > len(pool):
        raise UserError(f"the rounds need {sum(sizes)} prompts ({' + '.join(map(str, sizes))}) but {pool_name} has "
                        f"{len(pool)}; lower rounds or prompts_per_round, or give a larger pool")
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(pool))
    if difficulty is not None:  # stable sort of the shuffled order: ties stay seeded-random
        d = np.asarray(difficulty, np.float64)[order]
        order = order[np.argsort(-d if hardest_first else d, kind="stable")]
    queues: dict[str, list[int]] = {}
    for i in order:
        queues.setdefault(pool[i].get("category", ""), []).append(int(i))
    shares = {c: len(q) / len(pool) for c, q in queues.items()}
    taken = dict.fromkeys(queues, 0)
    slices, total = [], 0
    for size in sizes:
        total += size
        counts = _apportion(size, shares, {c: total * shares[c] - taken[c] for c in queues},
                            {c: len(q) - taken[c] for c, q in queues.items()})
        slices.append([pool[i] for c in queues for i in queues[c][taken[c]:taken[c] + counts[c]]])
        for c in queues:
            taken[c] += counts[c]
    return slices


def _apportion(size: int, shares: dict, owed: dict, left: dict) -> dict:
    """`size` seats split by `shares`: each category gets floor or ceil of its share, the extra seats going
    to the categories furthest behind their cumulative quota (`owed`), never more than is `left`."""
    counts = {c: min(int(np.floor(size * p)), left[c]) for c, p in shares.items()}
    for c in sorted(shares, key=lambda c: -(owed[c] - counts[c])):  # stable: ties keep the pool's order
        if sum(counts.values()) == size:
            break
        if counts[c] < left[c]:
            counts[c] += 1
    for c in shares:  # only when a category ran out: fill from whatever remains
        while sum(counts.values()) < size and counts[c] < left[c]:
            counts[c] += 1
    return counts


def sample_exemplars(pool: list[Exemplar], k: int, strategy: str, seed_key: list[int],
                     fixed_ids: Sequence[str] = ()) -> list[Exemplar]:
    """k exemplars: the ids in `fixed_ids` ("fixed"; see choose_fixed) or k drawn without replacement from
    a seeded rng ("random")."""
    if k > len(pool):
        raise UserError(f"exemplars.k = {k} but the exemplar pool has {len(pool)}; lower k or add exemplars")
    if strategy == "fixed":
        by_id = {e.id: e for e in pool}
        missing = [i for i in fixed_ids if i not in by_id]
        if missing or len(fixed_ids) != k:
            raise UserError(f"exemplars.fixed_ids {list(fixed_ids)}: give {k} ids of the exemplar pool "
                            f"(unknown: {', '.join(missing) or 'none'}), or leave it empty to choose by coverage")
        return [by_id[i] for i in fixed_ids]
    idx = np.random.default_rng(seed_key).choice(len(pool), size=k, replace=False)
    return [pool[i] for i in idx]


def coverage(covers: Sequence[set], k: int, draws: int = 20000) -> tuple[float, list[tuple[int, ...]], list[int]]:
    """(mean principles covered by k random exemplars, the k-subsets considered, each one's coverage).

    Every k-subset when there are at most `draws` of them, else `draws` seeded random ones."""
    n = len(covers)
    if math.comb(n, k) <= draws:
        subsets = list(itertools.combinations(range(n), k))
    else:
        rng = np.random.default_rng([0xF1, n, k])
        subsets = sorted({tuple(sorted(rng.choice(n, size=k, replace=False).tolist())) for _ in range(draws)})
    sizes = [len(set().union(*(covers[i] for i in s))) for s in subsets]
    return float(np.mean(sizes)), subsets, sizes


def choose_fixed(pool: list[Exemplar], k: int, covers: Sequence[set]) -> list[str]:
    """The fixed exemplar set of the fixed-vs-random ablation: k exemplars covering as many principles as k
    random ones do on average (docs/method.md, "The claims and the configs that test them"), so that the ablation
    varies diversity, not principle coverage.
    covers[i]: the principles exemplar i's thoughts cite. Deterministic: the first such subset in pool order."""
    if k == 0:
        return []
    mean, subsets, sizes = coverage(covers, k)
    best = min(range(len(subsets)), key=lambda j: (abs(sizes[j] - mean), subsets[j]))
    return [pool[i].id for i in subsets[best]]
