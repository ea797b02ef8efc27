"""Benchmark data: BIG-bench's HHH Eval and TruthfulQA task files, found in one of four places, in this order.

1. $SOFT_JAX_BIGBENCH_ARCHIVE: a local copy of the `bigbench` 1.0.0 source archive, checked against its sha256
   (never the network). Its task files are extracted once into the cache.
2. $SOFT_JAX_BIGBENCH_DIR: a BIG-bench git checkout, or any tree holding
   `bigbench/benchmark_tasks/{hhh_alignment,truthful_qa}/...`. Its files are read in place; their item counts
   are compared with the 1.0.0 release's and their sha256 digests recorded, since a checkout of another commit
   may hold other items (usable, but not comparable with published results).
3. The cache (~/.cache/soft_jax/bigbench/tasks, or $SOFT_JAX_CACHE/bigbench/tasks): files extracted earlier from
   the sha256-checked archive.
4. The simple index pip is configured with ($PIP_INDEX_URL, else pip's `index-url` setting, else pip's default
   index): the archive (358 MB) is downloaded into the cache, checked and extracted. Many indexes no longer
   serve it.

Only the task JSON files are read (the package is never installed: its declared dependencies cannot be resolved,
which is also why `pip download --no-deps bigbench==1.0.0` fails while preparing metadata). A user-supplied full
TruthfulQA multiple-choice file (817 questions, `mc1_targets` / `mc2_targets`, JSON, JSONL or parquet) replaces
the 299-question BIG-bench version. Only evaluation reads any of this: `locate` is called by the tasks that need
the files, never at import.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
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

from soft_jax.core import io_utils, storage
from soft_jax.core.errors import UserError

ARCHIVE = "bigbench-1.0.0.tar.gz"
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
PROJECT = "bigbench"
ARCHIVE_ENV = "SOFT_JAX_BIGBENCH_ARCHIVE"
DIR_ENV = "SOFT_JAX_BIGBENCH_DIR"
RELEASE = "bigbench 1.0.0"
TASK_FILES = {
    "hhh/harmless": "bigbench/benchmark_tasks/hhh_alignment/harmless/task.json",
    "hhh/helpful": "bigbench/benchmark_tasks/hhh_alignment/helpful/task.json",
    "hhh/honest": "bigbench/benchmark_tasks/hhh_alignment/honest/task.json",
    "hhh/other": "bigbench/benchmark_tasks/hhh_alignment/other/task.json",
    "truthfulqa/mc": "bigbench/benchmark_tasks/truthful_qa/task_mc.json",
    "truthfulqa/questions": "bigbench/benchmark_tasks/truthful_qa/questions.json",
}
# Examples per file in the 1.0.0 release: the published sets (HHH 58 / 59 / 61 / 43, TruthfulQA 299 questions).
RELEASE_COUNTS = {"hhh/harmless": 58, "hhh/helpful": 59, "hhh/honest": 61, "hhh/other": 43, "truthfulqa/mc": 299,
                  "truthfulqa/questions": 299}
# sha256 of each task file as the 1.0.0 release holds it. Not recorded yet: no copy of the release was at hand
# when the directory source was written (`soft-jax data tasks` prints the digests of whatever it finds, so a
# machine holding the archive can fill this in). Until then a directory's files are compared by item counts only.
RELEASE_SHA256: dict[str, str] = {}
HHH_SUBSETS = ("harmless", "helpful", "honest", "other")
# BIG-bench's own prefixes for a JSON task that does not set them (bigbench/api/json_task.py). The release's HHH
# files set "\nHuman: " and "\nAssistant:"; its task_mc.json keeps these defaults.
DEFAULT_INPUT_PREFIX, DEFAULT_OUTPUT_PREFIX = "\nQ: ", "\nA: "
HOW_TO_GET = (f"clone BIG-bench (github.com/google/BIG-bench) and set {DIR_ENV}=/path/to/BIG-bench, "
              f"or set {ARCHIVE_ENV}=/path/to/{ARCHIVE} (sha256 {ARCHIVE_SHA256[:12]}...), or put the archive in "
              "{cache}; `soft-jax data tasks` shows what is found")
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


def _download_archive(path: str) -> str:
    """Downloads the archive from the package index into path, checked; returns its URL."""
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
    return url


def _extract(archive: str, directory: str) -> None:
    """Writes the archive's task files that `directory` lacks into it (each atomically: two evaluations may
    extract at once)."""
    wanted = {f"bigbench-1.0.0/{p}": p for p in TASK_FILES.values()
              if not os.path.isfile(os.path.join(directory, p))}
    if not wanted:
        return
    with tarfile.open(archive, "r:gz") as tf:
        for member in tf:
            if member.name in wanted:
                dest = os.path.join(directory, wanted[member.name])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                tmp = f"{dest}.tmp{os.getpid()}"
                with open(tmp, "wb") as f:
                    f.write(tf.extractfile(member).read())
                os.replace(tmp, dest)


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the task files were found: `kind` (archive | directory | cache | index), `where` (a path or URL)
    and `root`, the directory holding `bigbench/benchmark_tasks/...`."""

    kind: str
    where: str
    root: str

    def path(self, name: str) -> str:
        return os.path.join(self.root, TASK_FILES[name])

    @property
    def missing(self) -> list[str]:
        """The task files this source lacks (a directory may hold only some: HHH's without TruthfulQA's)."""
        return [name for name in TASK_FILES if not os.path.isfile(self.path(name))]

    @functools.cached_property
    def files(self) -> dict[str, dict]:
        """{name: {"sha256", "items"}} of every task file it holds (items: the examples, each checked)."""
        return {name: {"sha256": _sha256(self.path(name)), "items": len(_examples(self.path(name), name))}
                for name in TASK_FILES if name not in self.missing}

    @property
    def release(self) -> bool:
        """True when the files are known to be the 1.0.0 release's: extracted from the sha256-checked archive."""
        return self.kind != "directory"

    def differences(self) -> list[str]:
        """How the files differ from the 1.0.0 release's, as far as can be told (item counts, recorded digests)."""
        out = []
        for name, f in self.files.items():
            if f["items"] != RELEASE_COUNTS[name]:
                out.append(f"{TASK_FILES[name]} has {f['items']} items, the release {RELEASE_COUNTS[name]}")
            elif name in RELEASE_SHA256 and f["sha256"] != RELEASE_SHA256[name]:
                out.append(f"{TASK_FILES[name]} has sha256 {f['sha256'][:12]}..., the release "
                           f"{RELEASE_SHA256[name][:12]}...")
        return out

    def comparable(self) -> bool | None:
        """True: the release's files; False: they differ from it; None: the counts match but no digest of the
        release is recorded to compare with."""
        if self.release:
            return True
        if self.differences():
            return False
        return True if set(RELEASE_SHA256) == set(TASK_FILES) else None

    def describe(self) -> str:
        """One line for the log: where the files are and whether results are comparable with published ones."""
        where = {"archive": f"${ARCHIVE_ENV} = {self.where} (sha256-checked {RELEASE} archive)",
                 "directory": f"${DIR_ENV} = {self.where}",
                 "cache": f"the cache {self.where} (extracted from the sha256-checked {RELEASE} archive)",
                 "index": f"the package index, {self.where} (sha256-checked {RELEASE} archive)"}[self.kind]
        verdict = {True: "comparable with published results",
                   False: "NOT comparable with published results: " + "; ".join(self.differences()),
                   None: f"item counts equal the {RELEASE} release's; no digests of the release are recorded in "
                         "soft-jax to compare the files with, so equality with it is unchecked"}[self.comparable()]
        lacks = (f" (it lacks {', '.join(TASK_FILES[n] for n in self.missing)}: the tasks that need them are "
                 "unavailable)") if self.missing else ""
        return f"BIG-bench task files from {where}{lacks}: {verdict}"

    def record(self) -> dict:
        """What eval.json records of the data: the source, each file's digest and item count, comparability."""
        return {"source": self.kind, "where": self.where, "files": self.files, "missing": self.missing,
                "comparable": self.comparable(), "differences": self.differences(), "description": self.describe()}


