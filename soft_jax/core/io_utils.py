"""File helpers shared by the CLI and the run loop: JSONL reading with line numbers, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable

from soft_jax.core import faults
from soft_jax.core.errors import UserError


def cache_dir(*parts: str) -> str:
    """Where downloads and derived files are cached: $SOFT_JAX_CACHE, else ~/.cache/soft_jax."""
    return os.path.join(os.environ.get("SOFT_JAX_CACHE", os.path.expanduser("~/.cache/soft_jax")), *parts)


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


def write_atomic(path: str, data: str | bytes, fault: bool = True) -> None:
    """Writes text (UTF-8) or bytes to path via a temp file in the same directory and a rename: never a
    half-written file. fault: a fault-injection point halfway (`write:NAME`, soft_jax.core.faults).

    A kill before the rename leaves the old file (or none) and a stray `.NAME.*.tmp` (remove_stray_temps)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with (os.fdopen(fd, "wb") if isinstance(data, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as f:
            f.write(data[:len(data) // 2])
            if fault:
                faults.point(f"write:{os.path.basename(path)}")
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_dir(path: str, fill: Callable[[str], None]) -> None:
    """Writes the directory `path` atomically: `fill(tmp)` fills a fresh temp directory beside it, which then
    replaces `path` (a failure leaves the old one as it was, and no temp directory). The old directory is
    renamed aside before the new one is renamed in, so `path` is never half-written."""
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
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:  # soft-jax writes atomically: something else damaged the file
            raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}); the file was damaged outside "
                            "soft-jax: restore it, or start over with a new --workdir") from None


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_jsonl(path: str, rows: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def remove_stray_temps(directory: str, skip: tuple[str, ...] = ()) -> int:
    """Removes the temp files that writes killed before their rename left under directory (not under its
    subdirectories named in skip); returns how many."""
    n = 0
    for d, subdirs, names in os.walk(directory):
        subdirs[:] = [s for s in subdirs if not (d == directory and s in skip)]
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(d, name))
                n += 1
    return n


def read_appended(path: str) -> list[dict[str, Any]]:
    """JSON lines of an append-only file; a torn last line (a kill mid-append) is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # the last append never finished
            rows.append(json.loads(line))
    return rows


def append_line(path: str, row: dict[str, Any]) -> None:
    """Appends one JSON line and syncs it. A kill mid-append leaves a line without its newline, which
    read_appended drops; the next append drops it first, so a row never glues onto a torn one."""
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            write_jsonl(path, read_appended(path))
    line = json.dumps(row, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line[:len(line) // 2])
        f.flush()
        faults.point(f"append:{os.path.basename(path)}")
        f.write(line[len(line) // 2:])
        f.flush()
        os.fsync(f.fileno())
