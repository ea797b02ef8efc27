"""Prompt pools from the datasets researchers bring: ShareGPT, Dolly, OpenAssistant, Alpaca, plain JSONL.

`soft-jax data import --format FMT IN... --out POOL` keeps the first user turn of each conversation (Dolly and
Alpaca: the instruction, with `context` / `input` as the row's `input`) and writes a pool that
`soft_jax.data.load_prompts` reads: rows {"id", "prompt", "input"?, "category"?}. Each step is counted:

- read: the records of the input files (for OpenAssistant's message export, every message);
- replies (oasst message export only): messages with a parent, i.e. not a conversation's first turn;
- no user turn: a conversation without a user message (or an oasst tree started by the assistant);
- empty: a prompt with no words (blank, or punctuation only);
- too long: prompt + input longer than `max_chars` characters (default 2000, about 500 tokens);
- duplicates: the same prompt + input as a kept row; near duplicates: the same after casefolding, dropping
  punctuation and collapsing whitespace (`normalize`). The first one is kept.

Ids come from the source where it has them (ShareGPT `id`, oasst `message_id`, a JSONL row's `id`), else
from the text (`soft_jax.data.prompt_id`, the hash `load_prompts` gives id-less rows), so a rerun on the same
files gives the same ids whatever the file names or row order. A source id that two different kept prompts
share gets the text hash appended to the later one's. Bad input (a malformed line, a record of another
format, a missing file) is a UserError naming file and line; nothing is written then.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

from soft_jax.core import storage
from soft_jax.core.errors import UserError
from soft_jax.core.io_utils import write_jsonl
from soft_jax.data import prompt_id

MAX_CHARS = 2000
# What each --format expects of a record; quoted in the error for a record that does not fit.
SHAPES = {
    "sharegpt": '{"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}]} (a JSON list or JSONL)',
    "dolly": '{"instruction", "context", "response", "category"} per JSONL line',
    "oasst": '{"message_id", "parent_id", "role": "prompter"|"assistant", "text"} per line, or a tree '
             '{"prompt": {"message_id", "role", "text", "replies"}}',
    "alpaca": '{"instruction", "input", "output"} (a JSON list or JSONL)',
    "jsonl": '{"prompt", "id"?, "input"?, "category"?} per JSONL line (--field names another prompt key)',
}
FORMATS = tuple(SHAPES)
COUNTS = ("read", "replies", "no_user_turn", "empty", "too_long", "duplicates", "near_duplicates", "written")
_USER_ROLES = ("human", "user", "prompter")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One record's first user turn (prompt None: it has none), before the pool's filters."""

    source_id: str
    prompt: str | None
    input: str = ""
    category: str = ""


@dataclasses.dataclass(frozen=True)
class Options:
    """How records become candidates: the prompt key (jsonl), the category key and the category to fall back on."""

    fmt: str
    field: str = "prompt"
    category_field: str | None = None
    category: str = ""