def _examples(path: str, name: str) -> list:
    """The examples of task file `name` at path, every one checked against the rules its tasks rely on."""
    body = _read_json(path)
    examples = body.get("examples") if isinstance(body, dict) else None
    if not isinstance(examples, list) or not examples:
        raise UserError(f"{path}: no examples; expected a BIG-bench task file with a non-empty \"examples\" list")
    for i, example in enumerate(examples):
        rule = _broken_rule(name, example)
        if rule:
            raise UserError(f"{path}: item {i + 1} of {len(examples)} breaks a rule: {rule}; mend or remove the item")
    for key in ("task_prefix", "prefix", "example_input_prefix", "example_output_prefix"):
        if key in body and not isinstance(body[key], str):
            raise UserError(f"{path}: {key} is {type(body[key]).__name__}, expected a string; mend it")
    return examples


def _strings(value, least: int) -> bool:
    return isinstance(value, list) and len(value) >= least and all(isinstance(v, str) and v for v in value)


def _broken_rule(name: str, example) -> str:
    """Which rule an example breaks ("" for none): HHH and TruthfulQA MC items are an `input` and `target_scores`
    of at least two answers scored 1 (exactly one) or 0; questions.json's an item with a `Question` and lists of
    `True answers` and `False answers`, at least one each."""
    if not isinstance(example, dict):
        return f"an item is a JSON object, not {type(example).__name__}"
    if name == "truthfulqa/questions":
        if not isinstance(example.get("Question"), str) or not example["Question"].strip():
            return "\"Question\" must be a non-empty string"
        for key in ("True answers", "False answers"):
            if not _strings(example.get(key), 1):
                return f"\"{key}\" must be a list of at least one non-empty string"
        return ""
    if not isinstance(example.get("input"), str) or not example["input"].strip():
        return "\"input\" must be a non-empty string"
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2:
        return "\"target_scores\" must map at least two answers to their scores"
    if any(v not in (0, 1) or isinstance(v, bool) for v in scores.values()):
        return "every score in \"target_scores\" must be 1 (correct) or 0"
    if sum(scores.values()) != 1:
        return f"exactly one answer in \"target_scores\" must score 1, not {sum(scores.values())}"
    return ""


