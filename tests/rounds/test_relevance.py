"""The relevance filter: Li et al.'s IFD ratio (an answer's mean loss given its prompt over its loss given an empty
prompt) against a transformers computation of the same statistic; `soft-jax data filter` on in-house pairs, matched
and shuffled across prompts; bad input; and a run that judges its kept answers by it."""

import json
import os

import numpy as np
import pytest
from helpers import ROOT, run, run_cli

from soft_jax.data import filters
from soft_jax.rounds import curriculum, relevance

PAIRS = os.path.join(ROOT, "tests", "fixtures", "relevance", "pairs.jsonl")
SHIFT = 7  # the shuffled set: each prompt gets the response written for the prompt 7 rows on (another topic)


def _pairs():
    matched = [json.loads(line) for line in open(PAIRS, encoding="utf-8")]
    shuffled = [{"prompt": r["prompt"], "response": matched[(i + SHIFT) % len(matched)]["response"]}
                for i, r in enumerate(matched)]
    return matched, shuffled


def test_the_fixture_is_24_matched_pairs_on_24_topics():
    matched, shuffled = _pairs()
    assert len(matched) == 24 and len({r["prompt"] for r in matched}) == 24
    assert all(a["response"] != b["response"] for a, b in zip(matched, shuffled))


def test_data_filter_keeps_matched_pairs_and_drops_shuffled_ones(tmp_path):
    """With SmolLM2-135M at the documented threshold (1.0): at least 80% of the matched pairs kept, at least 80% of
    the shuffled ones dropped, each dropped row with its reason; the counts printed per filter."""
    matched, shuffled = _pairs()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({**r, "id": i}) + "\n" for i, r in enumerate(matched + shuffled)))
    kept, dropped = tmp_path / "kept.jsonl", tmp_path / "dropped.jsonl"
    proc = run_cli("data", "filter", "--input", str(pairs), "--output", str(kept), "--dropped", str(dropped),
                   "--config.filters.max_relevance_ratio=1.0", "--model", "smollm2-135m")
    assert proc.returncode == 0, proc.stderr
    keep = [json.loads(line) for line in open(kept)]
    drop = [json.loads(line) for line in open(dropped)]
    ids = {r["id"] for r in keep}
    assert sum(i in ids for i in range(24)) >= 0.8 * 24
    assert sum(i not in ids for i in range(24, 48)) >= 0.8 * 24
    assert sorted(ids | {r["id"] for r in drop}) == list(range(48))
    assert all(r["dropped_by"] == filters.IRRELEVANT and r["relevance"] > 1.0 for r in drop)
    assert all(r["relevance"] <= 1.0 for r in keep)
    assert f"48 pairs: {len(keep)} kept, {len(drop)} dropped" in proc.stdout
    assert f"  irrelevant: {len(drop)}" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--config.filters.max_relevance_ratio=2.5"], "filters.max_relevance_ratio = 2.5: must be between 0 (off)"),
    (["--config.filters.cut_repeated=word"], "filters.cut_repeated = 'word': must be sentence | clause | off"),
    ([], "missing key(s) response"),
    (["finish"], "row 2: finish must be one of eos, stop, length"),
])
def test_bad_input_exits_2_in_one_line_and_writes_nothing(tmp_path, args, message):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Why is the sky blue?", "response": "Air scatters blue light more than red."}]
    if not args:
        rows.append({"prompt": "A prompt without its response"})
    if args == ["finish"]:
        rows.append({"prompt": "Why?", "response": "Because.", "finish": "tired"})
        args = []
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "kept.jsonl"
    proc = run_cli("data", "filter", "--input", str(pairs), "--output", str(out), "--dropped", str(tmp_path / "d"),
                   *args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr
    assert not out.exists() and not (tmp_path / "d").exists()


@pytest.mark.slow
def test_the_statistic_equals_a_transformers_computation(smollm2, smollm2_hf):
    """Each pair's ratio within 1e-3 of the same statistic from transformers forward passes over the same tokens
    (the engraving format with and without the prompt), and the same decisions at 1.0."""
    import torch

    model, tok = smollm2
    matched, shuffled = _pairs()
    pairs = [(r["prompt"], r["response"]) for r in matched + shuffled]
    given, alone = relevance.losses(model, tok, pairs, batch_size=8)
    ours = relevance.ratios(given, alone)

    def loss(prompt, response):
        head, tail = curriculum._engraved(tok, prompt, response)
        with torch.no_grad():
            logits = smollm2_hf(torch.tensor([head + tail])).logits[0].double()
        logp = torch.log_softmax(logits, -1)[len(head) - 1:-1]
        return -float(logp[torch.arange(len(tail)), torch.tensor(tail)].mean())

    ref = np.array([loss(p, r) / loss("", r) for p, r in pairs])
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    assert ((ours > 1.0) == (ref > 1.0)).all()
    assert (ours[:24] <= 1.0).mean() >= 0.8 and (ours[24:] > 1.0).mean() >= 0.8


def test_a_run_judges_its_kept_answers_and_reuses_the_scores_for_difficulty(tmp_path):
    """Every answer the string filters keep gets its ratio; those above the threshold are dropped as irrelevant
    (generations.jsonl's reason, the generate event's count); the kept pairs' response_ppl difficulty is the
    perplexity the filter computed with the same model, not a second pass."""
    w = run("soft_plus.py", tmp_path / "w", "rounds=1", "prompts.per_round=8", "sampling.batch_size=8",
            "filters.max_relevance_ratio=1.0")
    gens = w.rows(1, "generations.jsonl")
    judged = [g for g in gens if "relevance" in g]
    assert judged and all(g["dropped_by"] in (None, filters.IRRELEVANT) for g in judged)
    assert all((g["dropped_by"] == filters.IRRELEVANT) == (g["relevance"] > 1.0) for g in judged)
    event = w.event(1, "generate")
    assert event[filters.IRRELEVANT] == sum(g["dropped_by"] == filters.IRRELEVANT for g in gens)
    assert event["kept"] == sum(g["kept"] for g in gens)
    kept = {g["prompt_id"]: g for g in gens if g["kept"]}
    train = w.rows(1, "train.jsonl")
    assert {r["prompt_id"] for r in train} == set(kept)
    assert all(r["difficulty"] == kept[r["prompt_id"]]["answer_ppl"] for r in train)
