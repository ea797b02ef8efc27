"""Where the BIG-bench task files come from, in order: a local archive named by $SOFT_JAX_BIGBENCH_ARCHIVE (no
network), a checkout named by $SOFT_JAX_BIGBENCH_DIR, the cache, pip's configured index (relative simple-page
links resolved); what is recorded of them; and no package registry's host written in the sources.

No network: urlopen is replaced by a fake that serves a fake simple page and a small fake archive."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request

import pytest
from helpers import INHOUSE_BIGBENCH, ROOT, TESTS, run_cli

import soft_jax
from soft_jax import cli
from soft_jax.core.errors import UserError
from soft_jax.data import sources

MIRROR = "https://mirror.example/team/simple"


def fake_archive(path) -> str:
    """A small tar.gz holding every task file under the archive's layout; returns its sha256."""
    with tarfile.open(path, "w:gz") as tf:
        for name, member in sources.TASK_FILES.items():
            body = json.dumps({"examples": [], "task": name}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/{member}")
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeIndex:
    """urlopen's stand-in: serves `pages` (url -> html) and the archive at `archive_url`; records requests."""

    def __init__(self, pages: dict[str, str], archive_url: str, archive_bytes: bytes):
        self.pages, self.archive_url, self.archive_bytes = pages, archive_url, archive_bytes
        self.requested: list[str] = []

    def __call__(self, url, timeout=None):
        url = getattr(url, "full_url", url)
        self.requested.append(url)
        if url in self.pages:
            return io.BytesIO(self.pages[url].encode())
        if url == self.archive_url:
            return io.BytesIO(self.archive_bytes)
        raise urllib.error.URLError(f"fake index has no {url}")


def no_network(*args, **kwargs):
    raise AssertionError(f"the network (or pip) was asked: {args}")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A tmp cache, the fake archive's digest as the expected one, and no local archive configured."""
    monkeypatch.setenv("SOFT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(sources.ARCHIVE_ENV, raising=False)
    monkeypatch.delenv(sources.DIR_ENV, raising=False)
    archive = tmp_path / sources.ARCHIVE
    monkeypatch.setattr(sources, "ARCHIVE_SHA256", fake_archive(archive))
    return archive


def serve(monkeypatch, page_url: str, href: str, archive_url: str, archive) -> FakeIndex:
    page = f'<html><body><a href="{href}">{sources.ARCHIVE}</a></body></html>'
    index = FakeIndex({page_url: page}, archive_url, archive.read_bytes())
    monkeypatch.setattr(urllib.request, "urlopen", index)
    return index


@pytest.mark.parametrize("configured", [MIRROR, MIRROR + "/"])
def test_index_comes_from_pip_index_url(fake, monkeypatch, configured):
    monkeypatch.setenv("PIP_INDEX_URL", configured)
    monkeypatch.setattr(sources.subprocess, "run", no_network)  # $PIP_INDEX_URL wins: pip is not asked
    archive_url = "https://files.example/bigbench-1.0.0.tar.gz"
    index = serve(monkeypatch, MIRROR + "/bigbench/", archive_url, archive_url, fake)
    out = sources.task_file("hhh/honest")
    assert index.requested == [MIRROR + "/bigbench/", archive_url]
    assert json.load(open(out))["task"] == "hhh/honest"


@pytest.mark.parametrize("href, resolved", [
    ("../../packages/ab/cd/bigbench-1.0.0.tar.gz#sha256=00ff", "https://mirror.example/team/packages/ab/cd/"),
    ("/files/bigbench-1.0.0.tar.gz", "https://mirror.example/files/"),
    ("bigbench-1.0.0.tar.gz", MIRROR + "/bigbench/"),
    ("https://other.example/x/bigbench-1.0.0.tar.gz", "https://other.example/x/"),
])
def test_relative_links_are_resolved_against_the_page(fake, monkeypatch, href, resolved):
    monkeypatch.setenv("PIP_INDEX_URL", MIRROR)
    index = serve(monkeypatch, MIRROR + "/bigbench/", href, resolved + sources.ARCHIVE, fake)
    sources.task_file("truthfulqa/mc")
    assert index.requested == [MIRROR + "/bigbench/", resolved + sources.ARCHIVE]
    assert (fake.parent / "cache" / "bigbench" / sources.ARCHIVE).is_file()  # cached for the next extraction


def test_index_from_pip_config_when_no_env_var(fake, monkeypatch, tmp_path):
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = https://global.example/simple\n"
                      "[install]\nindex-url = https://install.example/simple/\n")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.setenv("HOME", str(tmp_path))  # a user's own pip.conf would override PIP_CONFIG_FILE
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert sources.index_url() == "https://install.example/simple/"  # `install.` overrides `global.`, as in pip


def test_pip_default_index_when_nothing_is_configured(monkeypatch):
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setattr(sources, "_configured_index", lambda: "")
    url = sources.index_url()
    assert urllib.parse.urlsplit(url).netloc in registry_hosts() and url.rstrip("/").endswith("/simple")


def test_local_archive_is_used_without_the_network(fake, monkeypatch):
    monkeypatch.setenv(sources.ARCHIVE_ENV, str(fake))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(sources.subprocess, "run", no_network)
    out = sources.task_file("hhh/harmless")
    assert json.load(open(out))["task"] == "hhh/harmless"
    assert not (fake.parent / "cache" / "bigbench" / sources.ARCHIVE).exists()  # read in place, not copied


def test_wrong_local_archive_is_refused_in_one_line(fake, monkeypatch, tmp_path):
    wrong = tmp_path / "elsewhere" / sources.ARCHIVE
    wrong.parent.mkdir()
    wrong.write_bytes(b"not the archive")
    monkeypatch.setenv(sources.ARCHIVE_ENV, str(wrong))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(UserError) as e:
        sources.task_file("hhh/helpful")
    line = str(e.value)
    assert len(line.splitlines()) == 1 and str(wrong) in line and sources.ARCHIVE_ENV in line
    assert hashlib.sha256(b"not the archive").hexdigest() in line and sources.ARCHIVE_SHA256 in line
    assert not (tmp_path / "cache" / "bigbench" / "tasks").exists()


def test_wrong_archive_in_the_cache_is_refused(fake, monkeypatch, tmp_path):
    cached = tmp_path / "cache" / "bigbench" / sources.ARCHIVE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(UserError, match="delete it"):
        sources.task_file("hhh/other")


def test_how_to_get_names_the_env_var():
    assert sources.ARCHIVE_ENV in sources.HOW_TO_GET and sources.ARCHIVE in sources.HOW_TO_GET


def registry_hosts() -> set[str]:
    """pip's own registry hosts (asked of pip in a subprocess, so that none is written in this file)."""
    code = ("from pip._internal.models.index import PyPI, TestPyPI\n"
            "for i in (PyPI, TestPyPI): print(i.netloc); print(i.file_storage_domain)")
    hosts = set(sources._ask_pip("-c", code).split())
    assert len(hosts) == 4, hosts
    return hosts


def test_no_registry_host_in_the_sources():
    files = [os.path.join(ROOT, "README.md")]
    for top in (os.path.dirname(soft_jax.__file__), TESTS):
        for d, subdirs, names in os.walk(top):
            subdirs[:] = [s for s in subdirs if s != "__pycache__"]
            files += [os.path.join(d, n) for n in names]
    hosts = registry_hosts()
    any_registry_url = re.compile(r"https?://[^\s/\"'<>]*(pypi|pythonhosted)", re.I)
    found = []
    for path in files:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="ignore")
        found += [f"{path}: {h}" for h in hosts if h in text]
        found += [f"{path}: {m.group(0)}" for m in any_registry_url.finditer(text)]
    assert len(files) > 30 and not found, found


