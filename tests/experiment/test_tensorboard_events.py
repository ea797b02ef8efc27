"""TensorBoard events of a work dir's metrics (soft_jax.experiment.tensorboard_events): tags, steps and values read back
as added, with tensorboardX's protobufs and, where the tensorboard package is installed, TensorBoard's own
reader; a resumed run's re-logged steps replace, never repeat; a killed run leaves readable events."""

import os

import pytest

from soft_jax.experiment import tensorboard_events as tbe
from soft_jax.experiment.workdir import Metrics

ROUNDS = {1: 3, 2: 2}  # training steps per round


def rows():
    out = [{"round": 0, "phase": "eval", "seconds": 1.5, "valid_nll": 2.5, "hhh": 0.5}]
    for t, n in ROUNDS.items():
        out.append({"round": t, "phase": "generate", "generator": "base", "prompts": 8, "kept": 5 + t,
                    "too_short": 3 - t, "new_tokens_per_s": 100.0 * t, "exemplar_ids": [1, 2]})
        out.append({"round": t, "phase": "curriculum", "examples": 5 + t, "score": "response_ppl",
                    "mean_difficulty": 3.25 / t})
        for s in range(1, n + 1):
            out.append({"round": t, "phase": "train", "step": s, "loss": 4.0 - t - s / 10, "grad_norm": 1.0,
                        "lr": 1e-4 * s, "tokens_per_s": 1000.0 + s, "tflops": 0.5})
        out.append({"round": t, "phase": "train_done", "steps": n, "examples": 5 + t, "tokens": 321,
                    "start": "base"})
        out.append({"round": t, "phase": "eval", "seconds": 2.0, "valid_nll": 2.5 - t / 10, "hhh": 0.5 + t / 10,
                    "open_distinct_2": 0.75})
        out.append({"round": t, "phase": "round", "seconds": 9.0 + t})
    return out


def expected(all_rows):
    """{tag: [(step, value)]}: train steps cumulative over the rounds, the rest at their round."""
    out, offset = {}, {1: 0, 2: ROUNDS[1]}
    for r in all_rows:
        for tag, v in tbe.scalars(r).items():
            step = offset[r["round"]] + r["step"] if r["phase"] == "train" else r["round"]
            out.setdefault(tag, []).append((step, v))
    return {tag: sorted(v) for tag, v in out.items()}


def read_back(directory):
    """{tag: [(step, value)]} of the event files in directory (tensorboardX's protobufs)."""
    files = tbe.event_files(directory)
    assert len(files) == 1 and not [n for n in os.listdir(directory) if n.endswith(".tmp")]
    out = {}
    for e in tbe.read_events(files[0]):
        for v in e.summary.value:
            out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return {tag: sorted(v) for tag, v in out.items()}


def close_to(got, want):
    assert got.keys() == want.keys()
    for tag in want:
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag  # each step once
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], rel=1e-6), tag


def test_tags():
    r = rows()
    assert tbe.scalars(r[0]) == {"eval/seconds": 1.5, "validation/valid_nll": 2.5, "eval/hhh": 0.5}
    assert tbe.scalars(r[0], validation="hhh") == {"eval/seconds": 1.5, "eval/valid_nll": 2.5, "validation/hhh": 0.5}
    assert tbe.scalars(r[1]) == {"generate/prompts": 8, "filter/kept": 6, "filter/too_short": 2,
                                 "generate/new_tokens_per_s": 100.0}  # strings and lists skipped
    assert set(tbe.scalars(r[3])) == {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_s",
                                      "train/tflops"}
    assert tbe.scalars({"round": 1, "phase": "x", "flag": True, "none": None}) == {}


def test_events_read_back(tmp_path):
    tb = str(tmp_path / "tensorboard")
    m = Metrics(str(tmp_path / "metrics.jsonl"), tb)
    for r in rows():
        m.add(r)
    live = read_back(tb)  # before the close: flushed as added
    m.close()
    want = expected(rows())
    close_to(live, want)
    close_to(read_back(tb), want)
    assert want["train/loss"][0][0] == 1 and [s for s, _ in want["train/loss"]] == [1, 2, 3, 4, 5]
    assert [s for s, _ in want["validation/valid_nll"]] == [0, 1, 2]
    assert [s for s, _ in want["filter/kept"]] == [1, 2]


