"""The built-in validation set is held out: no text shared with the exemplars, no prompt from the pools.

docs/method.md ("Terms"): the validation pairs share no text with the exemplars. The collapse guard scores the
model's NLL on these pairs; text copied from the exemplars (which every self-align prompt shows) would reward
memorising them.
`overlaps(path)` lists the problems of any validation file, so the check can be run by hand on another one.
"""

import difflib
import re

from soft_jax import data

N = 8  # shared word n-gram length that counts as copied text
NEAR = 0.8  # difflib ratio above which two prompts count as the same request


def _grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + N]) for i in range(len(words) - N + 1)}


def overlaps(path: str = "") -> list[str]:
    """Every shared word 8-gram with an exemplar; every near-copy of a pool, open-ended question or exemplar prompt."""
    pairs, exemplars = data.load_pairs(path), data.load_exemplars()
    exemplar_text = {e.id: _grams(e.prompt) | _grams(e.thoughts) | _grams(e.answer) for e in exemplars}
    pool = data.load_prompts() + data.load_prompts(data.asset("questions.jsonl"))
    prompts = [(p["prompt_id"], p["prompt"]) for p in pool] + [(e.id, e.prompt) for e in exemplars]
    found = []
    for v in pairs:
        mine = _grams(v["prompt"]) | _grams(v["response"])
        for eid, theirs in exemplar_text.items():
            found += [f"{v['id']} shares {' '.join(g)!r} with {eid}" for g in sorted(mine & theirs)]
        low = v["prompt"].lower()
        for pid, prompt in prompts:
            if difflib.SequenceMatcher(None, low, prompt.lower()).ratio() > NEAR:
                found.append(f"{v['id']} prompt {v['prompt']!r} nearly equals {pid} {prompt!r}")
    return found


def test_validation_pairs_share_no_text_with_the_exemplars_or_the_pool():
    assert overlaps() == []


def test_every_validation_row_loads():
    pairs = data.load_pairs()
    assert len(pairs) >= 48
    assert len({p["id"] for p in pairs}) == len(pairs)
    assert [p["id"] for p in pairs] == [f"v{i:02d}" for i in range(1, len(pairs) + 1)]
    assert all(p["prompt"].strip() and 40 <= len(p["response"].split()) <= 150 for p in pairs)
