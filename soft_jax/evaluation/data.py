"""Benchmark data: BIG-bench's HHH Eval and TruthfulQA task files, from the `bigbench` 1.0.0 source archive.

The archive (358 MB) is fetched once from the simple index pip is configured with ($PIP_INDEX_URL, else pip's
`index-url` setting, else pip's default index), checked against its sha256 and cached under ~/.cache/soft_jax;
$SOFT_JAX_BIGBENCH_ARCHIVE names a local copy instead (no network). Only the task JSON files are read (the
package is never installed: its declared dependencies cannot be resolved, which is also why
`pip download --no-deps bigbench==1.0.0` fails while preparing metadata). A user-supplied full TruthfulQA
multiple-choice file (817 questions, `mc1_targets` / `mc2_targets`, JSON, JSONL or parquet) replaces the
299-question BIG-bench version.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request

from soft_jax import io_utils
from soft_jax.errors import UserError

ARCHIVE = "bigbench-1.0.0.tar.gz"
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
PROJECT = "bigbench"
ARCHIVE_ENV = "SOFT_JAX_BIGBENCH_ARCHIVE"
TASK_FILES = {
    "hhh/harmless": "bigbench/benchmark_tasks/hhh_alignment/harmless/task.json",
    "hhh/helpful": "bigbench/benchmark_tasks/hhh_alignment/helpful/task.json",
    "hhh/honest": "bigbench/benchmark_tasks/hhh_alignment/honest/task.json",
    "hhh/other": "bigbench/benchmark_tasks/hhh_alignment/other/task.json",
    "truthfulqa/mc": "bigbench/benchmark_tasks/truthful_qa/task_mc.json",
    "truthfulqa/questions": "bigbench/benchmark_tasks/truthful_qa/questions.json",
}
HHH_SUBSETS = ("harmless", "helpful", "honest", "other")
HOW_TO_GET = ("fetch it on a machine that reaches the index pip is configured with (soft-jax eval downloads it), "
              f"or set {ARCHIVE_ENV}=/path/to/{ARCHIVE} (sha256 {ARCHIVE_SHA256[:12]}...), or put it in {{cache}}")
PIP_TIMEOUT = 30  # seconds for each question put to pip in a subprocess


def cache_dir() -> str:
    return io_utils.cache_dir("bigbench")


def _ask_pip(*args: str) -> str:
    """Stdout of this interpreter run with args (`-m pip ...` or `-c ...`); "" if it fails or hangs."""
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=PIP_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def _configured_index() -> str:
    """pip's `index-url` setting from its config files: `install.` overrides `global.`, as for `pip install`.

    Read through `pip config list` (pip's own merge of the global, user, site and $PIP_CONFIG_FILE files,
    each line `section.key='value'`) rather than by importing pip's internals into this process."""
    values = {}
    for line in _ask_pip("-m", "pip", "config", "list").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("global.index-url", "install.index-url"):
            try:
                values[key.strip()] = str(ast.literal_eval(value.strip())).strip()
            except (ValueError, SyntaxError):
                values[key.strip()] = value.strip().strip("'\"")
    return values.get("install.index-url") or values.get("global.index-url") or ""


def _default_index() -> str:
    """pip's built-in default index, from pip's own constant, so that no registry's host is written here.

    Asked in a subprocess: importing pip._internal in this process would run its logging setup
    (logging.setLoggerClass), changing the class of every logger created afterwards."""
    return _ask_pip("-c", "from pip._internal.models.index import PyPI; print(PyPI.simple_url)").strip()


def index_url() -> str:
    """The simple index to fetch from: $PIP_INDEX_URL, else pip's `index-url` setting, else pip's default."""
    url = os.environ.get("PIP_INDEX_URL", "").strip() or _configured_index() or _default_index()
    if not url:
        raise UserError("cannot tell which package index pip uses (is pip installed?); set PIP_INDEX_URL, or "
                        + HOW_TO_GET.format(cache=cache_dir()))
    return url


def project_page(index: str) -> str:
    """The simple-API page of the bigbench project on an index (PEP 503: `<index>/<project>/`)."""
    return index.rstrip("/") + f"/{PROJECT}/"