def normalize(text: str) -> str:
    """The text near-duplicates share: NFKC, casefolded, punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(c for c in text if not unicodedata.category(c).startswith("P")).split())


# ---------------------------------------------------------------------------------------------- reading

def _records(path: str, fmt: str) -> Iterator[tuple[str, Any]]:
    """(where, record) of a JSON-list file (first non-blank character `[`) or a JSONL file."""
    if not storage.isfile(storage.check(path)):
        raise UserError(f"{path}: no such file; give the path of a {fmt} file ({SHAPES[fmt]})")
    try:
        text = storage.read_text(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert the file to UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno}); a file starting "
                            "with [ must be one JSON list of records") from None
        yield from ((f"{path}: item {n}", item) for n, item in enumerate(items, 1))
        return
    found = False
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno}); each line must be one "
                            "JSON object (or give the whole file as one JSON list)") from None
        found = True
    if not found:
        raise UserError(f"{path}: the file has no records; expected {SHAPES[fmt]}")


def _object(record: Any, where: str, fmt: str) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}; --format {fmt} reads "
                        f"{SHAPES[fmt]}")
    return record


def _string(row: dict, key: str, where: str, fmt: str, required: bool = True) -> str:
    """row[key] as a string ("" when absent and not required); a wrong shape names the format expected."""
    if key not in row or row[key] is None:
        if required:
            flag = "--format and --field" if fmt == "jsonl" else "--format"
            raise UserError(f"{where}: no `{key}` field; --format {fmt} reads {SHAPES[fmt]}; check {flag} "
                            "against the file")
        return ""
    if not isinstance(row[key], str):
        raise UserError(f"{where}: `{key}` must be a string, got {type(row[key]).__name__}; fix the record or "
                        "check --format")
    return row[key]


def _id(value: Any) -> str:
    return "" if value is None or isinstance(value, (dict, list)) else str(value).strip()


def _category(row: dict, opts: Options, default_field: str | None = None) -> str:
    key = opts.category_field or default_field
    value = row.get(key) if key else None
    return opts.category if value is None or isinstance(value, (dict, list)) else str(value).strip()


def _sharegpt(where: str, row: dict, opts: Options) -> Candidate | None:
    turns = row.get("conversations", row.get("messages"))
    if not isinstance(turns, list):
        raise UserError(f"{where}: no `conversations` list; --format sharegpt reads {SHAPES['sharegpt']}; "
                        "check --format against the file")
    for k, turn in enumerate(turns, 1):
        turn = _object(turn, f"{where}: turn {k}", "sharegpt")
        role = turn.get("from", turn.get("role"))
        if str(role).lower() in _USER_ROLES:
            key = "value" if "value" in turn else "content"
            return Candidate(_id(row.get("id")), _string(turn, key, f"{where}: turn {k}", "sharegpt"),
                             category=_category(row, opts))
    return Candidate(_id(row.get("id")), None)


def _instruction(input_key: str) -> Callable[[str, dict, Options], Candidate]:
    """Dolly (instruction + context) and Alpaca (instruction + input) records."""

    def read(where: str, row: dict, opts: Options) -> Candidate:
        return Candidate(_id(row.get("id")), _string(row, "instruction", where, opts.fmt),
                         _string(row, input_key, where, opts.fmt, required=False),
                         _category(row, opts, "category" if opts.fmt == "dolly" else None))

    return read


def _oasst(where: str, row: dict, opts: Options) -> Candidate | None:
    """A message of the oasst message export (None for a reply) or a tree of the trees export."""
    tree = isinstance(row.get("prompt"), dict)
    message = row["prompt"] if tree else row
    if not tree and "parent_id" not in row:
        raise UserError(f"{where}: no `parent_id` field (nor a `prompt` tree); --format oasst reads "
                        f"{SHAPES['oasst']}; check --format against the file")
    if not tree and row["parent_id"] is not None:
        return None
    role = _string(message, "role", where, "oasst")
    mid = _id(message.get("message_id"))
    if role not in _USER_ROLES:
        return Candidate(mid, None)
    return Candidate(mid, _string(message, "text", where, "oasst"), category=_category({**row, **message}, opts))


def _jsonl(where: str, row: dict, opts: Options) -> Candidate:
    return Candidate(_id(row.get("id")), _string(row, opts.field, where, "jsonl"),
                     _string(row, "input", where, "jsonl", required=False), _category(row, opts, "category"))


READERS: dict[str, Callable[[str, dict, Options], Candidate | None]] = {
    "sharegpt": _sharegpt, "dolly": _instruction("context"), "oasst": _oasst, "alpaca": _instruction("input"),
    "jsonl": _jsonl}


# ---------------------------------------------------------------------------------------------- the pool

def import_pool(paths: list[str], fmt: str, *, field: str = "prompt", category_field: str | None = None,
                category: str = "", max_chars: int = MAX_CHARS) -> tuple[list[dict], dict[str, int]]:
    """(pool rows {"id", "prompt", "input"?, "category"?}, counts of each step in COUNTS) of the files in paths."""
    if fmt not in READERS:
        raise UserError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if max_chars < 1:
        raise UserError(f"--max-chars {max_chars}: give the longest prompt + input to keep, in characters (> 0)")
    if not paths:
        raise UserError("no input files; give one or more files after --format")
    opts = Options(fmt, field, category_field, category)
    counts = dict.fromkeys(COUNTS, 0)
    exact: set[tuple[str, str]] = set()
    near: set[tuple[str, str]] = set()
    ids: set[str] = set()
    rows = []
    for path in paths:
        for where, record in _records(path, fmt):
            counts["read"] += 1
            cand = READERS[fmt](where, _object(record, where, fmt), opts)
            step = _verdict(cand, max_chars, exact, near)
            counts[step] += 1
            if step != "written":
                continue
            prompt, inp = cand.prompt.strip(), cand.input.strip()
            pid = cand.source_id or prompt_id(prompt, inp)
            if pid in ids:  # a source id two different prompts share: the later one gets its text hash too
                pid = f"{pid}-{prompt_id(prompt, inp)[1:]}"
            ids.add(pid)
            rows.append({"id": pid, "prompt": prompt, **({"input": inp} if inp else {}),
                         **({"category": cand.category} if cand.category else {})})
    return rows, counts


def _verdict(cand: Candidate | None, max_chars: int, exact: set, near: set) -> str:
    """The COUNTS step a candidate ends in ("written": kept); records a kept one's texts in exact and near."""
    if cand is None:
        return "replies"
    if cand.prompt is None:
        return "no_user_turn"
    prompt, inp = cand.prompt.strip(), cand.input.strip()
    if not normalize(prompt):
        return "empty"
    if len(prompt) + len(inp) > max_chars:
        return "too_long"
    if (prompt, inp) in exact:
        return "duplicates"
    key = (normalize(prompt), normalize(inp))
    if key in near:
        return "near_duplicates"
    exact.add((prompt, inp))
    near.add(key)
    return "written"


