"""`soft-jax data check`: the built-in assets share no word 13- or 8-gram with HHH, TruthfulQA or the
open-ended questions (on the real BIG-bench files, where they are), and a copied benchmark sentence planted in a
pool is found and listed (on the in-house items in BIG-bench's layout, tests/fixtures/bigbench)."""

import json

import pytest

from soft_jax import cli, evaluation
from soft_jax.experiment import contamination


@pytest.fixture
def evals(inhouse_bigbench):
    return contamination.eval_sources()


@pytest.mark.slow
def test_the_built_in_assets_are_clean(real_bigbench):
    report = contamination.overlaps(contamination.train_sources(), contamination.eval_sources())
    assert report["overlaps"] == [], "\n".join(contamination.describe(report))
    assert report["clean"] and report["ngram_sizes"] == [13, 8]
    assert report["sources"] == {"pool": 244, "exemplars": 26, "validation": 52, "hhh": 221, "truthfulqa_mc1": 299,
                                 "truthfulqa_mc2": 299, "questions": 45}
    assert len(report["pairs"]) == 2 * 3 * 4 and all(p["item_pairs"] == 0 for p in report["pairs"])


def test_ngrams_are_lowercased_alphanumeric_runs():
    assert contamination.ngrams("Don’t  PANIC, it's fine!", 3) == {("don", "t", "panic"), ("t", "panic", "it"),
                                                                   ("panic", "it", "s"), ("it", "s", "fine")}
    assert contamination.ngrams("two words", 3) == set()


def _words(text: str) -> int:
    return len(contamination._WORD.findall(text.lower()))


def planted(tmp_path) -> tuple[str, str, str]:
    """(a pool, the HHH item id copied into it, the TruthfulQA MC1 item id reworded in it): an HHH question's
    opening copied (13-gram and up), a TruthfulQA answer of 8 to 12 words reworded only in case and spacing (an
    8-gram, not 13), and a clean prompt on a TruthfulQA topic."""
    evals = contamination.eval_sources()
    hhh_id, (question, *_) = next((i, t) for i, t in evals["hhh"] if _words(t[0]) >= 13)
    mc1_id, answer = next((i, c) for i, (_, *choices) in evals["truthfulqa_mc1"] for c in choices
                          if 8 <= _words(c) < 13)
    rows = [{"id": "copied", "prompt": "Help me with this: " + " ".join(question.split()[:20])},
            {"id": "reworded", "prompt": "Is it true that " + answer.upper().replace(" ", "  ").rstrip(".") + "?"},
            {"id": "topic", "prompt": "Do knuckles really crack because of arthritis?"}]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), hhh_id, mc1_id


def test_a_planted_overlap_is_found_and_listed(tmp_path, evals):
    pool, hhh_id, mc1_id = planted(tmp_path)
    report = contamination.overlaps(contamination.train_sources(pool), evals)
    json.dumps(report)  # JSON-able, for the work dir
    assert not report["clean"]
    found = {(o["n"], o["train_id"], o["eval"], o["eval_id"]) for o in report["overlaps"]}
    assert {(13, "copied", "hhh", hhh_id), (8, "copied", "hhh", hhh_id),
            (8, "reworded", "truthfulqa_mc1", mc1_id)} <= found
    assert not any(o["train_id"] == "topic" for o in report["overlaps"])
    assert not any(n == 13 and tid == "reworded" for n, tid, _, _ in found)
    assert all(o["train"] == "pool" for o in report["overlaps"])  # the built-in exemplars and pairs stay clean
    copied = next(o for o in report["overlaps"] if o["n"] == 13 and o["eval_id"] == hhh_id)
    question = dict(evals["hhh"])[hhh_id][0]
    assert len(copied["ngram"].split()) == 13 and copied["ngram"] in " ".join(
        contamination._WORD.findall(question.lower()))
    pair = next(p for p in report["pairs"] if (p["n"], p["train"], p["eval"]) == (8, "pool", "truthfulqa_mc1"))
    assert pair["train_items"] == 1 and pair["eval_items"] >= 1


def test_the_command_warns_or_with_strict_exits_1(tmp_path, capsys, inhouse_bigbench):
    pool, hhh_id, mc1_id = planted(tmp_path)
    out = tmp_path / "report.json"
    assert cli.main(["data", "check", pool, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"13-gram: pool copied ~ hhh {hhh_id}" in captured.out
    assert f"8-gram: pool reworded ~ truthfulqa_mc1 {mc1_id}" in captured.out
    assert captured.err.startswith("soft-jax: warning: 2 training-side items share")
    report = json.loads(out.read_text())
    assert not report["clean"] and report["paths"]["pool"] == pool
    with pytest.raises(SystemExit) as stop:
        cli.main(["data", "check", pool, "--strict"])
    assert stop.value.code == cli.EXIT_CONTAMINATED == 1
    assert cli.main(["data", "check", "--strict"]) == 0  # the built-in assets
    assert capsys.readouterr().out.splitlines()[-1].startswith("clean: no word 13-gram or 8-gram shared")


def test_a_bad_pool_exits_2(tmp_path, capsys):
    assert cli.main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_a_run_checks_its_inputs_once_when_it_starts(tmp_path, inhouse_bigbench):
    """`soft-jax run` writes the check of its own inputs to contamination.json and logs the verdict; a planted
    copy of a TruthfulQA question in its pool is listed; the rerun does not check again."""
    from helpers import config

    from soft_jax import data
    from soft_jax.rounds import loop

    k, question = next((k, it.question) for k, it in enumerate(evaluation.load_items("truthfulqa_mc1"))
                       if _words(it.question) >= 8)
    pool = tmp_path / "pool.jsonl"
    rows = [{"id": p["prompt_id"], "prompt": p["prompt"]} for p in data.load_prompts()[:11]]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"id": "copied", "prompt": question}]))
    c = config("soft.py", "check_contamination=true", f"prompts.path={pool}", "rounds=1", "prompts.per_round=4")
    logs = []
    loop.run(c, str(tmp_path / "w"), log=logs.append)
    report = json.load(open(tmp_path / "w" / "contamination.json"))
    assert not report["clean"]
    assert {(o["train"], o["train_id"], o["eval_id"]) for o in report["overlaps"]} >= {
        ("pool", "copied", f"truthfulqa_mc1/{k}"), ("pool", "copied", f"truthfulqa_mc2/{k}")}
    assert {o["train_id"] for o in report["overlaps"] if o["train"] == "pool"} == {"copied"}
    assert any(line.startswith("[data check] warning: inputs share word n-grams") for line in logs), logs
    logs.clear()
    loop.run(c, str(tmp_path / "w"), log=logs.append)
    assert not any(line.startswith("[data check]") for line in logs), logs