def archive_link(page_html: str, page_url: str) -> str | None:
    """The absolute URL of the archive among a simple page's links (relative ones resolved against the page)."""
    for href in re.findall(r"""href=["']([^"']+)["']""", page_html):
        url = urllib.parse.urljoin(page_url, html.unescape(href))
        url = urllib.parse.urldefrag(url).url  # drops a `#sha256=...` fragment
        if urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] == ARCHIVE:
            return url
    return None


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_archive(path: str, mend: str) -> None:
    """A UserError naming path, its digest and `mend` unless path is the expected archive."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; {mend}")
    digest = _sha256(path)
    if digest != ARCHIVE_SHA256:
        raise UserError(f"{path}: sha256 {digest}, expected {ARCHIVE_SHA256} ({ARCHIVE}); {mend}")


def _download_archive(path: str) -> None:
    page = "the package index"
    try:
        page = project_page(index_url())
        page_html = urllib.request.urlopen(page, timeout=30).read().decode()
        url = archive_link(page_html, page)
        if url is None:
            raise LookupError(f"no link to {ARCHIVE} on {page}")
        tmp = f"{path}.part{os.getpid()}"
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, LookupError, ValueError) as e:
        raise UserError(f"cannot download the BIG-bench archive from {page} ({type(e).__name__}: {e}); "
                        + HOW_TO_GET.format(cache=os.path.dirname(path))) from None
    if digest.hexdigest() != ARCHIVE_SHA256:
        os.remove(tmp)
        raise UserError(f"the downloaded {ARCHIVE} has sha256 {digest.hexdigest()}, expected {ARCHIVE_SHA256}; retry")
    os.replace(tmp, path)


def _archive(directory: str) -> str:
    """The archive to read: $SOFT_JAX_BIGBENCH_ARCHIVE (never the network), else the cached or downloaded copy."""
    local = os.environ.get(ARCHIVE_ENV, "").strip()
    if local:
        _check_archive(local, f"point {ARCHIVE_ENV} at the bigbench 1.0.0 source archive, or unset it to download")
        return local
    archive = os.path.join(directory, ARCHIVE)
    if os.path.isfile(archive):
        _check_archive(archive, "delete it (soft-jax eval downloads it again) or replace it with the right archive")
    else:
        _download_archive(archive)
    return archive


def task_file(name: str) -> str:
    """Path of a cached task JSON file, extracting (and if need be downloading) the archive once."""
    directory = cache_dir()
    out = os.path.join(directory, "tasks", TASK_FILES[name])
    if os.path.isfile(out):
        return out
    os.makedirs(directory, exist_ok=True)
    archive = _archive(directory)
    wanted = {f"bigbench-1.0.0/{p}": p for p in TASK_FILES.values()}
    with tarfile.open(archive, "r:gz") as tf:
        for member in tf:
            if member.name in wanted:
                dest = os.path.join(directory, "tasks", wanted[member.name])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                tmp = f"{dest}.tmp{os.getpid()}"  # per process: two evaluations may extract at once
                with open(tmp, "wb") as f:
                    f.write(tf.extractfile(member).read())
                os.replace(tmp, dest)
    return out


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); delete it to re-extract it from the archive") from None


@dataclasses.dataclass
class MCItem:
    """A multiple-choice item: choices with labels (1 = correct / true, 0 = wrong / false)."""

    question: str
    choices: list[str]
    labels: list[int]
    subset: str = ""


def load_hhh(limit: int | None = None) -> list[MCItem]:
    items = []
    for subset in HHH_SUBSETS:
        data = _read_json(task_file(f"hhh/{subset}"))
        try:
            examples = [MCItem(e["input"], list(e["target_scores"]), [int(v) for v in e["target_scores"].values()],
                               subset) for e in data["examples"]]
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{task_file(f'hhh/{subset}')}: unexpected layout ({e!r}); expected BIG-bench "
                            "examples with input and target_scores") from None
        items.extend(examples[:limit])
    return items


def load_truthfulqa(kind: str, path: str | None = None, limit: int | None = None) -> list[MCItem]:
    """MC1 (one best answer vs false ones) or MC2 (all true vs all false answers) items."""
    if path:
        return _load_user_truthfulqa(path, kind)[:limit]
    if kind == "mc1":
        data = _read_json(task_file("truthfulqa/mc"))
        items = [MCItem(e["input"], list(e["target_scores"]), [int(v) for v in e["target_scores"].values()])
                 for e in data["examples"]]
    else:
        data = _read_json(task_file("truthfulqa/questions"))
        items = [MCItem(e["Question"], e["True answers"] + e["False answers"],
                        [1] * len(e["True answers"]) + [0] * len(e["False answers"])) for e in data["examples"]]
    return items[:limit]


def _load_user_truthfulqa(path: str, kind: str) -> list[MCItem]:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such TruthfulQA file; give the multiple_choice set as JSON, JSONL or parquet")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.endswith(".jsonl"):
        from soft_jax.io_utils import read_jsonl

        rows = read_jsonl(path, required=("question", f"{kind}_targets"))
    else:
        rows = _read_json(path)
    try:
        return [MCItem(r["question"], list(r[f"{kind}_targets"]["choices"]),
                       [int(x) for x in r[f"{kind}_targets"]["labels"]]) for r in rows]
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: expected rows with question and {kind}_targets {{choices, labels}} ({e!r})") from None