# --- a BIG-bench checkout ($SOFT_JAX_BIGBENCH_DIR) and the order of the sources ---------------------------------

def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_a_checkout_is_read_in_place_and_recorded(fake, monkeypatch, tmp_path):
    """Its files are read where they are (nothing copied, no network), each file's sha256 and item count are
    recorded, and items that differ from the release's make the results not comparable, in the log line too."""
    monkeypatch.setenv(sources.DIR_ENV, INHOUSE_BIGBENCH)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(sources.subprocess, "run", no_network)
    source = sources.locate()
    assert (source.kind, source.where) == ("directory", INHOUSE_BIGBENCH)
    for name, member in sources.TASK_FILES.items():
        path = os.path.join(INHOUSE_BIGBENCH, member)
        assert sources.task_file(name) == path
        assert source.files[name] == {"sha256": _digest(path), "items": len(json.load(open(path))["examples"])}
    assert source.comparable() is False and not (tmp_path / "cache" / "bigbench").exists()
    assert "NOT comparable with published results" in source.describe()
    assert "hhh_alignment/harmless/task.json has 3 items, the release 58" in source.describe()
    record = json.loads(json.dumps(source.record()))
    assert record["source"] == "directory" and record["comparable"] is False and record["files"] == source.files


def test_a_checkout_that_matches_the_release(monkeypatch, tmp_path):
    """Counts equal to the release's: comparable once every digest is recorded and equal; unchecked (None, said
    so) without digests; a recorded digest that differs makes it not comparable."""
    counts = {name: len(json.load(open(os.path.join(INHOUSE_BIGBENCH, m)))["examples"])
              for name, m in sources.TASK_FILES.items()}
    digests = {name: _digest(os.path.join(INHOUSE_BIGBENCH, m)) for name, m in sources.TASK_FILES.items()}
    monkeypatch.setattr(sources, "RELEASE_COUNTS", counts)
    source = sources.Source("directory", INHOUSE_BIGBENCH, INHOUSE_BIGBENCH)
    monkeypatch.setattr(sources, "RELEASE_SHA256", {})
    assert source.comparable() is None and "equality with it is unchecked" in source.describe()
    monkeypatch.setattr(sources, "RELEASE_SHA256", digests)
    assert source.comparable() is True and source.describe().endswith("comparable with published results")
    monkeypatch.setattr(sources, "RELEASE_SHA256", {**digests, "truthfulqa/mc": "0" * 64})
    assert source.comparable() is False and "task_mc.json has sha256" in source.describe()


