"""JAX's persistent compilation cache: one policy for the CLI's commands and for the tests.

A command that runs programs (`run`, `sweep`, `eval`, `generate`, `train`) stores what it compiles, so that a
resumed run, a later `eval` or the next run of the same shapes reads it back (`enable`). The tests keep their own
cache directory between sessions and bound it by pruning (`prune`, called by tests/conftest.py before its
workers start). A program's key holds its HLO, compile options, XLA flags and the jax and jaxlib versions: a
changed program compiles afresh and never reads another's entry.
"""

from __future__ import annotations

import os

from soft_jax.core.io_utils import cache_dir

MAX_BYTES = 8 * 2**30  # a 7B model's programs for a pod slice are tens of MB each


def enable() -> None:
    """$JAX_COMPILATION_CACHE_DIR when set, else $SOFT_JAX_CACHE/jax (~/.cache/soft_jax/jax), which holds at most
    MAX_BYTES (the least recently used programs go first; $JAX_COMPILATION_CACHE_MAX_SIZE wins);
    SOFT_JAX_COMPILE_CACHE=0 turns it off. Programs that compile in under a second are not stored (JAX's
    default)."""
    import jax

    if os.environ.get("SOFT_JAX_COMPILE_CACHE", "1") == "0":
        jax.config.update("jax_enable_compilation_cache", False)
    elif not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir("jax"))
        if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:  # JAX's default keeps every program forever
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
            adopt_uncapped_entries(cache_dir("jax"))


def adopt_uncapped_entries(directory: str) -> None:
    """Gives each program an uncapped process stored (an older soft-jax, JAX_COMPILATION_CACHE_MAX_SIZE=-1) the
    access-time file JAX's capped cache keeps beside it, from its modification time: the capped cache reads every
    entry's access time before it stores a program, and one missing file makes every store fail."""
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        atime = os.path.join(directory, name.removesuffix("-cache") + "-atime")
        if name.endswith("-cache") and not os.path.exists(atime):
            with open(atime, "wb") as f:  # JAX's format: nanoseconds, 8 bytes little-endian
                f.write(os.stat(os.path.join(directory, name)).st_mtime_ns.to_bytes(8, "little"))


def prune(directory: str, limit: int) -> int:
    """Deletes the least recently read entries of an uncapped cache directory until it holds at most half of
    `limit` bytes, if it holds more than `limit`; returns how many it deleted."""
    try:
        entries = [e for e in os.scandir(directory) if e.is_file()]
    except FileNotFoundError:
        return 0
    sizes = {e.path: e.stat() for e in entries}
    total = sum(st.st_size for st in sizes.values())
    if total <= limit:
        return 0
    deleted = 0
    for path, st in sorted(sizes.items(), key=lambda kv: kv[1].st_atime):
        if total <= limit // 2:
            break
        try:
            os.remove(path)
        except OSError:
            continue
        total -= st.st_size
        deleted += 1
    return deleted
