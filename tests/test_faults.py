"""Faults across a whole run: SIGKILL and SIGTERM at seeded random points, a full disk, corrupted
checkpoints, torn writes, and a catalogue of bad inputs (exit 2, one line, the work dir untouched)."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from test_bootstrap import CONFIGS, TINY, Workdir, check_common, round_checksums, run, run_cli, tiny_base  # noqa: F401

from soft_jax import bootstrap, io_utils
from soft_jax.cli import main

# two generation batches per round, training-step checkpoints every 2 steps: stops land inside phases too
EXTRA = ("prompts.per_round=8", "train.checkpoint_every=2")
KINDS = ("write", "append", "checkpoint", "generate", "train_step", "scored", "trained", "evaluated", "round_done")


def same_artifacts(done: Workdir, ref: Workdir, base_model, rounds=2, per_round=8):
    """Every artifact byte-equal to the uninterrupted run's (no stray temp file either), each prompt answered
    once, each metrics event once, round parameters allclose."""
    assert done.files().keys() == ref.files().keys()
    for k, v in ref.files().items():
        if k != "config.json":
            assert done.files()[k] == v, k
    check_common(done, rounds, per_round)
    a, b = round_checksums(done, base_model), round_checksums(ref, base_model)
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-6)
    keys = [(m["round"], m["phase"], m.get("step")) for m in done.metrics]
    assert len(keys) == len(set(keys))
    for t in range(1, rounds + 1):
        assert [m["step"] for m in done.metrics if m["phase"] == "train" and m["round"] == t] == \
            [m["step"] for m in ref.metrics if m["phase"] == "train" and m["round"] == t]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base):
    """The uninterrupted run every faulty one must reproduce."""
    return run("soft_plus.py", tmp_path_factory.mktemp("ref") / "w", *EXTRA)


def test_stopped_at_random_points_resumes_to_the_same_artifacts(tmp_path, reference, tiny_base):
    """SIGTERM (preemption) inside generation and inside training, then 20 SIGKILLs and SIGTERMs at seeded
    random points (any point: after a batch, a step or a phase, or halfway through writing a file or a JSON
    line), each followed by a restart; the run ends with the uninterrupted run's artifacts."""
    w, trace = tmp_path / "w", tmp_path / "trace"
    rng = np.random.default_rng(20261130)
    plan = [("TERM", "AT", "generate_r1_b0"), ("TERM", "AT", "train_step_3")]
    plan += [("TERM" if rng.random() < 0.2 else "KILL", "AFTER", str(rng.integers(1, 9))) for _ in range(20)]
    stops = []
    for how, by, where in plan:
        trace.write_text("")
        p = run_cli(w, EXTRA, {f"SOFT_JAX_{how}_{by}": where, "SOFT_JAX_TRACE": str(trace)})
        reached = trace.read_text().split()
        at = where if by == "AT" else reached[int(where) - 1]
        stops.append((how, at))
        if how == "KILL":
            assert p.returncode == -9, f"{at}: expected SIGKILL, got {p.returncode}: {p.stderr[-2000:]}"
            continue
        assert p.returncode == 143, f"{at}: {p.stderr[-2000:]}"
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("soft-jax: stopped by SIGTERM after ") and "resume with: soft-jax run" in last
        if at == "generate_r1_b0":
            assert "round 1 generation batch 1 of 2" in last
        if at == "train_step_3":  # saved at the stop although checkpoint_every is 2
            assert "training step 3" in last
            assert sorted(os.listdir(w / "checkpoints" / "train" / "001")) == ["2", "3"]
    p = run_cli(w, EXTRA)
    assert p.returncode == 0, p.stderr[-2000:]
    print("stops:", stops)
    kinds = {at.split(":")[0] if ":" in at else re.sub(r"(_r\d+)?(_b\d+)?(_\d+)?$", "", at) for _, at in stops}
    assert len(stops) == 22 and len(kinds & set(KINDS)) >= 6, kinds  # spread over the run's kinds of points
    same_artifacts(Workdir(str(w)), reference, tiny_base)


# --- a full disk ----------------------------------------------------------------------------------