@pytest.mark.parametrize("below", ["", "bigbench", "bigbench/benchmark_tasks"])
def test_the_variable_may_name_the_checkout_or_its_task_folders(fake, monkeypatch, below):
    monkeypatch.setenv(sources.DIR_ENV, os.path.join(INHOUSE_BIGBENCH, below))
    assert sources.task_file("truthfulqa/mc") == os.path.join(INHOUSE_BIGBENCH, sources.TASK_FILES["truthfulqa/mc"])


def test_a_checkout_without_the_files_is_refused_in_one_line(fake, monkeypatch, tmp_path):
    """A tree without any of the task files is refused; one that lacks some is used for what it holds, and asking
    it for a missing file is one line naming the variable and the file; an empty file is refused when found."""
    tree = tmp_path / "BIG-bench"
    (tree / "bigbench" / "benchmark_tasks").mkdir(parents=True)
    monkeypatch.setenv(sources.DIR_ENV, str(tree))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(UserError) as e:
        sources.locate()
    assert len(str(e.value).splitlines()) == 1 and sources.DIR_ENV in str(e.value) and "hhh_alignment" in str(e.value)
    shutil.rmtree(tree)
    shutil.copytree(INHOUSE_BIGBENCH, tree)
    os.remove(tree / sources.TASK_FILES["truthfulqa/questions"])
    source = sources.locate()
    assert source.missing == ["truthfulqa/questions"] and set(source.files) == set(sources.TASK_FILES) - {
        "truthfulqa/questions"}
    assert "it lacks bigbench/benchmark_tasks/truthful_qa/questions.json" in source.describe()
    assert source.record()["missing"] == ["truthfulqa/questions"]
    with pytest.raises(UserError) as e:
        sources.task_file("truthfulqa/questions")
    line = str(e.value)
    assert len(line.splitlines()) == 1 and sources.DIR_ENV in line and "truthful_qa/questions.json" in line
    (tree / sources.TASK_FILES["truthfulqa/questions"]).write_text(json.dumps({"examples": []}))
    sources._locate.cache_clear()  # found once per process and configuration
    with pytest.raises(UserError, match="questions.json: no examples"):
        sources.locate()


def test_a_relative_checkout_path_is_recorded_absolute(fake, monkeypatch, tmp_path):
    """eval.json must say where the files were even when read from another directory later."""
    shutil.copytree(INHOUSE_BIGBENCH, tmp_path / "BIG-bench")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(sources.DIR_ENV, "BIG-bench")
    source = sources.locate()
    assert source.where == str(tmp_path / "BIG-bench") and source.record()["where"] == str(tmp_path / "BIG-bench")
    assert f"${sources.DIR_ENV} = {tmp_path / 'BIG-bench'}" in source.describe()


def _broken_tree(tmp_path, name, mend) -> str:
    """A copy of the in-house tree whose task file `name` has its second item changed by mend(item)."""
    tree = tmp_path / "BIG-bench"
    shutil.copytree(INHOUSE_BIGBENCH, tree)
    path = tree / sources.TASK_FILES[name]
    body = json.loads(path.read_text())
    mend(body["examples"][1])
    path.write_text(json.dumps(body))
    return str(path)


@pytest.mark.parametrize("name,mend,rule", [
    ("hhh/helpful", lambda e: e["target_scores"].update({"A third answer.": 0, "A fourth.": 1}),
     "exactly one answer in \"target_scores\" must score 1, not 2"),
    ("hhh/other", lambda e: e.update(target_scores={"Only one answer.": 1}), "at least two answers"),
    ("hhh/honest", lambda e: e["target_scores"].update({k: 0.5 for k in e["target_scores"]}),
     "must be 1 (correct) or 0"),
    ("truthfulqa/mc", lambda e: e.pop("input"), "\"input\" must be a non-empty string"),
    ("truthfulqa/questions", lambda e: e.update({"False answers": []}), "\"False answers\" must be a list"),
])
def test_every_item_is_checked_when_the_files_are_found(fake, monkeypatch, tmp_path, name, mend, rule):
    """Not only the first: the second item breaks a rule, and the line names the file, the item and the rule."""
    path = _broken_tree(tmp_path, name, mend)
    monkeypatch.setenv(sources.DIR_ENV, str(tmp_path / "BIG-bench"))
    with pytest.raises(UserError) as e:
        sources.locate()
    line = str(e.value)
    assert len(line.splitlines()) == 1 and line.startswith(f"{path}: item 2 of ") and rule in line, line