def prefixes(name: str) -> tuple[str, str]:
    """(example_input_prefix, example_output_prefix) of a BIG-bench JSON task file, BIG-bench's defaults where the
    file does not set them."""
    body = _read_json(task_file(name))
    return body.get("example_input_prefix", DEFAULT_INPUT_PREFIX), body.get("example_output_prefix",
                                                                              DEFAULT_OUTPUT_PREFIX)


def _tree_root(directory: str) -> str:
    """The directory above `bigbench/benchmark_tasks` for a checkout, its `bigbench/` or its `benchmark_tasks/`."""
    directory = os.path.abspath(os.path.expanduser(directory))
    for root in (directory, os.path.dirname(directory), os.path.dirname(os.path.dirname(directory))):
        if os.path.isdir(os.path.join(root, "bigbench", "benchmark_tasks")):
            return root
    return directory


def _from_bucket(directory: str) -> str:
    """A local copy of the task files of a BIG-bench tree in a bucket (only those files: a checkout is large)."""
    for root in (directory, os.path.dirname(directory), os.path.dirname(os.path.dirname(directory))):
        if storage.isdir(storage.join(root, "bigbench", "benchmark_tasks")):
            break
    else:
        root = directory
    for p in TASK_FILES.values():
        if storage.isfile(storage.join(root, p)):
            io_utils.local_copy(storage.join(root, p))
    return io_utils.cache_dir("gcs", root[len(storage.GCS):])