def describe(counts: dict[str, int], max_chars: int = MAX_CHARS, fmt: str = "") -> list[str]:
    """The count lines `data import` prints, one per step."""
    lines = [f"read          {counts['read']:6d} records"]
    if fmt == "oasst":
        lines.append(f"replies       {counts['replies']:6d} (messages that are not a conversation's first turn)")
    lines += [f"no user turn  {counts['no_user_turn']:6d}",
              f"empty         {counts['empty']:6d}",
              f"too long      {counts['too_long']:6d} (prompt + input over {max_chars} characters; --max-chars)",
              f"duplicates    {counts['duplicates'] + counts['near_duplicates']:6d} ({counts['duplicates']} exact, "
              f"{counts['near_duplicates']} near: same text up to case, spacing and punctuation; first one kept)",
              f"written       {counts['written']:6d} prompts"]
    return lines


def write_pool(rows: list[dict], out: str, tfds_name: str = "") -> str:
    """Writes the pool atomically; returns what was written.

    `out` ending in .jsonl: that JSONL file. With `tfds_name`, `out` is a TFDS data dir instead: the pool goes to
    OUT/NAME.jsonl and the array_record dataset OUT/NAME/1.0.0 (soft_jax.data.tfds; ids, prompts and inputs:
    a TFDS pool has no categories), replacing one of that name."""
    if not rows:
        raise UserError("no prompts left to write (see the counts above); check --format, --field and --max-chars")
    if not tfds_name:
        if not out.endswith(".jsonl"):
            raise UserError(f"--out {out}: give a .jsonl file, or --tfds-name NAME to write a TFDS dataset under "
                            "the directory OUT")
        write_jsonl(out, rows)
        return out
    from soft_jax.data import tfds

    if out.endswith(".jsonl"):
        raise UserError(f"--out {out}: with --tfds-name, --out is the TFDS data directory; drop .jsonl")
    jsonl = os.path.join(out, f"{tfds_name}.jsonl")
    with tempfile.TemporaryDirectory() as tmp:  # the dataset first, from a temp copy: a failed build leaves no pool
        staged = os.path.join(tmp, os.path.basename(jsonl))
        write_jsonl(staged, [{k: r[k] for k in ("id", "prompt", "input") if k in r} for r in rows])
        tfds.build_prompt_dataset(staged, out, tfds_name, overwrite=True)
    write_jsonl(jsonl, rows)
    return f"{jsonl} and the TFDS dataset {tfds_name} (config: prompts.tfds={tfds_name}, prompts.tfds_data_dir={out})"