def run_in_process(workdir, capsys, *extra, env=None, monkeypatch=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    code = main(["run", "--config", os.path.join(CONFIGS, "soft_plus.py"), "--workdir", str(workdir),
                 *[f"--config.{o}" for o in TINY + list(EXTRA) + list(extra)]])
    for k in env or {}:
        monkeypatch.delenv(k)
    return code, capsys.readouterr()


def test_disk_full_stops_cleanly_and_a_rerun_finishes(tmp_path, reference, tiny_base, capsys, monkeypatch):
    """"No space left on device" while writing a generation batch, a round checkpoint and the run state: each
    time one line and exit 1, the finished work intact; rerun with space, the run finishes as if nothing
    happened."""
    w = tmp_path / "w"
    for where in ("append:generations.partial.jsonl", "checkpoint:rounds/1", "write:state.json", "write:train.jsonl"):
        before = {k: v for k, v in Workdir(str(w)).files().items()} if (w / "state.json").exists() else {}
        code, out = run_in_process(w, capsys, env={"SOFT_JAX_ENOSPC_AT": where}, monkeypatch=monkeypatch)
        err = out.err.strip()
        assert code == 1 and "\n" not in err and "Traceback" not in err, err
        assert err.startswith("soft-jax: error: no space left on device while writing ") and where in err
        assert "rerun the same command" in err
        after = Workdir(str(w)).files()
        for k, v in before.items():  # what was there is still there, unchanged or grown by finished work
            if k.endswith(("eval.json", "prompts.jsonl", "generations.jsonl", "train.jsonl")):
                assert after[k] == v, k
        assert not [k for k in after if k.endswith(".tmp")]
    code, out = run_in_process(w, capsys, monkeypatch=monkeypatch)
    assert code == 0, out.err
    same_artifacts(Workdir(str(w)), reference, tiny_base)


# --- corrupted checkpoints and torn writes --------------------------------------------------------

def damage(directory):
    """Overwrites the middle of every array file of an Orbax checkpoint with garbage."""
    hit = 0
    for d, _, names in os.walk(directory):
        for n in names:
            path = os.path.join(d, n)
            size = os.path.getsize(path)
            if "state" in path and size > 64 and not n.endswith((".json", "_METADATA")):
                with open(path, "r+b") as f:
                    f.seek(size // 2)
                    f.write(os.urandom(min(64, size - size // 2)))
                hit += 1
    assert hit, f"nothing to damage under {directory}"


def truncate(directory):
    """Cuts every file of a checkpoint to half its size (a partial copy)."""
    for d, _, names in os.walk(directory):
        for n in names:
            path = os.path.join(d, n)
            os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("how", [damage, truncate])
def test_unreadable_round_checkpoint_redoes_that_round(tmp_path, reference, tiny_base, capsys, monkeypatch, how):
    """The last round's checkpoint is corrupted or partial: the rerun says so, falls back to the round before,
    redoes that round's training from its saved data and ends with the same parameters."""
    w = tmp_path / "w"
    shutil.copytree(reference.path, w)
    how(w / "checkpoints" / "rounds" / "2")
    code, out = run_in_process(w, capsys, monkeypatch=monkeypatch)
    assert code == 0, out.err
    assert "checkpoints/rounds/2 is unreadable" in out.out and "redoing round 2's training from round 1" in out.out
    same_artifacts(Workdir(str(w)), reference, tiny_base)


def test_unreadable_step_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, tiny_base, capsys,
                                                                   monkeypatch):
    """Killed in round 1's training after step 4 (checkpoints at steps 2 and 4), the newest one corrupted: the
    rerun resumes from step 2, says so, and ends as the uninterrupted run."""
    w = tmp_path / "w"
    p = run_cli(w, EXTRA, {"SOFT_JAX_KILL_AT": "train_step_4"})
    assert p.returncode == -9, p.stderr[-2000:]
    ckpts = w / "checkpoints" / "train" / "001"
    assert sorted(os.listdir(ckpts)) == ["2", "4"]
    damage(ckpts / "4")
    code, out = run_in_process(w, capsys, monkeypatch=monkeypatch)
    assert code == 0, out.err
    assert "001/4 is unreadable" in out.out + out.err and "falling back to an earlier checkpoint" in out.out + out.err
    same_artifacts(Workdir(str(w)), reference, tiny_base)


def test_torn_lines_are_dropped_once_and_never_glued(tmp_path):
    path = str(tmp_path / "log.jsonl")
    io_utils.append_line(path, {"batch": 0})
    with open(path, "a") as f:  # a kill halfway through the second line
        f.write('{"batch": 1, "rows": [')
    assert io_utils.read_appended(path) == [{"batch": 0}]
    io_utils.append_line(path, {"batch": 1})  # the resumed write drops the torn half first
    assert open(path).read() == '{"batch": 0}\n{"batch": 1}\n'
    metrics = bootstrap.Metrics(str(tmp_path / "metrics.jsonl"))
    metrics.add({"round": 1, "phase": "train", "step": 1, "loss": 2.0})
    with open(metrics.path, "a") as f:
        f.write('{"round": 1, "phase": "train", "st')
    again = bootstrap.Metrics(metrics.path)
    again.add({"round": 1, "phase": "train", "step": 1, "loss": 1.5})  # the resumed step replaces its record
    again.add({"round": 1, "phase": "train", "step": 2, "loss": 1.0})
    assert [json.loads(line) for line in open(metrics.path)] == [
        {"round": 1, "phase": "train", "step": 1, "loss": 1.5}, {"round": 1, "phase": "train", "step": 2, "loss": 1.0}]


def test_atomic_write_killed_before_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    io_utils.write_atomic(str(path), "old\n")
    monkeypatch.setenv("SOFT_JAX_ENOSPC_AT", "write:state.json")
    with pytest.raises(OSError, match="No space left"):
        io_utils.write_atomic(str(path), "new contents\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["state.json"]
    (tmp_path / ".state.json.abc.tmp").write_text("ne")  # what a SIGKILL before the rename leaves
    os.makedirs(tmp_path / "rounds" / "001")
    (tmp_path / "rounds" / "001" / ".train.jsonl.x.tmp").write_text("{")
    assert io_utils.remove_stray_temps(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == ["rounds", "state.json"] and not os.listdir(tmp_path / "rounds" / "001")
