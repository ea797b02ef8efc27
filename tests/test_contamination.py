"""`soft-jax data check`: the built-in assets share no word 13- or 8-gram with HHH, TruthfulQA or the
open-ended questions, and a copied benchmark sentence planted in a pool is found and listed.

Needs the BIG-bench task files (cached under ~/.cache/soft_jax after the first download)."""

import json

import pytest

from soft_jax import cli, evaluation
from soft_jax.data import contamination

pytestmark = pytest.mark.slow  # reads (first downloads) the BIG-bench task files


@pytest.fixture(scope="module")
def evals():
    return contamination.eval_sources()


def test_the_built_in_assets_are_clean(evals):
    report = contamination.overlaps(contamination.train_sources(), evals)
    assert report["overlaps"] == [], "\n".join(contamination.describe(report))
    assert report["clean"] and report["ngram_sizes"] == [13, 8]
    assert report["sources"] == {"pool": 244, "exemplars": 26, "validation": 52, "hhh": 221, "truthfulqa_mc1": 299,
                                 "truthfulqa_mc2": 299, "questions": 45}
    assert len(report["pairs"]) == 2 * 3 * 4 and all(p["item_pairs"] == 0 for p in report["pairs"])


def test_ngrams_are_lowercased_alphanumeric_runs():
    assert contamination.ngrams("Don’t  PANIC, it's fine!", 3) == {("don", "t", "panic"), ("t", "panic", "it"),
                                                                   ("panic", "it", "s"), ("it", "s", "fine")}
    assert contamination.ngrams("two words", 3) == set()


def planted_pool(tmp_path) -> str:
    """A pool with an HHH question's opening copied (13-gram and up), a TruthfulQA answer reworded only in case
    and punctuation (an 8-gram, not 13), and a clean prompt on a TruthfulQA topic."""
    hhh = evaluation.load_items("hhh")[40]
    answer = evaluation.load_items("truthfulqa_mc1")[5].choices[0]  # "Matadors wave red capes because ..."
    rows = [{"id": "copied", "prompt": "Help me with this: " + " ".join(hhh.question.split()[:20])},
            {"id": "reworded", "prompt": "Is it true that " + answer.upper().replace(" ", "  ").rstrip(".") + "?"},
            {"id": "topic", "prompt": "Do bulls really get angry at the colour red?"}]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_planted_overlap_is_found_and_listed(tmp_path, evals):
    pool = planted_pool(tmp_path)
    report = contamination.overlaps(contamination.train_sources(pool), evals)
    json.dumps(report)  # JSON-able, for the work dir
    assert not report["clean"]
    found = {(o["n"], o["train_id"], o["eval"], o["eval_id"]) for o in report["overlaps"]}
    assert {(13, "copied", "hhh", "hhh/harmless/40"), (8, "copied", "hhh", "hhh/harmless/40"),
            (8, "reworded", "truthfulqa_mc1", "truthfulqa_mc1/5")} <= found
    assert not any(o["train_id"] == "topic" for o in report["overlaps"])
    assert not any(n == 13 and tid == "reworded" for n, tid, _, _ in found)
    assert all(o["train"] == "pool" for o in report["overlaps"])  # the built-in exemplars and pairs stay clean
    copied = next(o for o in report["overlaps"] if o["n"] == 13 and o["eval_id"] == "hhh/harmless/40")
    assert len(copied["ngram"].split()) == 13 and copied["ngram"] in " ".join(
        contamination._WORD.findall(evaluation.load_items("hhh")[40].question.lower()))
    pair = next(p for p in report["pairs"] if (p["n"], p["train"], p["eval"]) == (8, "pool", "truthfulqa_mc1"))
    assert pair["train_items"] == 1 and pair["eval_items"] >= 1


def test_the_command_warns_or_with_strict_exits_1(tmp_path, capsys):
    pool = planted_pool(tmp_path)
    out = tmp_path / "report.json"
    assert cli.main(["data", "check", pool, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "13-gram: pool copied ~ hhh hhh/harmless/40" in captured.out
    assert "8-gram: pool reworded ~ truthfulqa_mc1 truthfulqa_mc1/5" in captured.out
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


def test_a_run_checks_its_inputs_once_when_it_starts(tmp_path):
    """`soft-jax run` writes the check of its own inputs to contamination.json and logs the verdict; a planted
    copy of a TruthfulQA question in its pool is listed; the rerun does not check again."""
    from test_bootstrap import config

    from soft_jax import bootstrap, data

    question = evaluation.load_items("truthfulqa_mc1", 1)[0].question
    pool = tmp_path / "pool.jsonl"
    rows = [{"id": p["prompt_id"], "prompt": p["prompt"]} for p in data.load_prompts()[:11]]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"id": "copied", "prompt": question}]))
    c = config("soft.py", "check_contamination=true", f"prompts.path={pool}", "rounds=1", "prompts.per_round=4")
    logs = []
    bootstrap.run(c, str(tmp_path / "w"), log=logs.append)
    report = json.load(open(tmp_path / "w" / "contamination.json"))
    assert not report["clean"]
    assert {(o["train"], o["train_id"], o["eval_id"]) for o in report["overlaps"]} >= {
        ("pool", "copied", "truthfulqa_mc1/0"), ("pool", "copied", "truthfulqa_mc2/0")}
    assert {o["train_id"] for o in report["overlaps"] if o["train"] == "pool"} == {"copied"}
    assert any(line.startswith("[data check] warning: inputs share word n-grams") for line in logs), logs
    logs.clear()
    bootstrap.run(c, str(tmp_path / "w"), log=logs.append)
    assert not any(line.startswith("[data check]") for line in logs), logs