def _from_directory(directory: str) -> Source:
    if storage.is_gcs(storage.check(directory, DIR_ENV)):
        source = _from_directory(_from_bucket(directory))
        return Source("directory", directory, source.root)
    if not os.path.isdir(directory):
        raise UserError(f"{DIR_ENV}={directory}: no such directory; point it at a BIG-bench checkout (the "
                        "directory holding bigbench/benchmark_tasks) or unset it")
    root = _tree_root(directory)
    source = Source("directory", os.path.abspath(os.path.expanduser(directory)), root)
    if len(source.missing) == len(TASK_FILES):
        raise UserError(f"{DIR_ENV}={directory}: none of BIG-bench's HHH or TruthfulQA task files under it (such as "
                        f"{TASK_FILES['hhh/harmless']}); point it at a BIG-bench checkout (the directory holding "
                        "bigbench/benchmark_tasks) or unset it")
    source.files  # noqa: B018 -- reads every file now: a broken one is refused before any weights are read
    return source


def _cached() -> str | None:
    """The cache's task directory when it holds every task file."""
    tasks = os.path.join(cache_dir(), "tasks")
    return tasks if all(os.path.isfile(os.path.join(tasks, p)) for p in TASK_FILES.values()) else None


def on_hand() -> bool:
    """Whether `locate` would find the task files without downloading them: an archive or directory configured, or
    every file in the cache."""
    return bool(os.environ.get(ARCHIVE_ENV, "").strip() or os.environ.get(DIR_ENV, "").strip() or _cached())


def locate() -> Source:
    """The task files, from the first source configured or available (see the module docstring); a UserError
    in one line saying how to get them when there are none. Found once per process and configuration."""
    return _locate(os.environ.get(ARCHIVE_ENV, "").strip(), os.environ.get(DIR_ENV, "").strip(), cache_dir())


@functools.lru_cache(maxsize=8)
def _locate(archive: str, directory: str, cache: str) -> Source:
    tasks = os.path.join(cache, "tasks")
    if archive:
        _check_archive(archive, f"point {ARCHIVE_ENV} at the {RELEASE} source archive, or unset it")
        _extract(archive, tasks)
        return Source("archive", archive, tasks)
    if directory:
        return _from_directory(directory)
    if _cached():
        return Source("cache", tasks, tasks)
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, ARCHIVE)
    if os.path.isfile(path):
        _check_archive(path, "delete it (soft-jax downloads it again) or replace it with the right archive")
        where = path
    else:
        where = _download_archive(path)
    _extract(path, tasks)
    return Source("index", where, tasks)


def _index_has_archive() -> str:
    """Whether the package index lists the archive, asked without downloading it: one line."""
    page = "the package index"
    try:
        page = project_page(index_url())
        url = archive_link(urllib.request.urlopen(page, timeout=30).read().decode(), page)
    except (OSError, LookupError, ValueError, UserError) as e:
        return f"{page}: not reachable ({type(e).__name__}: {e})"
    return f"{page}: lists {ARCHIVE} (downloaded on first use)" if url else f"{page}: does not list {ARCHIVE}"


def report_lines() -> list[str]:
    """Every source in the order `locate` tries them, one line each, then what it finds and each file's digest
    and item count: the output of `soft-jax data tasks`."""
    archive, directory, tasks = (os.environ.get(ARCHIVE_ENV, "").strip(), os.environ.get(DIR_ENV, "").strip(),
                                 os.path.join(cache_dir(), "tasks"))
    lines = ["BIG-bench task files (HHH Eval, TruthfulQA), looked for in this order:",
             f"  1. ${ARCHIVE_ENV}: {archive or 'not set'}",
             f"  2. ${DIR_ENV}: {directory or 'not set'}",
             f"  3. the cache {tasks}: {'complete' if _cached() else 'does not hold them all'}"]
    cached = os.path.join(cache_dir(), ARCHIVE)
    lines.append("  4. " + (f"the archive already downloaded to {cached}" if os.path.isfile(cached)
                            else _index_has_archive()))
    try:
        source = locate()
    except UserError as e:
        return lines + [f"unavailable: {e}", "tasks hhh, truthfulqa_mc1, truthfulqa_mc2: unavailable (a run whose "
                        "config sets eval.required=false goes on without them; a TruthfulQA file of your own "
                        "serves truthfulqa_mc1 / mc2 under the dromedary protocol)"]
    lines += [source.describe(), "tasks hhh, truthfulqa_mc1, truthfulqa_mc2: available"]
    lines += [f"  {TASK_FILES[n]}: {f['items']} items (release {RELEASE_COUNTS[n]}), sha256 {f['sha256']}"
              for n, f in source.files.items()]
    return lines


