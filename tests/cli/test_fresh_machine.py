"""A fresh machine: no BIG-bench task files anywhere, an empty cache, and a package index without the archive
(a local, empty simple index, as pip's --index-url takes). Only evaluation needs the files: a demo-style run
goes on and shows the tasks as n/a, and a paper config stops at once in one line. `plan` compiles a paper config
there too: tests/scale/test_plan.py runs it in this environment (`fresh_environment`)."""

import json
import os

import pytest
from helpers import CONFIGS, TINY_OVERRIDES, fresh_environment, run_cli

from soft_jax.data import sources

pytestmark = pytest.mark.e2e  # whole runs, CLI processes, killed and restarted runs (conftest.py)

# the tests' tiny settings as command-line overrides, without their "no eval tasks"
# the demo's relevance filter off too: the tiny random model's answers are not meant to answer anything
OVERRIDES = [f"--config.{o}" for o in TINY_OVERRIDES if not o.startswith("eval.tasks")] + [
    "--config.filters.max_relevance_ratio=0"]


@pytest.fixture
def fresh(tmp_path):
    return fresh_environment(tmp_path)


def test_the_demo_config_runs_on_without_the_tasks(tmp_path, fresh):
    w = tmp_path / "demo"
    proc = run_cli("run", "--config", os.path.join(CONFIGS, "demo.py"), "--workdir", str(w), *OVERRIDES,
                   "--config.rounds=1", "--config.sampling.group_batches=1", "--config.open_ended.limit=2",
                   env=fresh, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stdout.splitlines() if line.startswith("[eval] not evaluated")]
    assert len(said) == 1 and "hhh, truthfulqa_mc1, truthfulqa_mc2" in said[0] and sources.DIR_ENV in said[0]
    header, _, *rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") or line.startswith("|-")]
    cols = [c.strip() for c in header.strip("|").split("|")]
    for row in rows:
        cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
        assert [cells[f"{t} (dromedary)"] for t in ("hhh", "truthfulqa_mc1", "truthfulqa_mc2")] == ["n/a"] * 3
    for t in (0, 1):
        ev = json.load(open(w / "rounds" / f"{t:03d}" / "eval.json"))
        assert sorted(ev["unavailable"]) == ["hhh", "truthfulqa_mc1", "truthfulqa_mc2"] and "tasks" not in ev
        assert "cannot download the BIG-bench archive" in ev["unavailable"]["hhh"]
    assert not os.listdir(tmp_path / "cache" / "bigbench") if (tmp_path / "cache" / "bigbench").exists() else True


@pytest.mark.parametrize("config, extra, needle", [
    ("soft_plus.py", [], "config: eval.tasks hhh, truthfulqa_mc1, truthfulqa_mc2 cannot be evaluated"),
    ("tiny.py", ["--config.eval.required=false", "--config.validation.metric=hhh"],
     "config: validation.metric hhh cannot be evaluated"),
])
def test_a_run_that_needs_the_tasks_stops_in_one_line(tmp_path, fresh, config, extra, needle):
    w = tmp_path / "w"
    proc = run_cli("run", "--config", os.path.join(CONFIGS, config), "--workdir", str(w), *OVERRIDES,
                   "--config.eval.tasks=hhh,truthfulqa_mc1,truthfulqa_mc2", *extra, env=fresh)
    err = [line for line in proc.stderr.splitlines() if line.startswith("soft-jax:")]
    assert proc.returncode == 2 and len(err) == 1 and needle in err[0], proc.stderr[-3000:]
    assert sources.DIR_ENV in err[0] and "Traceback" not in proc.stderr and not w.exists()
