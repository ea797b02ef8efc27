"""`soft-jax data import`: the in-house samples of every format (tests/fixtures/pools/) become the expected pools.

Each sample holds the awkward cases: multi-turn conversations, a system turn first, non-English text, empty
turns, exact and near duplicates, an over-length prompt; each `*_bad` file holds one malformed record.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import TESTS

from soft_jax import cli, data
from soft_jax.data import pool

POOLS = os.path.join(TESTS, "fixtures", "pools")


def sample(name: str) -> str:
    return os.path.join(POOLS, name)


def run_import(capsys, fmt, *paths, out, extra=()):
    """(exit code, stdout lines, stderr) of an in-process `soft-jax data import`."""
    code = cli.main(["data", "import", "--format", fmt, *paths, "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def printed(lines: list[str]) -> dict[str, int]:
    """The count of each step in the printed lines ("no user turn    2" -> {"no user turn": 2})."""
    counts = {}
    for line in lines:
        head = line.split("(")[0].split()
        if len(head) >= 2 and head[-1].isdigit():
            counts[" ".join(head[:-1])] = int(head[-1])
        elif len(head) >= 3 and head[-2].isdigit():  # "read 27 records", "written 18 prompts"
            counts[" ".join(head[:-2])] = int(head[-2])
    return counts


def read_pool(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# (format, sample, extra flags) -> printed counts, the first kept ids, {id: (prompt, input, category)} spot checks
CASES = {
    "sharegpt": (("sharegpt", "sharegpt.json", ()),
                 {"read": 27, "no user turn": 2, "empty": 2, "too long": 1, "duplicates": 4, "written": 18},
                 ["sg001", "sg002", "sg003", "sg004", "sg005", "sg013", "sg014", "sg015"],
                 {"sg002": ("Write a short poem about a lighthouse keeper who collects seashells.", "", ""),  # system
                  "sg003": ("What is the difference between a violin and a viola?", "", ""),  # multi-turn: 1st turn
                  "sg005": ("東京で雨の日に楽しめる場所を教えてください。", "", ""),
                  "sg014": ("Something quick with chickpeas and spinach, please.", "", ""),  # the assistant opened
                  "sg020": ("What stretches help after a long day at a desk?", "", ""),
                  "sg020-" + data.prompt_id("Give me a packing list for a week of rainy hiking.")[1:]:
                      ("Give me a packing list for a week of rainy hiking.", "", ""),  # a repeated source id
                  data.prompt_id("Translate 'good luck with the exam' into French."):  # no id: the text's hash
                      ("Translate 'good luck with the exam' into French.", "", ""),
                  "26": ("How many minutes should I boil an egg for a runny yolk?", "", "")}),
    "dolly": (("dolly", "dolly.jsonl", ()),
              {"read": 24, "no user turn": 0, "empty": 2, "too long": 1, "duplicates": 3, "written": 18},
              [data.prompt_id("When did the first person walk on the Moon?")],
              {data.prompt_id("Using the passage, how long is the bridge?",
                              "The rail bridge, finished in 1911, spans 1.2 kilometres of tidal estuary."):
                  ("Using the passage, how long is the bridge?",
                   "The rail bridge, finished in 1911, spans 1.2 kilometres of tidal estuary.", "closed_qa"),
               data.prompt_id("Give me three ideas for a rainy Saturday."):
                   ("Give me three ideas for a rainy Saturday.", "", "brainstorming"),
               data.prompt_id("Is a tomato a fruit?"): ("Is a tomato a fruit?", "", ""),  # no category in the row
               data.prompt_id("Qu'est-ce qui rend le pain au levain différent du pain ordinaire ?"):
                   ("Qu'est-ce qui rend le pain au levain différent du pain ordinaire ?", "", "open_qa")}),
    "oasst": (("oasst", "oasst.jsonl", ("--category-field", "lang")),
              {"read": 30, "replies": 15, "no user turn": 1, "empty": 1, "too long": 1, "duplicates": 2,
               "written": 10},
              ["m-a01", "m-b01", "m-c01", "m-i01", "m-j01", "m-k01", "m-l01", "m-m01", "m-n01", "m-o01"],
              {"m-a01": ("What are some good habits for learning a new language?", "", "en"),
               "m-b01": ("¿Cómo puedo reducir el desperdicio de comida en casa?", "", "es"),
               "m-j01": ("如何在家里种植香菜？", "", "zh")}),
    "oasst_trees": (("oasst", "oasst_trees.jsonl", ()),
                    {"read": 5, "replies": 0, "no user turn": 1, "empty": 0, "too long": 0, "duplicates": 1,
                     "written": 3},
                    ["t-01", "t-02", "t-05"],
                    {"t-02": ("¿Qué plantas sobreviven con poca luz?", "", "")}),
    "alpaca": (("alpaca", "alpaca.json", ("--category", "alpaca")),
               {"read": 22, "no user turn": 0, "empty": 2, "too long": 1, "duplicates": 2, "written": 17},
               [data.prompt_id("Give three tips for staying healthy.")],
               {data.prompt_id("Translate the sentence into Spanish.", "Where is the train station?"):
                   ("Translate the sentence into Spanish.", "Where is the train station?", "alpaca"),
                data.prompt_id("日本の伝統的なお正月の食べ物を三つ挙げてください。"):
                   ("日本の伝統的なお正月の食べ物を三つ挙げてください。", "", "alpaca")}),
    "jsonl": (("jsonl", "prompts.jsonl", ()),
              {"read": 10, "no user turn": 0, "empty": 1, "too long": 1, "duplicates": 2, "written": 6},
              ["j01", "j02", data.prompt_id("Explain recursion using a set of Russian dolls."), "j04", "j09", "j10"],
              {"j04": ("Fix the grammar in this sentence.", "Me and him goes to school.", "writing"),
               "j10": ("How do noise-cancelling headphones work?", "", "")}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_format_imports_to_the_expected_pool(case, capsys, tmp_path):
    (fmt, name, extra), counts, first_ids, spots = CASES[case]
    out = tmp_path / "pool.jsonl"
    code, lines, err = run_import(capsys, fmt, sample(name), out=out, extra=extra)
    assert code == 0, err
    assert {k: v for k, v in printed(lines).items() if k in counts} == counts, lines
    assert lines[-1] == f"wrote {out}"
    rows = read_pool(out)
    assert len(rows) == counts["written"]
    assert [r["id"] for r in rows][:len(first_ids)] == first_ids
    by_id = {r["id"]: (r["prompt"], r.get("input", ""), r.get("category", "")) for r in rows}
    for rid, want in spots.items():
        assert by_id[rid] == want, rid
    assert all(set(r) <= {"id", "prompt", "input", "category"} for r in rows)
    assert all(0 < len(r["prompt"]) + len(r.get("input", "")) <= pool.MAX_CHARS for r in rows)
    loaded = data.load_prompts(str(out))  # the pool `run` reads: ids unique, prompts non-empty
    assert [p["prompt_id"] for p in loaded] == [r["id"] for r in rows]
    half = len(loaded) // 2
    rounds = data.split_rounds(loaded, [half, len(loaded) - half], seed=0)
    assert sorted(p["prompt_id"] for r in rounds for p in r) == sorted(r["id"] for r in rows)


def test_the_step_counts_add_up_and_dolly_keeps_its_categories(capsys, tmp_path):
    rows, counts = pool.import_pool([sample("dolly.jsonl")], "dolly")
    assert sum(v for k, v in counts.items() if k != "read") == counts["read"]
    assert counts["duplicates"] == 2 and counts["near_duplicates"] == 1
    assert {r.get("category", "") for r in rows} == {
        "open_qa", "brainstorming", "closed_qa", "classification", "creative_writing", "information_extraction",
        "general_qa", "summarization", ""}
    # the same instruction with other context is another task; with the same context it is a duplicate
    bridges = [r for r in rows if r["prompt"] == "Using the passage, how long is the bridge?"]
    assert len(bridges) == 2 and len({r["input"] for r in bridges}) == 2


def test_near_duplicates_differ_only_in_case_spacing_and_punctuation():
    assert pool.normalize("  Why, do cats knead... BLANKETS ") == pool.normalize("why do cats knead blankets?")
    assert pool.normalize("¿Qué  plantas?") == "qué plantas"
    assert pool.normalize("?!") == "" and pool.normalize("東京。") == "東京"
    assert pool.normalize("why do cats knead blankets") != pool.normalize("why do dogs knead blankets")
    rows, counts = pool.import_pool([sample("sharegpt.json")], "sharegpt")
    assert counts["duplicates"] == 2 and counts["near_duplicates"] == 2
    kept = [r["prompt"] for r in rows]
    assert "Why do cats knead blankets?" in kept and "Why, do cats knead... blankets" not in kept  # the first stays
    assert "What is the difference between a violin and a viola?" in kept


def test_max_chars_and_the_category_flags(tmp_path):
    rows, counts = pool.import_pool([sample("prompts.jsonl")], "jsonl", max_chars=45)
    assert counts["too_long"] == 7 and [r["id"] for r in rows] == ["j09", "j10"]  # 45 and 40 characters
    rows, _ = pool.import_pool([sample("oasst.jsonl")], "oasst")  # no --category-field: one category
    assert all("category" not in r for r in rows)
    rows, _ = pool.import_pool([sample("prompts.jsonl")], "jsonl", category="misc")
    assert {r["category"] for r in rows} == {"everyday", "creative", "coding", "writing", "misc"}
    other = tmp_path / "questions.jsonl"
    other.write_text(json.dumps({"question": "How far away is the horizon at sea?", "topic": "science"}) + "\n")
    rows, _ = pool.import_pool([str(other)], "jsonl", field="question", category_field="topic")
    assert rows == [{"id": data.prompt_id("How far away is the horizon at sea?"),
                     "prompt": "How far away is the horizon at sea?", "category": "science"}]


def test_ids_are_stable_across_reruns_file_names_and_json_layouts(capsys, tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (first, second):
        assert run_import(capsys, "alpaca", sample("alpaca.json"), out=out)[0] == 0
    assert first.read_bytes() == second.read_bytes()
    # the same records as JSONL under another name, and several files at once: the same rows
    copy = tmp_path / "renamed.jsonl"
    with open(sample("sharegpt.json"), encoding="utf-8") as f:
        copy.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in json.load(f)), encoding="utf-8")
    assert pool.import_pool([str(copy)], "sharegpt")[0] == pool.import_pool([sample("sharegpt.json")], "sharegpt")[0]
    both, counts = pool.import_pool([sample("oasst.jsonl"), sample("oasst_trees.jsonl")], "oasst")
    assert [r["id"] for r in both] == [r["id"] for f in ("oasst.jsonl", "oasst_trees.jsonl")
                                       for r in pool.import_pool([sample(f)], "oasst")[0]]
    assert counts["read"] == 35


BAD = {
    "sharegpt": ("sharegpt_bad.json", "sharegpt_bad.json:3: malformed JSON"),
    "dolly": ("dolly_bad.jsonl", "dolly_bad.jsonl:3: malformed JSON"),
    "oasst": ("oasst_bad.jsonl", "oasst_bad.jsonl:2: no `text` field"),
    "alpaca": ("alpaca_bad.json", "alpaca_bad.json: item 3: expected a JSON object"),
    "jsonl": ("jsonl_bad.jsonl", "jsonl_bad.jsonl:4: malformed JSON"),
}


@pytest.mark.parametrize("fmt", list(BAD))
def test_a_malformed_file_exits_2_with_one_line_and_writes_nothing(fmt, capsys, tmp_path):
    name, needle = BAD[fmt]
    out = tmp_path / "pool.jsonl"
    code, lines, err = run_import(capsys, fmt, sample(name), out=out)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("soft-jax: error: ") and needle in err, err
    assert not out.exists() and os.listdir(tmp_path) == []  # no pool, no temp file


@pytest.mark.parametrize("fmt, name, needle", [
    ("sharegpt", "dolly.jsonl", "dolly.jsonl:1: no `conversations` list; --format sharegpt reads"),
    ("alpaca", "oasst.jsonl", "oasst.jsonl:1: no `instruction` field; --format alpaca reads"),
    ("oasst", "prompts.jsonl", "prompts.jsonl:1: no `parent_id` field"),
    ("jsonl", "missing.jsonl", "missing.jsonl: no such file"),
])
def test_the_wrong_format_or_a_missing_file_says_what_and_where(fmt, name, needle, capsys, tmp_path):
    code, _, err = run_import(capsys, fmt, sample(name), out=tmp_path / "pool.jsonl")
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert os.listdir(tmp_path) == []


def test_bad_flags_exit_2(capsys, tmp_path):
    code, _, err = run_import(capsys, "dolly", sample("dolly.jsonl"), out=tmp_path / "pool.txt")
    assert code == 2 and "--out" in err and ".jsonl" in err
    code, _, err = run_import(capsys, "dolly", sample("dolly.jsonl"), out=tmp_path / "p.jsonl",
                              extra=("--max-chars", "0"))
    assert code == 2 and "--max-chars" in err
    code, _, err = run_import(capsys, "dolly", sample("dolly.jsonl"), out=tmp_path / "p.jsonl",
                              extra=("--max-chars", "5"))
    assert code == 2 and "no prompts left" in err and not (tmp_path / "p.jsonl").exists()
    code, _, err = run_import(capsys, "xml", sample("dolly.jsonl"), out=tmp_path / "p.jsonl")
    assert code == 2 and "invalid choice: 'xml'" in err and ", ".join(map(repr, pool.FORMATS)) in err


def test_the_installed_command_exits_2_on_a_malformed_file(tmp_path):
    out = tmp_path / "pool.jsonl"
    proc = subprocess.run([sys.executable, "-m", "soft_jax.cli", "data", "import", "--format", "dolly",
                           sample("dolly_bad.jsonl"), "--out", str(out)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert not out.exists()


def test_tfds_output_round_trips(capsys, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "tfds"
    code, lines, err = run_import(capsys, "dolly", sample("dolly.jsonl"), out=out, extra=("--tfds-name", "my_pool"))
    assert code == 0, err
    rows = read_pool(out / "my_pool.jsonl")
    loaded = data.load_tfds_prompts("my_pool", data_dir=str(out))
    assert [(p["prompt_id"], p["prompt"], p["input"]) for p in loaded] == [
        (r["id"], r["prompt"], r.get("input", "")) for r in rows]
    code, _, err = run_import(capsys, "dolly", sample("dolly.jsonl"), out=out / "x.jsonl",
                              extra=("--tfds-name", "my_pool"))
    assert code == 2 and "TFDS data directory" in err
