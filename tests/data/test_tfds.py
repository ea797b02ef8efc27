"""TFDS without TensorFlow: JSONL prompt pools and the BIG-bench evaluation sets as array_record datasets."""

import json
import os
import subprocess
import sys

# Hard dependencies (setup.py's install_requires: tensorflow-datasets, which requires array_record): imported
# plainly, so a broken install fails here instead of skipping the file.
import array_record.python.array_record_data_source  # noqa: F401 - what tfds reads array_record files with
import pytest
import tensorflow_datasets  # noqa: F401 - imported to fail here, as above

from soft_jax.core.errors import UserError
from soft_jax.data import tfds as T

ROWS = [{"prompt": f"Prompt {i}: ünïcode ✓", "id": f"q{i}", **({"input": f"ctx {i}"} if i % 3 == 0 else {})}
        for i in range(25)]  # > 10 rows: a string sort of the keys would reorder them


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


def expected(rows, name="soft_jax_prompts"):
    return [{"prompt": r["prompt"], "id": str(r["id"]) if r.get("id") not in (None, "") else f"{name}/train/{i}",
             "input": r.get("input", "")} for i, r in enumerate(rows)]


def test_prompt_round_trip_keeps_ids_and_order(tmp_path):
    src, data_dir = write_jsonl(tmp_path / "p.jsonl", ROWS), str(tmp_path / "tfds")
    T.build_prompt_dataset(src, data_dir)
    assert os.path.isfile(os.path.join(data_dir, "soft_jax_prompts", "1.0.0", "dataset_info.json"))
    assert T.load_prompts("soft_jax_prompts", data_dir=data_dir) == expected(ROWS)
    assert T.load_prompts("soft_jax_prompts", "train[:3]", data_dir) == expected(ROWS)[:3]
    T.build_prompt_dataset(src, data_dir)  # same rows: a no-op
    assert "tensorflow" not in sys.modules


def test_rows_without_ids_and_overwrite(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "b", "id": 7}, {"prompt": "c", "input": "x"}]
    data_dir = str(tmp_path / "tfds")
    T.build_prompt_dataset(write_jsonl(tmp_path / "p.jsonl", rows), data_dir, name="pool")
    assert T.load_prompts("pool", data_dir=data_dir) == [
        {"prompt": "a", "id": "pool/train/0", "input": ""}, {"prompt": "b", "id": "7", "input": ""},
        {"prompt": "c", "id": "pool/train/2", "input": "x"}]
    other = write_jsonl(tmp_path / "q.jsonl", ROWS[:4])
    with pytest.raises(UserError, match="overwrite=True"):
        T.build_prompt_dataset(other, data_dir, name="pool")
    T.build_prompt_dataset(other, data_dir, name="pool", overwrite=True)
    assert T.load_prompts("pool", data_dir=data_dir) == expected(ROWS[:4], "pool")
    # other feature names; no id feature -> NAME/SPLIT/INDEX ids; no input feature -> ""
    assert T.load_prompts("pool", data_dir=data_dir, prompt_key="input", id_key=None, input_key="nope") == [
        {"prompt": r.get("input", ""), "id": f"pool/train/{i}", "input": ""} for i, r in enumerate(ROWS[:4])]


def one_line_user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_errors_are_one_line(tmp_path):
    data_dir = str(tmp_path / "tfds")
    os.makedirs(data_dir)
    msg = one_line_user_error(T.load_prompts, "missing_pool", data_dir=data_dir)
    assert "missing_pool" in msg and "build_prompt_dataset" in msg
    assert "does not exist" in one_line_user_error(T.load_prompts, "x", data_dir=str(tmp_path / "nowhere"))
    assert "build_eval_datasets" in one_line_user_error(T.load_eval_items, "hhh", data_dir)
    assert "unknown evaluation task" in one_line_user_error(T.load_eval_items, "mmlu", data_dir)

    src = write_jsonl(tmp_path / "p.jsonl", ROWS[:3])
    T.build_prompt_dataset(src, data_dir, name="pool")
    assert "prompt_key" in one_line_user_error(T.load_prompts, "pool", data_dir=data_dir, prompt_key="text")
    assert "no split 'test'" in one_line_user_error(T.load_prompts, "pool", "test", data_dir)
    assert "not valid" in one_line_user_error(T.build_prompt_dataset, src, data_dir, name="Bad-Name")
    assert "registered" in one_line_user_error(T.build_prompt_dataset, src, data_dir, name="mnist")
    assert "download_and_prepare" in one_line_user_error(T.load_prompts, "mnist", data_dir=data_dir)  # catalog

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}])
    assert "bad.jsonl: row 2" in one_line_user_error(T.build_prompt_dataset, bad, data_dir, name="bad")
    assert "no such file" in one_line_user_error(T.build_prompt_dataset, str(tmp_path / "none.jsonl"), data_dir)

    # a dataset stored in another format (parquet: also written without TensorFlow)
    rows = T._prompt_rows(src, "pq")
    T.JsonlPrompts(name="pq", rows=rows, data_dir=data_dir).download_and_prepare(file_format="parquet")
    assert "not array_record" in one_line_user_error(T.load_prompts, "pq", data_dir=data_dir)


def test_missing_tensorflow_datasets_is_a_user_error(tmp_path):
    code = ("import sys; sys.modules['tensorflow_datasets'] = None\n"
            "import soft_jax.data.tfds as t\nfrom soft_jax.core.errors import UserError\n"
            "try:\n    t.load_prompts('x')\nexcept UserError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install tensorflow-datasets" in out


@pytest.fixture(params=["in-house", pytest.param("BIG-bench", marks=pytest.mark.slow)])
def hhh_size(request):
    """The HHH items the loaders read: the in-house ones, or the real set where it is (else the test skips)."""
    if request.param == "in-house":
        request.getfixturevalue("inhouse_bigbench")
        return 11
    request.getfixturevalue("real_bigbench")
    return 221


def test_eval_datasets_equal_the_loaders(tmp_path, hhh_size):
    from soft_jax.data import sources

    data_dir = str(tmp_path / "tfds")
    T.build_eval_datasets(data_dir)
    T.build_eval_datasets(data_dir)  # prepared: left as is
    hhh = T.load_eval_items("hhh", data_dir)
    assert hhh == sources.load_hhh() and len(hhh) == hhh_size and all(len(i.choices) == 2 for i in hhh)
    for kind in ("mc1", "mc2"):
        assert T.load_eval_items(f"truthfulqa_{kind}", data_dir) == sources.load_truthfulqa(kind)
        assert T.load_eval_items(f"truthfulqa_{kind}", data_dir, limit=5) == sources.load_truthfulqa(kind, limit=5)
    assert T.load_eval_items("hhh", data_dir, limit=3) == sources.load_hhh(3)
    # the generic reader works on them too
    rows = T.load_prompts("soft_jax_truthfulqa", "test", data_dir, prompt_key="question")
    assert [r["prompt"] for r in rows] == [i.question for i in sources.load_truthfulqa("mc1")]
    assert rows[0]["id"] == "soft_jax_truthfulqa/test/0"
    assert "tensorflow" not in sys.modules