def test_resume_replaces(tmp_path):
    """A rerun replays round 2's steps after its last checkpoint: their events replace, never repeat; a torn
    last record (a kill mid-write) and events missing from the file are restored from metrics.jsonl."""
    tb, path = str(tmp_path / "tensorboard"), str(tmp_path / "metrics.jsonl")
    all_rows = rows()
    cut = next(i for i, r in enumerate(all_rows) if r["round"] == 2 and r["phase"] == "train" and r["step"] == 2)
    m = Metrics(path, tb)
    for r in all_rows[:cut + 1]:
        m.add(r)
    # killed: no close; the last record torn
    (f,) = tbe.event_files(tb)
    os.truncate(f, os.path.getsize(f) - 5)
    before = {e.summary.value[0].tag: e.wall_time for e in tbe.read_events(f) if e.summary.value}

    m = Metrics(path, tb)  # resume: rebuilt from metrics.jsonl, in a new file that replaces the old one
    close_to(read_back(tb), expected(all_rows[:cut + 1]))
    (g,) = tbe.event_files(tb)
    assert g != f and tbe._generation(g) > tbe._generation(f)
    after = {e.summary.value[0].tag: e.wall_time for e in tbe.read_events(g) if e.summary.value}
    assert after["eval/seconds"] == before["eval/seconds"]  # a rebuilt event keeps its wall time
    replay = [dict(r, loss=r["loss"] + 1) if r["phase"] == "train" and r["round"] == 2 else r
              for r in all_rows]
    start = next(i for i, r in enumerate(all_rows) if r["round"] == 2 and r["phase"] == "train")
    for r in replay[start:]:  # from round 2's step 1 (its checkpoint was before it): steps 1, 2 re-logged
        m.add(r)
    m.close()
    close_to(read_back(tb), expected(replay))
    first = tbe.read_events(tbe.event_files(tb)[0])[:2]
    assert first[0].file_version == "brain.Event:2" and first[1].session_log.status == 1 and first[1].step == 0

    m = Metrics(path, tb)  # a rerun of a finished run changes nothing
    m.close()
    close_to(read_back(tb), expected(replay))


def test_tensorboard_reader(tmp_path):
    """TensorBoard's own reader (the tensorboard package, no TensorFlow) sees the same scalars."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    tb = str(tmp_path / "tensorboard")
    m = Metrics(str(tmp_path / "metrics.jsonl"), tb, validation="valid_nll")
    for r in rows():
        m.add(r)
    m.close()
    acc = accumulator.EventAccumulator(tb)
    acc.Reload()
    want = expected(rows())
    assert sorted(acc.Tags()["scalars"]) == sorted(want)
    close_to({t: [(e.step, e.value) for e in acc.Scalars(t)] for t in want}, want)


def test_a_run_writes_its_metrics_as_events(tmp_path):
    """SOFT+ on the tiny model, two rounds (test_loop's settings): every number of metrics.jsonl is an event, train
    steps cumulative over the rounds, the rest at their round."""
    from helpers import run

    w = run("soft_plus.py", tmp_path / "w")  # test_loop's run: its programs are in the compilation cache
    steps = {m["round"]: m["steps"] for m in w.metrics if m["phase"] == "train_done"}
    want = {}
    for m in w.metrics:
        for tag, v in tbe.scalars(m, w.config["validation"]["metric"]).items():
            step = m["round"] if m["phase"] != "train" else m["step"] + sum(n for t, n in steps.items()
                                                                              if t < m["round"])
            want.setdefault(tag, []).append((step, v))
    close_to(read_back(os.path.join(w.path, tbe.DIR)), {tag: sorted(v) for tag, v in want.items()})
    assert {"train/loss", "train/lr", "train/tokens_per_s", "filter/kept", "curriculum/mean_difficulty",
            "validation/valid_nll", "round/seconds"} <= want.keys()
    assert [s for s, _ in want["train/loss"]] == list(range(1, sum(steps.values()) + 1))