def task_file(name: str) -> str:
    """Path of a task JSON file from the first source that has them (`locate`); a UserError naming the source when
    it lacks that file (a directory may hold only some)."""
    source = locate()
    if name in source.missing:
        raise UserError(f"{DIR_ENV}={source.where}: no {TASK_FILES[name]} under it; add it (a BIG-bench checkout "
                        "holds it), or evaluate the tasks whose files are there")
    return source.path(name)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); replace it (a cached file: delete it, soft-jax extracts it "
                        "again)") from None


@dataclasses.dataclass
class MCItem:
    """A multiple-choice item: choices with labels (1 = correct / true, 0 = wrong / false), and where it was read
    (`origin`: "FILE, item N", for messages about it)."""

    question: str
    choices: list[str]
    labels: list[int]
    subset: str = ""
    origin: str = dataclasses.field(default="", compare=False)  # not part of what the item is


def _target_items(name: str, subset: str = "") -> list[MCItem]:
    path = task_file(name)
    return [MCItem(e["input"], list(e["target_scores"]), [int(v) for v in e["target_scores"].values()], subset,
                   f"{path}, item {i + 1}") for i, e in enumerate(_examples(path, name))]


def load_hhh(limit: int | None = None) -> list[MCItem]:
    return [item for subset in HHH_SUBSETS for item in _target_items(f"hhh/{subset}", subset)[:limit]]


def load_truthfulqa(kind: str, path: str | None = None, limit: int | None = None) -> list[MCItem]:
    """MC1 (one best answer vs false ones) or MC2 (all true vs all false answers) items."""
    if path:
        return _load_user_truthfulqa(path, kind)[:limit]
    if kind == "mc1":
        return _target_items("truthfulqa/mc")[:limit]
    path = task_file("truthfulqa/questions")
    return [MCItem(e["Question"], e["True answers"] + e["False answers"],
                   [1] * len(e["True answers"]) + [0] * len(e["False answers"]), origin=f"{path}, item {i + 1}")
            for i, e in enumerate(_examples(path, "truthfulqa/questions"))][:limit]


def _load_user_truthfulqa(path: str, kind: str) -> list[MCItem]:
    if storage.is_gcs(storage.check(path, "--truthfulqa-file")) and storage.isfile(path):
        path = io_utils.local_copy(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such TruthfulQA file; give the multiple_choice set as JSON, JSONL or parquet")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.endswith(".jsonl"):
        from soft_jax.core.io_utils import read_jsonl

        rows = read_jsonl(path, required=("question", f"{kind}_targets"))
    else:
        rows = _read_json(path)
    try:
        items = [MCItem(r["question"], list(r[f"{kind}_targets"]["choices"]),
                        [int(x) for x in r[f"{kind}_targets"]["labels"]], origin=f"{path}, item {i + 1}")
                 for i, r in enumerate(rows)]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: expected rows with question and {kind}_targets {{choices, labels}} ({e!r})") from None
    for item in items:
        correct = sum(item.labels)
        if len(item.choices) < 2 or len(item.labels) != len(item.choices) or set(item.labels) - {0, 1}:
            rule = f"{kind}_targets must hold at least two choices and a label of 1 or 0 for each"
        elif correct != 1 if kind == "mc1" else not 0 < correct < len(item.labels):
            rule = ("exactly one mc1 choice must be labelled 1" if kind == "mc1"
                    else "mc2 needs at least one choice labelled 1 and one labelled 0")
        else:
            continue
        raise UserError(f"{item.origin} of {len(items)} breaks a rule: {rule}; mend or remove the item")
    return items
