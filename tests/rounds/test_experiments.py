"""Experiments that mean what they claim (docs/method.md, "The claims and the configs that test them"): each
claim's configs differ only in its knobs, rounds keep
the pool's category mix, the fixed exemplar set matches random draws' principle coverage, truncated answers
are known and not trained as finished, and the collapse guard reads beyond noise."""

import collections
import json
import os
import types

import numpy as np
import pytest
from helpers import CONFIGS, run

from soft_jax import data, training
from soft_jax.data import filters
from soft_jax.experiment import config as config_lib
from soft_jax.experiment import inputs
from soft_jax.inference import sampler
from soft_jax.models import load
from soft_jax.training import TrainConfig

pytestmark = pytest.mark.e2e  # whole runs, CLI processes, killed and restarted runs (conftest.py)


def resolved(spec: str, *overrides: str) -> dict:
    """A config as a run records it in config.json: loaded, overridden and with its fixed exemplars chosen."""
    c = config_lib.load(os.path.join(CONFIGS, spec), list(overrides))
    c = inputs.resolve_fixed_exemplars(c, types.SimpleNamespace(exemplars=data.load_exemplars(c.exemplars.path)))
    return config_lib.to_dict(c)


@pytest.mark.parametrize("a,b,knobs", [
    # claim 1: diverse (random) vs fixed exemplars, all else equal
    ("ablation_exemplars.py:random", "ablation_exemplars.py:fixed", {"exemplars.strategy", "exemplars.fixed_ids"}),
    # claim 2: SOFT+ (easy to hard within and across rounds) vs SOFT (random order)
    ("soft.py", "soft_plus.py", {"curriculum.order", "curriculum.across_rounds"}),
    ("ablation_order.py:easy_to_hard", "ablation_order.py:hard_to_easy", {"curriculum.order"}),
    ("ablation_order.py:easy_to_hard", "ablation_order.py:random", {"curriculum.order", "curriculum.across_rounds"}),
    ("ablation_generator.py:previous", "ablation_generator.py:base", {"generator"}),
    ("ablation_sft_start.py:continue", "ablation_sft_start.py:reinit", {"sft_start"}),
    ("ablation_filters.py:off", "ablation_filters.py:relevance", {"filters.max_relevance_ratio"}),
    ("ablation_data.py:replace", "ablation_data.py:accumulate", {"train_data"}),
    ("soft.py", "ablation_filters.py:off", set()),
])
def test_each_claims_configs_differ_only_in_its_knobs(a, b, knobs):
    assert set(config_lib.diff(resolved(a), resolved(b))) == knobs


def test_paper_configs_compare_at_equal_k_and_evaluate_the_benchmarks_every_round():
    names = ["single_round.py", "soft.py", "soft_plus.py", "ablation_exemplars.py:fixed",
             "ablation_exemplars.py:random", "ablation_order.py:random", "ablation_generator.py:base",
             "ablation_sft_start.py:reinit"]
    cs = {n: resolved(n) for n in names}
    assert {c["exemplars"]["k"] for c in cs.values()} == {3}
    assert all(c["eval"]["tasks"] == config_lib.PAPER_TASKS for c in cs.values())
    assert all(c["open_ended"]["limit"] > 0 for c in cs.values())  # the degeneracy signals, every round
    fixed = cs["ablation_exemplars.py:fixed"]["exemplars"]["fixed_ids"]
    assert cs["single_round.py"]["exemplars"]["fixed_ids"] == fixed


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_the_fixed_set_covers_as_many_principles_as_random_draws_do_on_average(k):
    pool = data.load_exemplars()
    covers = [filters.cited_principles(e.thoughts) for e in pool]
    assert all(covers), "every shipped exemplar's thoughts cite a principle"
    mean, _, sizes = data.coverage(covers, k)
    ids = data.choose_fixed(pool, k, covers)
    fixed = len(set().union(*(covers[i] for i, e in enumerate(pool) if e.id in ids)))
    assert len(ids) == len(set(ids)) == k
    assert abs(fixed - mean) == min(abs(s - mean) for s in sizes) and abs(fixed - mean) <= 0.5
    # the rows of a run see exactly that set
    assert [e.id for e in data.sample_exemplars(pool, k, "fixed", [0], ids)] == ids


def _histogram_within_one(slices, pool):
    share = collections.Counter(p["category"] for p in pool)
    for s in slices:
        got = collections.Counter(p["category"] for p in s)
        for cat, n in share.items():
            assert abs(got[cat] - len(s) * n / len(pool)) <= 1, (cat, got[cat], len(s) * n / len(pool))


