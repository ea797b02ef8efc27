"""File helpers shared by the CLI and the run loop: JSONL reading with line numbers, atomic writes, appends;
local paths and gs:// alike (soft_jax.core.storage)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from soft_jax.core import storage
from soft_jax.core.errors import UserError


def cache_dir(*parts: str) -> str:
    """Where downloads and derived files are cached: $SOFT_JAX_CACHE, else ~/.cache/soft_jax."""
    return os.path.join(os.environ.get("SOFT_JAX_CACHE", os.path.expanduser("~/.cache/soft_jax")), *parts)


def local_copy(path: str, keep=None) -> str:
    """A local path with what `path` holds: itself, or for gs:// a copy in the cache, fetched again only for objects
    that changed (models and adapters are memory-mapped and read by libraries that need local files); keep: which
    names under a prefix to fetch (storage.local_copy)."""
    return storage.local_copy(storage.check(path), cache_dir("gcs"), keep)


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows of a JSONL file (local or gs://); a malformed line or a row missing a required key is a UserError
    naming its line."""
    storage.check(path)
    if not storage.isfile(path):
        raise UserError(f"{path}: no such file; give a JSONL file with one JSON object per line")
    rows = []
    for n, line in enumerate(storage.read_text(path).replace("\r\n", "\n").split("\n"), 1):
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


write_atomic = storage.write_atomic


def write_dir(path: str, fill: Callable[[str], None]) -> None:
    """Writes the directory `path` atomically: `fill(tmp)` fills a fresh temp directory, which then replaces
    `path` (a failure leaves the old one as it was, and no temp directory). Locally the old directory is
    renamed aside before the new one is renamed in, so `path` is never half-written; on a bucket the files are
    uploaded with the configs last (soft_jax.core.storage.upload_dir)."""
    if storage.is_gcs(path):
        tmp = tempfile.mkdtemp(prefix=".soft-jax-upload-")
        try:
            fill(tmp)
            storage.upload_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}-", dir=parent)
    try:
        fill(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(path)}-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str, default=None):
    """A JSON file soft-jax wrote (atomically), or `default` when there is none; a damaged one is a UserError."""
    if not storage.exists(path):
        return default
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:  # soft-jax writes atomically: something else damaged the file
        raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}); the file was damaged outside "
                        "soft-jax: restore it, or start over with a new --workdir") from None


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def remove_stray_temps(directory: str, skip: tuple[str, ...] = ()) -> int:
    """Removes the temp files that writes killed before their rename (or an append before its compose) left
    under directory (not under its subdirectories named in skip); returns how many."""
    n = 0
    for rel in storage.files(directory):
        name = os.path.basename(rel)
        if rel.split("/")[0] in skip or not (name.startswith(".") and name.endswith(".tmp")):
            continue
        storage.remove(storage.join(directory, rel))
        n += 1
    return n


def read_appended(path: str) -> list[dict[str, Any]]:
    """JSON lines of an append-only file; a torn last line (a kill mid-append) is dropped."""
    if not storage.exists(path):
        return []
    rows = []  # a torn append may end mid-character: decode leniently, the torn line is dropped anyway
    *lines, torn = storage.read_bytes(path).decode("utf-8", errors="replace").split("\n")
    for line in lines:  # `torn`: what follows the last newline, an append that never finished (or "")
        rows.append(json.loads(line))
    return rows


def append_line(path: str, row: dict[str, Any]) -> None:
    """Appends one JSON line durably (soft_jax.core.storage.append). A kill mid-append leaves, locally, a line
    without its newline, which read_appended drops; the next append drops it first, so a row never glues onto a
    torn one. A bucket's append is whole or absent."""
    if not storage.is_gcs(path) and os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            write_jsonl(path, read_appended(path))
    line = json.dumps(row, ensure_ascii=False) + "\n"
    storage.append(path, line.encode("utf-8"), fault=f"append:{os.path.basename(path)}")
