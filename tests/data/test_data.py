"""Shipped assets, the self-align template and its parsing, round slices, curriculum orders."""

import json

import numpy as np
import pytest

from soft_jax import data
from soft_jax.core.errors import UserError
from soft_jax.data import templates
from soft_jax.rounds import curriculum


def test_shipped_assets_meet_the_method():
    principles = data.load_principles()
    numbered = [line for line in principles.splitlines() if line[:1].isdigit()]
    assert len(numbered) == 16
    exemplars = data.load_exemplars()
    assert len(exemplars) >= 16 and len({e.id for e in exemplars}) == len(exemplars)
    prompts = data.load_prompts()
    assert len(prompts) >= 200 and len({p["prompt"] for p in prompts}) == len(prompts)
    questions = data.load_prompts(data.asset("questions.jsonl"))
    assert len(questions) >= 40
    validation = data.load_pairs()
    assert len(validation) >= 16
    everything = [p["prompt"] for p in prompts + questions] + [e.prompt for e in exemplars] + \
        [v["prompt"] for v in validation]
    assert len(set(everything)) == len(everything), "held-out sets overlap the prompt pool or the exemplars"


def test_self_align_prompt_shares_its_prefix_and_parses_back():
    ex = data.load_exemplars()[:2]
    a = templates.self_align_prompt("P1. Be kind.", ex, "What is 2+2?")
    b = templates.self_align_prompt("P1. Be kind.", ex, "Name a color.", "red or blue")
    common = len(a) - len(" What is 2+2?\n\nAssistant (internal thoughts):")
    assert a[:common] == b[:common] and a.endswith("User: What is 2+2?\n\nAssistant (internal thoughts):")
    assert "Name a color.\n\nred or blue" in b
    for e in ex:
        assert f"User: {e.prompt}\n\nAssistant (internal thoughts): {e.thoughts}\n\nAssistant: {e.answer}" in a
    completion = " Principle 3 applies.\n\nAssistant: It is 4.\nMore detail.\n\nUser: thanks\n\nAssistant: ok"
    assert templates.parse(completion) == ("Principle 3 applies.", "It is 4.\nMore detail.")
    assert templates.parse(" just thoughts, no answer") == ("just thoughts, no answer", None)
    forced = templates.with_answer_marker(" thoughts \n") + " The answer."
    assert templates.parse(forced) == ("thoughts", "The answer.")


def test_round_slices_are_disjoint_seeded_and_curriculum_ordered():
    pool = [{"prompt_id": f"p{i}", "prompt": str(i), "input": ""} for i in range(20)]
    a = data.split_rounds(pool, [5, 5, 5], seed=0)
    b = data.split_rounds(pool, [5, 5, 5], seed=0)
    c = data.split_rounds(pool, [5, 5, 5], seed=1)
    ids = [p["prompt_id"] for s in a for p in s]
    assert len(set(ids)) == 15 and a == b and a != c
    # adding a round keeps the earlier slices (a resumed run may extend `rounds`)
    assert data.split_rounds(pool, [5, 5, 5, 5], seed=0)[:3] == a
    difficulty = [float((7 * i) % 20) for i in range(20)]
    slices = data.split_rounds(pool, [5, 5], seed=0, difficulty=difficulty)
    d = [[difficulty[int(p["prompt_id"][1:])] for p in s] for s in slices]
    assert sorted(d[0]) == [0, 1, 2, 3, 4] and sorted(d[1]) == [5, 6, 7, 8, 9]
    with pytest.raises(UserError, match="need 25 prompts"):
        data.split_rounds(pool, [5, 20], seed=0)


def test_exemplar_sampling():
    pool = data.load_exemplars()
    ids = [pool[5].id, pool[0].id, pool[9].id]
    assert [e.id for e in data.sample_exemplars(pool, 3, "fixed", [0], ids)] == ids  # the recorded set, in order
    with pytest.raises(UserError, match="fixed_ids"):
        data.sample_exemplars(pool, 3, "fixed", [0], ["ex01", "nope", "ex02"])
    draws = {tuple(e.id for e in data.sample_exemplars(pool, 3, "random", [0, 1, b])) for b in range(20)}
    assert len(draws) > 10
    one = data.sample_exemplars(pool, 3, "random", [0, 1, 2])
    assert one == data.sample_exemplars(pool, 3, "random", [0, 1, 2]) and len({e.id for e in one}) == 3


def test_curriculum_orders():
    s = [3.0, 1.0, 2.0, 1.0]
    assert curriculum.order(s, "easy_to_hard", [0]).tolist() == [1, 3, 2, 0]  # ties keep their order
    assert curriculum.order(s, "hard_to_easy", [0]).tolist() == [0, 2, 1, 3]
    assert sorted(curriculum.order(s, "random", [0]).tolist()) == [0, 1, 2, 3]
    assert curriculum.order(s, "none", [0]).tolist() == [0, 1, 2, 3]
    with pytest.raises(UserError, match="unknown curriculum order"):
        curriculum.order(s, "sideways", [0])


def test_prompt_files_are_checked(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "id": "x"}) + "\n" + json.dumps({"prompt": "b", "id": "x"}) + "\n")
    with pytest.raises(UserError, match="row 2: prompt id 'x' repeats row 1"):
        data.load_prompts(str(f))
    f.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(UserError, match="row 2: `prompt` is empty"):
        data.load_prompts(str(f))
    f.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "input": "c"}) + "\n")
    rows = data.load_prompts(str(f))
    assert rows[0]["prompt_id"] == data.prompt_id("a") and rows[1]["input"] == "c"
    e = tmp_path / "e.jsonl"
    e.write_text(json.dumps({"prompt": "a", "thoughts": "", "answer": "c"}) + "\n")
    with pytest.raises(UserError, match="empty thoughts"):
        data.load_exemplars(str(e))
    assert data.round_sizes(3, 2) == [3, 3] and data.round_sizes([1, 2], 2) == [1, 2]
    with pytest.raises(UserError, match="2 rounds"):
        data.round_sizes([1, 2, 3], 2)
    assert np.all(np.asarray(data.round_sizes(np.int64(2), 1)) == 2)