@pytest.mark.parametrize("across", ["none", "prompt_ppl", "prompt_length"])
@pytest.mark.parametrize("sizes", [[24, 24], [81, 81, 81], [8, 8, 8, 8, 8], [10, 30, 50]])
def test_every_round_keeps_the_pools_category_mix(across, sizes):
    pool = data.load_prompts()
    rng = np.random.default_rng(0)
    difficulty = {"none": None, "prompt_ppl": list(rng.lognormal(4, 0.6, len(pool))),
                  "prompt_length": [float(len(p["prompt"])) for p in pool]}[across]
    for hardest_first in (False, True):
        slices = data.split_rounds(pool, sizes, seed=3, difficulty=difficulty, hardest_first=hardest_first)
        assert [len(s) for s in slices] == sizes
        ids = [p["prompt_id"] for s in slices for p in s]
        assert len(ids) == len(set(ids)), "round slices overlap"
        _histogram_within_one(slices, pool)
        if difficulty is None:
            continue
        d = {p["prompt_id"]: v for p, v in zip(pool, difficulty)}
        for a, b in zip(slices, slices[1:]):  # within a category, earlier rounds are easier (harder)
            for cat in {p["category"] for p in a} & {p["category"] for p in b}:
                early = [d[p["prompt_id"]] for p in a if p["category"] == cat]
                late = [d[p["prompt_id"]] for p in b if p["category"] == cat]
                assert (max(early) <= min(late)) if not hardest_first else (min(early) >= max(late))


def test_soft_plus_run_keeps_the_category_mix_and_records_what_it_showed(tmp_path):
    w = run("soft_plus.py", tmp_path / "w", "prompts.per_round=24", "sampling.batch_size=8", "open_ended.limit=3")
    pool = data.load_prompts()
    _histogram_within_one([w.rows(t, "prompts.jsonl") for t in (1, 2)], pool)
    for t in (1, 2):
        gens = w.rows(t, "generations.jsonl")
        shown = w.event(t, "generate")
        assert shown["exemplars_shown"] == len({i for g in gens for i in g["exemplar_ids"]}) > 8  # per prompt
        assert all(g["finish"] in sampler.FINISH_REASONS for g in gens)
        assert shown["truncated_generations"] == sum(g["finish"] == "length" for g in gens)
        ev = json.load(open(os.path.join(w.path, "rounds", f"{t:03d}", "eval.json")))
        items = ev["validation"]["items"]
        assert len(items) == ev["validation"]["n"] == len(data.load_pairs())
        assert ev["validation"]["value"] == pytest.approx(np.mean(items))
        assert set(ev["open_ended"]["signals"]) >= {"distinct_1", "distinct_2", "repeated_ngram_rate", "length",
                                                    "truncation_rate"}
        cmp = w.state["comparisons"][str(t)]
        assert cmp["low"] <= cmp["diff"] <= cmp["high"] and cmp["verdict"] in ("better", "worse", "tie")


# --- the collapse guard ---------------------------------------------------------------------------


# --- why a generation stopped, and what is trained ----------------------------------------------------


def test_generations_record_why_they_stopped(tiny_chat):
    model, tok = load(tiny_chat, progress=False)
    prompts = ["Hello there, how are you?", "Name three colours."]
    greedy = sampler.generate(model, tok, prompts, max_new_tokens=12, add_special_tokens=False, progress=False)
    never = (len(tok) + 5,)  # a stop id the model cannot sample
    sample = sampler.Sampler(model, tok, sampler.SamplingConfig(max_new_tokens=12))
    assert sample(prompts, add_special_tokens=False, stop_token_ids=never).finish == ["length", "length"]
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    first = [r[0] for r in sampler.generate_tokens(model, rows, sampler.SamplingConfig(max_new_tokens=2,
                                                                                       batch_size=2), never)]
    assert sample(prompts, add_special_tokens=False, stop_token_ids=tuple(first)).finish == ["eos", "eos"]
    stop = greedy[0][3:9]  # a stop string inside the first completion only
    assert stop and stop not in greedy[1]
    out = sample(prompts, add_special_tokens=False, stop_strings=(stop,), stop_token_ids=never)
    assert out.finish == ["stop", "length"] and out.texts[0] == greedy[0][:greedy[0].find(stop)]
    assert out.texts[1] == greedy[1]


