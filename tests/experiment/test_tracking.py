"""Weights & Biases tracking (log.wandb): offline runs of the real wandb, read back from the .wandb files it writes
(its transaction log: LevelDB's log framing around wandb's own protobuf records), against the work dir's files."""

import glob
import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest
from helpers import CONFIGS, one_line_error, run

from soft_jax.core import io_utils
from soft_jax.core.errors import UserError
from soft_jax.experiment import config as config_lib
from soft_jax.experiment import tracking
from soft_jax.experiment.workdir import WANDB_ID, WorkDir, round_values

WANDB = ["log.wandb.project=soft-jax-test", "log.wandb.mode=offline", "log.wandb.tags=tiny, test",
         "log.wandb_samples=3", "validation.patience=2"]  # 3 of the round's 4 generations; no early stop


def wandb_env(mp, root) -> None:
    """Every W&B file and setting of this test under root: offline, silent."""
    for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR"):
        os.makedirs(os.path.join(root, name.lower()), exist_ok=True)
        mp.setenv(f"WANDB_{name}", os.path.join(root, name.lower()))
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")


def records(path: str) -> list:
    """The records of a .wandb file, as wandb's former DataStore read them: a 7-byte header (":W&B", 0xBEE1, version
    0), then 32 KiB blocks of chunks (CRC-32 seeded by the chunk type, length, type: full / first / middle / last),
    each record a serialized wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + n]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: a bad chunk at {pos}"
        pos, pending = pos + 7 + n, pending + chunk
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def offline_runs(workdir) -> list[dict]:
    """Each offline run directory W&B wrote under WORKDIR/wandb/, oldest first: its id, config, tags, history rows
    ({step: {logged key: value}}, a media entry as the dict wandb writes for it) and exit code.

    The runs here are in this process: finish() returns before wandb's service has written every record, so its
    service is torn down first (as a CLI process's exit does), which waits for the files."""
    import wandb

    wandb.teardown()
    runs = []
    for d in sorted(glob.glob(os.path.join(str(workdir), "wandb", "offline-run-*"))):
        (path,) = glob.glob(os.path.join(d, "run-*.wandb"))
        found = {"dir": d, "history": {}, "exit": None}
        for r in records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                found.update(id=r.run.run_id, project=r.run.project, tags=list(r.run.tags),
                             config={u.key: json.loads(u.value_json) for u in r.run.config.update if u.key != "_wandb"})
            elif kind == "history":
                row = {}
                for item in r.history.item:  # a media entry's fields are nested under its key
                    key, *field = list(item.nested_key) or [item.key]
                    if not key.startswith("_"):
                        value = json.loads(item.value_json)
                        row.update({key: {**row.get(key, {}), field[0]: value}} if field else {key: value})
                assert r.history.step.num not in found["history"], f"{path}: step {r.history.step.num} twice"
                found["history"][r.history.step.num] = row
            elif kind == "exit":
                found["exit"] = r.exit.exit_code
        runs.append(found)
    return runs


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A tiny SOFT+ run with W&B offline: one round, then the same command with rounds=2 (a resumed run that
    goes on), then that command again (a rerun of the finished run). Returns the work dir and W&B's offline runs."""
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        wandb_env(mp, str(root / "wandb-env"))
        run("soft_plus.py", root / "w", *WANDB, "rounds=1")
        first = offline_runs(root / "w")
        run("soft_plus.py", root / "w", *WANDB, "rounds=2")
        second = offline_runs(root / "w")
        w = run("soft_plus.py", root / "w", *WANDB, "rounds=2")
    return w, first, second, offline_runs(root / "w")


@pytest.mark.e2e
def test_every_round_table_number_samples_config_and_plots_are_logged(tracked):
    w, first, second, runs = tracked
    assert len(first) == 1 and [r["id"] for r in runs] == [first[0]["id"]] * 3
    history = {step: row for r in runs for step, row in r["history"].items()}
    assert sorted(history) == [0, 1, 2]
    # the round table's numbers (report.round_table prints round_values), and the raw events they come from
    values = round_values(w.metrics, "valid_nll")
    comparisons = w.state["comparisons"]
    for t in (0, 1, 2):
        row = history[t]
        scalars = {k: v for k, v in row.items() if k != "samples" and not k.startswith("plots/")}
        expected = tracking.round_row(values[t], "valid_nll", comparisons.get(str(t)))
        assert scalars == expected, t
        assert row["validation/valid_nll"] == w.event(t, "eval")["valid_nll"]
        if t:
            gen = w.event(t, "generate")
            assert (row["round/prompts"], row["round/kept"], row["round/dropped"], row["round/cut_by_length"]) == (
                gen["prompts"], gen["kept"], gen["prompts"] - gen["kept"], gen["truncated_generations"])
            assert row["round/difficulty"] == w.event(t, "curriculum")["mean_difficulty"]
            losses = [m["loss"] for m in sorted(w.metrics, key=lambda m: m.get("step") or 0)
                      if m["round"] == t and m["phase"] == "train"]
            assert row["round/train_loss"] == float(np.mean(losses[-max(1, len(losses) // 4):]))
            c = comparisons[str(t)]
            assert (row["guard/diff"], row["guard/low"], row["guard/high"], row["guard/vs"], row["guard/verdict"]) == (
                c["diff"], c["low"], c["high"], c["vs"], c["verdict"])
    # as the round table in report/summary.md prints them
    summary = open(os.path.join(w.path, "report", "summary.md")).read().split("\n")
    head = next(line for line in summary if line.startswith("| round |"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    for line in (s for s in summary if s[:4] in ("| 0 ", "| 1 ", "| 2 ")):
        cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
        row = history[int(cells["round"])]
        assert cells["valid_nll"] == f"{row['validation/valid_nll']:.4f}"
        if cells["round"] != "0":
            assert cells["kept"] == str(row["round/kept"]) and cells["train loss"] == f"{row['round/train_loss']:.4f}"
    # one samples table per round: the first log.wandb_samples generations, with their train.jsonl difficulty
    assert "samples" not in history[0]
    for t, r in [(1, runs[0]), (2, runs[1])]:
        table = history[t]["samples"]
        assert table["_type"] == "table-file" and table["nrows"] == 3
        logged = json.load(open(os.path.join(r["dir"], "files", table["path"])))
        assert logged["columns"] == tracking.SAMPLE_COLUMNS
        difficulty = {p["prompt_id"]: p["difficulty"] for p in w.rows(t, "train.jsonl")}
        prompt = lambda g: g["prompt"] + (f"\n\n{g['input']}" if g["input"] else "")
        assert logged["data"] == [[g["prompt_id"], prompt(g), g["answer"], g["kept"], g["dropped_by"] or "",
                                   difficulty[g["prompt_id"]] if g["kept"] else None, g["finish"]]
                                  for g in w.rows(t, "generations.jsonl")[:3]]
    # the report's plots, in the last row each process logged
    pngs = {n[:-4] for n in os.listdir(os.path.join(w.path, "report")) if n.endswith(".png")}
    for r, t in [(runs[0], 1), (runs[1], 2)]:
        plots = {k[len("plots/"):]: v for k, v in r["history"][t].items() if k.startswith("plots/")}
        assert set(plots) == pngs and all(p["_type"] == "image-file" for p in plots.values())
        assert all(os.path.isfile(os.path.join(r["dir"], "files", p["path"])) for p in plots.values())
    # the resolved config, project and tags; each process finished its W&B run
    assert runs[1]["config"] == w.config and runs[0]["config"]["rounds"] == 1
    assert {(r["project"], tuple(r["tags"]), r["exit"]) for r in runs} == {("soft-jax-test", ("tiny", "test"), 0)}


@pytest.mark.e2e
def test_a_rerun_continues_the_same_wandb_run_and_logs_no_round_twice(tracked):
    w, first, second, runs = tracked
    saved = json.load(open(os.path.join(w.path, WANDB_ID)))
    assert saved == {"id": first[0]["id"], "next_round": 3}
    assert [r["id"] for r in runs] == [saved["id"]] * 3  # each process resumed the id the work dir holds
    assert [sorted(r["history"]) for r in runs] == [[0, 1], [2], []]  # steps only go up; the rerun logs none
    assert second[:1] == first[:1]  # what the first process wrote is left as it was


def test_without_wandb_installed_a_run_asking_for_it_exits_2_before_reading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as where it is absent
    from soft_jax.experiment import preflight
    from soft_jax.models import presets

    def reached(*_, **__):
        raise AssertionError("the run went on past the W&B check")

    monkeypatch.setattr(preflight, "prepare", reached)  # checks the model's files, then weights are read
    monkeypatch.setattr(presets, "load_preset", reached)
    argv = ["run", "--config", os.path.join(CONFIGS, "tiny.py"), "--workdir", str(tmp_path / "w"),
            "--config.model.name=tiny", "--config.log.wandb.project=p"]
    err = one_line_error(capsys, argv)
    assert err == ("soft-jax: error: log.wandb.project is set but wandb is not installed; pip install "
                   "'soft-jax[wandb]' (or set log.wandb.project=\"\")")
    assert not os.path.exists(tmp_path / "w")


def test_off_by_default_and_on_process_0_only(tmp_path, monkeypatch):
    """Without a project (the default) or on another process than 0 the tracker imports nothing and writes nothing."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    wd = WorkDir(str(tmp_path))
    config = config_lib.RunConfig()
    assert config.log.wandb.project == "" and config.log.wandb_samples == 64
    tracking.check(config)
    on = config.replace("log", wandb=config_lib.WandbSection(project="p", mode="offline"))
    monkeypatch.setattr(tracking.distributed, "is_writer", lambda: False)
    for c in (config, on):
        with tracking.Tracker(c, wd) as tracker:
            tracker.log_rounds({"finished": [1], "scores": {"0": 1.0, "1": 1.0}, "comparisons": {}})
            tracker.log_plots(str(tmp_path))
        assert tracker.run is None
    assert os.listdir(tmp_path) == []


def test_the_wandb_run_is_finished_on_an_error_or_a_stop(tmp_path, monkeypatch):
    wandb_env(monkeypatch, str(tmp_path / "env"))
    os.makedirs(tmp_path / "w")
    config = config_lib.load(os.path.join(CONFIGS, "soft.py"), WANDB[:2])
    with pytest.raises(RuntimeError, match="a bug"):
        with tracking.Tracker(config, WorkDir(str(tmp_path / "w"))) as tracker:
            assert tracker.run is not None
            raise RuntimeError("a bug")
    assert tracker.run is None
    (found,) = offline_runs(tmp_path / "w")
    assert found["exit"] == 1 and found["history"] == {}
    assert json.load(open(tmp_path / "w" / WANDB_ID)) == {"id": found["id"], "next_round": 0}


def test_wandb_files_stay_local_for_a_bucket_work_dir(tmp_path):
    assert tracking.local_dir(str(tmp_path / "w")) == str(tmp_path / "w")
    assert tracking.local_dir("gs://bucket/runs/sp7b/") == io_utils.cache_dir("wandb", "bucket", "runs", "sp7b")


@pytest.mark.parametrize("override,message", [
    ("log.wandb.mode=online2", "config: log.wandb.mode 'online2': choose online | offline | disabled"),
    ("log.wandb_samples=-1", r"config: log.wandb_samples must be >= 0 \(got -1\)"),
    ("log.wandb.projekt=x", "unknown config key"),
])
def test_the_log_keys_are_checked_in_one_line(override, message):
    with pytest.raises(UserError, match=message) as e:
        config_lib.load(os.path.join(CONFIGS, "soft.py"), [override])
    assert "\n" not in str(e.value)


def test_tracking_is_a_change_a_resumed_run_may_make():
    old = config_lib.RunConfig().to_dict()
    new = config_lib.load(os.path.join(CONFIGS, "soft.py"), WANDB[:4]).to_dict()
    changed = [k for k in config_lib.diff(old, new) if k.startswith("log")]
    assert changed and set(changed) <= set(config_lib.RESUMABLE_CHANGES)
    del old["log"]  # a config.json written before the section existed: W&B off
    assert config_lib.from_saved(old) == config_lib.RunConfig()