@pytest.mark.parametrize("choices,labels,rule", [(["a", "b", "c"], [1, 1, 0], "exactly one mc1 choice"),
                                                  (["a"], [1], "at least two choices")])
def test_a_users_truthfulqa_file_is_checked_item_by_item(tmp_path, choices, labels, rule):
    rows = [{"question": "q1", "mc1_targets": {"choices": ["a", "b"], "labels": [1, 0]}},
            {"question": "q2", "mc1_targets": {"choices": choices, "labels": labels}}]
    path = tmp_path / "tqa.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(UserError) as e:
        sources.load_truthfulqa("mc1", str(path))
    assert str(e.value).startswith(f"{path}, item 2 of 2 breaks a rule") and rule in str(e.value)


def test_prefixes_are_the_files_own_or_big_benchs_defaults(fake, monkeypatch, tmp_path):
    tree = tmp_path / "BIG-bench"
    shutil.copytree(INHOUSE_BIGBENCH, tree)
    path = tree / sources.TASK_FILES["hhh/harmless"]
    body = json.loads(path.read_text())
    body.update(example_input_prefix="\nUser: ", example_output_prefix="\nBot: ")
    path.write_text(json.dumps(body))
    monkeypatch.setenv(sources.DIR_ENV, str(tree))
    assert sources.prefixes("hhh/harmless") == ("\nUser: ", "\nBot: ")
    assert sources.prefixes("hhh/helpful") == ("\nHuman: ", "\nAssistant:")
    assert sources.prefixes("truthfulqa/mc") == ("\nQ: ", "\nA: ")  # the file sets none: BIG-bench's defaults
    body["example_output_prefix"] = 7
    path.write_text(json.dumps(body))
    sources._locate.cache_clear()  # found once per process and configuration
    with pytest.raises(UserError, match="example_output_prefix is int, expected a string"):
        sources.locate()


def test_sources_are_tried_in_order(fake, monkeypatch, tmp_path):
    """The archive variable over the checkout, the checkout over the cache, the cache over the index."""
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(sources.subprocess, "run", no_network)
    monkeypatch.setenv(sources.ARCHIVE_ENV, str(fake))
    monkeypatch.setenv(sources.DIR_ENV, INHOUSE_BIGBENCH)
    assert sources.locate().kind == "archive"
    monkeypatch.delenv(sources.ARCHIVE_ENV)
    assert sources.locate().kind == "directory"  # the archive's files were extracted into the cache meanwhile
    monkeypatch.delenv(sources.DIR_ENV)
    cached = sources.locate()
    assert cached.kind == "cache" and cached.comparable() is True
    assert json.load(open(cached.path("hhh/other")))["task"] == "hhh/other"


def test_the_command_lists_the_sources_and_what_it_found(inhouse_bigbench, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SOFT_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "simple").as_uri())
    assert cli.main(["data", "tasks"]) == 0
    out = capsys.readouterr().out
    assert f"2. ${sources.DIR_ENV}: {INHOUSE_BIGBENCH}" in out
    assert "tasks hhh, truthfulqa_mc1, truthfulqa_mc2: available" in out
    digest = _digest(os.path.join(INHOUSE_BIGBENCH, sources.TASK_FILES["hhh/honest"]))
    assert f"hhh_alignment/honest/task.json: 3 items (release 61), sha256 {digest}" in out


def test_the_command_says_when_nothing_is_found(tmp_path):
    """A fresh machine: no variables, an empty cache, an index (a local directory) without the archive."""
    (tmp_path / "simple").mkdir()
    proc = run_cli("data", "tasks", env={"SOFT_JAX_CACHE": str(tmp_path / "cache"), sources.DIR_ENV: "",
                                         sources.ARCHIVE_ENV: "", "PIP_INDEX_URL": (tmp_path / "simple").as_uri()})
    assert proc.returncode == 0, proc.stderr
    assert f"1. ${sources.ARCHIVE_ENV}: not set" in proc.stdout and "does not hold them all" in proc.stdout
    assert "tasks hhh, truthfulqa_mc1, truthfulqa_mc2: unavailable" in proc.stdout
    assert "unavailable: cannot download the BIG-bench archive" in proc.stdout and sources.DIR_ENV in proc.stdout