def test_unfinished_answers_are_trained_without_end_of_turn(smollm2_tokenizer):
    tok, cfg = smollm2_tokenizer, TrainConfig(max_prompt_len=64, max_response_len=64)
    answer = "Tides rise and fall because the Moon pulls on the"
    done, _, _ = training.render(tok, "How do tides work?", answer, cfg)
    cut, _, _ = training.render(tok, "How do tides work?", answer, cfg, finished=False)
    n = done.is_response.index(True)
    assert cut.ids[:n] == done.ids[:n]  # the same prompt
    assert tok.decode(done.ids[n:]).startswith(answer + "<|im_end|>")
    assert tok.decode(cut.ids[n:]) == answer and tok.eos_token_id not in cut.ids[n:]
    # training takes the flag with each pair
    examples, _, _ = training.prepare(tok, [("How do tides work?", answer, False), ("How do tides work?", answer)],
                                      cfg)
    assert examples[0].ids == cut.ids and examples[1].ids == done.ids


def test_the_default_filters_drop_truncated_answers_and_the_option_keeps_them():
    principles = data.load_principles()
    ex = data.load_exemplars()
    thoughts = "Principle 3 (helpful) applies: a short practical answer."
    answer = "Keep the soil moist by setting the pots on a tray of wet pebbles, and ask a"
    drop = filters.Context(ex, principles, filters.FilterConfig())
    keep = filters.Context(ex, principles, filters.FilterConfig(keep_truncated=True))
    assert filters.verdict(answer, "q", drop, thoughts, "length") == "truncated"
    assert filters.verdict(answer, "q", keep, thoughts, "length") is None
    assert filters.verdict(answer, "q", drop, thoughts, "eos") is None
    assert config_lib.load(os.path.join(CONFIGS, "soft.py")).filters.keep_truncated is False


def test_the_guard_can_read_a_degeneracy_signal_of_the_open_ended_answers(tmp_path):
    with pytest.raises(config_lib.UserError, match="open_ended.limit"):
        config_lib.load(os.path.join(CONFIGS, "tiny.py"), ["validation.metric=distinct_2", "open_ended.limit=0"])
    w = run("tiny.py", tmp_path / "w", "rounds=1", "validation.metric=repeated_ngram_rate", "open_ended.limit=3")
    for t in (0, 1):
        ev = json.load(open(os.path.join(w.path, "rounds", f"{t:03d}", "eval.json")))
        answers = w.rows(t, "open_ended.jsonl")
        assert ev["validation"]["items"] == [a["signals"]["repeated_ngram_rate"] for a in answers]
        assert len(answers) == 3 and all(a["finish"] in sampler.FINISH_REASONS for a in answers)
    assert w.state["comparisons"]["1"]["n"] == 3


# --- train_data: replace (the paper's) or accumulate (rounds 1..t's kept pairs) --------------------------------

def test_accumulate_trains_round_2_on_both_rounds_kept_pairs_and_a_killed_run_rebuilds_them(tmp_path):
    """Round 2's train.jsonl holds round 1's and round 2's kept pairs, each once, scored under the current model and
    in the curriculum's order (easy to hard); killed by SIGKILL before round 2's scoring and resumed, the run
    rebuilds the same set in the same order."""
    from helpers import run_workdir

    extra = ("train_data=accumulate", "prompts.per_round=6", "sampling.batch_size=6")
    w = run("soft_plus.py", tmp_path / "ref", *extra)
    kept = {t: [g["prompt_id"] for g in w.rows(t, "generations.jsonl") if g["kept"]] for t in (1, 2)}
    assert kept[1] and kept[2]
    first, second = w.rows(1, "train.jsonl"), w.rows(2, "train.jsonl")
    assert sorted(r["prompt_id"] for r in first) == sorted(kept[1]) and {r["round"] for r in first} == {1}
    assert sorted(r["prompt_id"] for r in second) == sorted(kept[1] + kept[2])
    assert {r["prompt_id"]: r["round"] for r in second} == {**{p: 1 for p in kept[1]}, **{p: 2 for p in kept[2]}}
    assert [r["position"] for r in second] == list(range(len(second)))
    assert [r["difficulty"] for r in second] == sorted(r["difficulty"] for r in second)
    killed = tmp_path / "killed"
    p = run_workdir(killed, extra, {"SOFT_JAX_KILL_AT": "generated_r2"})
    assert p.returncode == -9, p.stderr[-2000:]
    assert not (killed / "rounds" / "002" / "train.jsonl").exists()
    p = run_workdir(killed, extra)
    assert p.returncode == 0, p.stderr[-2000:]
    again = [json.loads(line) for line in open(killed / "rounds" / "002" / "train.jsonl")]
    assert again == second
    assert config_lib.load(os.path.join(CONFIGS, "soft.py")).train_data == "replace"  # the paper's default
