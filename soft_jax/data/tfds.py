"""TFDS datasets without TensorFlow: prompt pools and the evaluation sets as array_record TFDS datasets.

`tensorflow-datasets` writes and reads array_record datasets with NumPy alone (`tfds.data_source`,
`builder.as_data_source()`); TensorFlow is never imported. Three kinds of dataset:

- prompt pools: `build_prompt_dataset(jsonl, data_dir, name)` turns a JSONL prompt file (rows
  `{"prompt", "id"?, "input"?}`) into a dataset with `prompt`, `id` and `input` text features, rows in
  file order; `load_prompts(name, split, data_dir)` reads it, or any other array_record TFDS dataset
  with a text feature to use as the prompt, back as rows `{"prompt", "id", "input"}`.
- `soft_jax_hhh`: BIG-bench HHH Eval (bigbench 1.0.0 source archive), split `test`, features
  `subset`, `input`, `choices` (the two answers), `target_scores` (1 for the better answer).
- `soft_jax_truthfulqa`: BIG-bench's 299-question TruthfulQA, split `test`, features `question`,
  `mc1_targets` and `mc2_targets`, each `{choices, labels}` (the layout of the HF multiple_choice set).

`build_eval_datasets(data_dir)` writes both from the same files `soft_jax.data.sources` reads, and
`load_eval_items(task, data_dir)` gives back the loaders' `MCItem` lists.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from soft_jax.core.errors import UserError

try:
    import tensorflow_datasets as tfds
except ImportError:  # the guard: everything below raises a UserError saying how to install it
    tfds = None

PROMPT_VERSION = "1.0.0"
EVAL_VERSION = "1.0.0"  # follows the bigbench 1.0.0 archive the items come from
EVAL_SPLIT = "test"
EVAL_DATASETS = {"hhh": "soft_jax_hhh", "truthfulqa_mc1": "soft_jax_truthfulqa",
                 "truthfulqa_mc2": "soft_jax_truthfulqa"}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _require():
    if tfds is None:
        raise UserError("tensorflow-datasets is not installed; pip install tensorflow-datasets "
                        "(TensorFlow itself is not needed)")
    return tfds


def _text(value: Any) -> str:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy scalar / 0-d array
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _texts(values) -> list[str]:
    return [_text(v) for v in values]


def _define_builders(tfds):
    """The builder classes; defined only when tensorflow_datasets imports. The eval ones are registered."""

    import numpy as np

    text = tfds.features.Text

    class JsonlPrompts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """A prompt pool read from rows already checked by `build_prompt_dataset`; its name is chosen per call."""

        VERSION = tfds.core.Version(PROMPT_VERSION)
        RELEASE_NOTES = {PROMPT_VERSION: "Prompt pool from a JSONL file."}

        def __init__(self, *, name: str, rows: list[dict], source: str = "", **kwargs):
            self.name = name
            self._rows, self._source = rows, source
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=f"Prompts from {self._source or 'a JSONL file'} (soft-jax).",
                features=tfds.features.FeaturesDict({"prompt": text(), "id": text(), "input": text()}),
                disable_shuffling=True)  # keeps the file's order

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from enumerate(self._rows)

    class _EvalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(EVAL_VERSION)
        RELEASE_NOTES = {EVAL_VERSION: "Task files of the bigbench 1.0.0 source archive (PyPI)."}
        HOMEPAGE = "https://github.com/google/BIG-bench"

        def __init__(self, **kwargs):
            kwargs.setdefault("file_format", "array_record")
            super().__init__(**kwargs)

        def _split_generators(self, dl_manager):
            return {EVAL_SPLIT: self._generate_examples()}

    class SoftJaxHhh(_EvalBuilder):
        """BIG-bench HHH Eval: 221 pairs of answers (harmless, helpful, honest, other)."""

        name = "soft_jax_hhh"

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=self.__doc__, homepage=self.HOMEPAGE, disable_shuffling=True,
                features=tfds.features.FeaturesDict({
                    "subset": text(), "input": text(),
                    "choices": tfds.features.Sequence(text()),
                    "target_scores": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32))}))

        def _generate_examples(self):
            from soft_jax.data import sources

            for i, item in enumerate(sources.load_hhh()):
                yield i, {"subset": item.subset, "input": item.question, "choices": item.choices,
                          "target_scores": item.labels}

    class SoftJaxTruthfulqa(_EvalBuilder):
        """BIG-bench TruthfulQA (299 questions): MC1 (one best answer) and MC2 (all true vs all false) targets."""

        name = "soft_jax_truthfulqa"

        def _info(self):
            targets = lambda: tfds.features.FeaturesDict({
                "choices": tfds.features.Sequence(text()),
                "labels": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int32))})
            return tfds.core.DatasetInfo(
                builder=self, description=self.__doc__, homepage=self.HOMEPAGE, disable_shuffling=True,
                features=tfds.features.FeaturesDict({"question": text(), "mc1_targets": targets(),
                                                     "mc2_targets": targets()}))

        def _generate_examples(self):
            from soft_jax.data import sources

            mc1, mc2 = sources.load_truthfulqa("mc1"), sources.load_truthfulqa("mc2")
            if [i.question for i in mc1] != [i.question for i in mc2]:
                raise UserError("the BIG-bench TruthfulQA files (task_mc.json, questions.json) list different "
                                f"questions; delete {sources.cache_dir()}/tasks to re-extract them from the archive")
            for i, (a, b) in enumerate(zip(mc1, mc2)):
                yield i, {"question": a.question, "mc1_targets": {"choices": a.choices, "labels": a.labels},
                          "mc2_targets": {"choices": b.choices, "labels": b.labels}}

    return JsonlPrompts, {SoftJaxHhh.name: SoftJaxHhh, SoftJaxTruthfulqa.name: SoftJaxTruthfulqa}


if tfds is not None:
    JsonlPrompts, EVAL_BUILDERS = _define_builders(tfds)


# ---------------------------------------------------------------------------------------------- prompts

def _prompt_rows(jsonl_path: str, name: str) -> list[dict]:
    from soft_jax.core.io_utils import read_jsonl

    rows, seen = [], {}
    for n, row in enumerate(read_jsonl(jsonl_path, required=("prompt",)), 1):
        where = f"{jsonl_path}: row {n}"
        for key in ("prompt", "input"):
            if not isinstance(row.get(key, ""), str):
                raise UserError(f"{where}: `{key}` must be a string, got {type(row[key]).__name__}")
        if not row["prompt"]:
            raise UserError(f"{where}: `prompt` is empty; remove the row or fill it in")
        rid = str(row["id"]) if row.get("id") not in (None, "") else f"{name}/train/{n - 1}"
        if rid in seen:
            raise UserError(f"{where}: id {rid!r} repeats row {seen[rid]}; ids must be unique")
        seen[rid] = n
        rows.append({"prompt": row["prompt"], "id": rid, "input": row.get("input") or ""})
    return rows


def build_prompt_dataset(jsonl_path: str, data_dir: str, name: str = "soft_jax_prompts", *,
                         overwrite: bool = False) -> None:
    """Writes DATA_DIR/NAME/1.0.0 (array_record, split `train`, rows in file order) from a JSONL prompt file.

    Rows without an `id` get `NAME/train/INDEX`. Rebuilding the same rows is a no-op; other rows under an
    existing NAME need `overwrite=True`.
    """
    tfds = _require()
    if not _NAME.match(name):
        raise UserError(f"dataset name {name!r} is not valid; use lower-case letters, digits and _ "
                        "(starting with a letter)")
    if name in tfds.list_builders(with_community_datasets=False):
        raise UserError(f"dataset name {name!r} is taken by a registered TFDS builder; pick another name")
    rows = _prompt_rows(jsonl_path, name)
    builder = JsonlPrompts(name=name, rows=rows, source=os.path.basename(jsonl_path), data_dir=data_dir,
                           file_format="array_record")
    if builder.is_prepared():
        if _read_prompt_rows(name, "train", data_dir) == rows:
            return
        if not overwrite:
            raise UserError(f"{builder.data_dir} already holds a different prompt dataset {name!r}; pass "
                            "overwrite=True to replace it, or pick another name")
        shutil.rmtree(builder.data_dir)
        builder = JsonlPrompts(name=name, rows=rows, source=os.path.basename(jsonl_path), data_dir=data_dir,
                               file_format="array_record")
    builder.download_and_prepare(file_format="array_record")


def _builder(name: str, data_dir: str | None, how_to_build: str):
    """An array_record TFDS builder that is prepared, or a one-line UserError."""
    tfds = _require()
    where = data_dir or "the default TFDS data dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
    if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
        raise UserError(f"TFDS data_dir {data_dir} does not exist; {how_to_build}")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"no TFDS dataset {name!r} in {where}; {how_to_build}") from None
    except (ValueError, AssertionError, ImportError, OSError) as e:  # e.g. a version that is not there
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"cannot open TFDS dataset {name!r} in {where} ({type(e).__name__}: {first}); "
                        f"{how_to_build}") from None
    if not builder.is_prepared():
        raise UserError(f"TFDS dataset {name!r} is not prepared in {where}; {how_to_build}")
    formats = set(builder.info.available_file_formats()) | {builder.info.file_format}
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
        stored = ", ".join(sorted(str(f.value) for f in formats if f is not None)) or "an unknown format"
        raise UserError(f"TFDS dataset {name!r} in {builder.data_dir} is stored as {stored}, not array_record "
                        "(the format soft-jax reads, without TensorFlow); prepare it again with "
                        "download_and_prepare(file_format='array_record')")
    return builder


def _source(builder, name: str, split: str):
    splits = list(builder.info.splits)
    if split.split("[")[0] not in splits:
        raise UserError(f"TFDS dataset {name!r} has no split {split!r}; use one of {', '.join(splits)}")
    try:
        return builder.as_data_source(split=split, file_format="array_record")
    except ValueError as e:  # a malformed slice such as train[:x]
        raise UserError(f"TFDS dataset {name!r}: bad split {split!r} ({str(e).splitlines()[0]}); "
                        "use e.g. train, train[:100] or train[10%:]") from None


def _feature(features, key: str) -> bool:
    node = features
    for part in key.split("/"):
        if not hasattr(node, "keys") or part not in node.keys():
            return False
        node = node[part]
    return True


def _get(example: dict, key: str):
    for part in key.split("/"):
        example = example[part]
    return example


def _read_prompt_rows(name, split, data_dir, prompt_key="prompt", id_key="id", input_key="input"):
    tfds = _require()
    if name in EVAL_DATASETS.values():
        how = f"build it with soft_jax.data.tfds.build_eval_datasets({data_dir or 'DATA_DIR'!r})"
    elif _NAME.match(name) and name not in tfds.list_builders(with_community_datasets=False):
        how = ("build it with soft_jax.data.tfds.build_prompt_dataset(jsonl_path, "
               f"{data_dir or 'DATA_DIR'!r}, name={name!r})")
    else:
        how = f"prepare it with tfds.builder({name!r}, data_dir=...).download_and_prepare(file_format='array_record')"
    builder = _builder(name, data_dir, how)
    features = builder.info.features
    if not _feature(features, prompt_key):
        raise UserError(f"TFDS dataset {name!r} has no feature {prompt_key!r} to use as the prompt; give "
                        f"prompt_key= one of {', '.join(sorted(features.keys()))}")
    has_id = bool(id_key) and _feature(features, id_key)
    has_input = bool(input_key) and _feature(features, input_key)
    source = _source(builder, name, split)
    rows = []
    for i in range(len(source)):
        ex = source[i]
        rows.append({"prompt": _text(_get(ex, prompt_key)),
                     "id": _text(_get(ex, id_key)) if has_id else f"{name}/{split}/{i}",
                     "input": _text(_get(ex, input_key)) if has_input else ""})
    return rows


def load_prompts(name: str, split: str = "train", data_dir: str | None = None, prompt_key: str = "prompt",
                 id_key: str | None = "id", input_key: str | None = "input") -> list[dict]:
    """Rows {"prompt", "id", "input"} (str) of an array_record TFDS dataset, read with NumPy only.

    Keys may name nested features as "a/b". Without an id feature the ids are NAME/SPLIT/INDEX; without
    an input feature the input is "".
    """
    return _read_prompt_rows(name, split, data_dir, prompt_key, id_key, input_key)


# ------------------------------------------------------------------------------------------- evaluation

def build_eval_datasets(data_dir: str) -> None:
    """Writes soft_jax_hhh and soft_jax_truthfulqa (array_record, split `test`) under data_dir.

    The items come from the cached bigbench 1.0.0 archive (fetched from PyPI once if missing). Already
    prepared datasets are left as they are.
    """
    _require()
    for cls in EVAL_BUILDERS.values():
        cls(data_dir=data_dir).download_and_prepare(file_format="array_record")


def load_eval_items(task: str, data_dir: str | None = None, limit: int | None = None):
    """The `MCItem`s of task hhh, truthfulqa_mc1 or truthfulqa_mc2, as `soft_jax.data.sources` loads them.

    `limit` means what it means to the loaders: per HHH subset, or the first `limit` TruthfulQA items.
    """
    if task not in EVAL_DATASETS:
        raise UserError(f"unknown evaluation task {task!r}; use one of {', '.join(EVAL_DATASETS)}")
    _require()
    from soft_jax.data.sources import HHH_SUBSETS, MCItem

    name = EVAL_DATASETS[task]
    builder = _builder(name, data_dir,
                       f"build it with soft_jax.data.tfds.build_eval_datasets({data_dir or 'DATA_DIR'!r})")
    source = _source(builder, name, EVAL_SPLIT)
    examples = [source[i] for i in range(len(source))]
    if task == "hhh":
        items = [MCItem(_text(e["input"]), _texts(e["choices"]), [int(v) for v in e["target_scores"]],
                        _text(e["subset"])) for e in examples]
        return [it for s in HHH_SUBSETS for it in [i for i in items if i.subset == s][:limit]]
    targets = f"{task.split('_')[1]}_targets"
    return [MCItem(_text(e["question"]), _texts(e[targets]["choices"]), [int(v) for v in e[targets]["labels"]])
            for e in examples][:limit]
