"""File helpers shared by the CLI and the run loop: JSONL reading with line numbers, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterable

from soft_jax.errors import UserError


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a malformed line or a row missing a required key is a UserError naming its line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; give a JSONL file with one JSON object per line")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise UserError(f"{path}:{n}: missing key(s) {', '.join(missing)}")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: the file has no rows; add one JSON object per line")
    return rows


def write_atomic(path: str, text: str) -> None:
    """Writes text to path via a temp file in the same directory and a rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
