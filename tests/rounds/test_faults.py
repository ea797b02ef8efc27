"""Faults across a whole run: SIGKILL and SIGTERM at seeded random points, a full disk, corrupted
checkpoints, torn writes, and a catalogue of bad inputs (exit 2, one line, the work dir untouched)."""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import (
    CONFIGS,
    RUN,
    TINY_OVERRIDES,
    Workdir,
    run,
    run_workdir,
    same_artifacts,
    subprocess_env,
)

from soft_jax.cli import main
from soft_jax.core import io_utils
from soft_jax.experiment import workdir
from soft_jax.rounds import round_eval

pytestmark = pytest.mark.e2e  # whole runs, CLI processes, killed and restarted runs (conftest.py)

# two generation batches per round, training-step checkpoints every 2 steps: stops land inside phases too
EXTRA = ("prompts.per_round=8", "train.checkpoint_every=2")
# which phase of a round a stop point lies in (points in metrics.jsonl and config.json writes lie in any)
PHASES = {"generate": ("generate_", "generated_", "prompts.jsonl", "generations", "curriculum.json"),
          "score": ("scored_", "train.jsonl"), "train": ("train_step_", "trained_", "checkpoint:"),
          "evaluate": ("evaluated_", "eval.json", "open_ended.jsonl"), "finish": ("round_done_", "state.json")}


def phase(point: str) -> str | None:
    return next((p for p, marks in PHASES.items() if any(m in point for m in marks)), None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base):
    """The uninterrupted run every faulty one must reproduce."""
    return run("soft_plus.py", tmp_path_factory.mktemp("ref") / "w", *EXTRA)


@pytest.mark.slow  # 22 or more restarts of a whole run, each stopped at a seeded random point: nearly 4 minutes
def test_stopped_at_random_points_resumes_to_the_same_artifacts(tmp_path, reference, tiny_base):
    """SIGTERM (preemption) inside generation and inside training, then 20 SIGKILLs and SIGTERMs at seeded
    random points (any point: after a batch, a step or a phase, or halfway through writing a file or a JSON
    line), each followed by a restart; the run ends with the uninterrupted run's artifacts."""
    w, trace = tmp_path / "w", tmp_path / "trace"
    rng = np.random.default_rng(20261130)
    plan = [("TERM", "AT", "generate_r1_b0"), ("TERM", "AT", "train_step_3")]
    stops = []
    for _ in range(60):  # then random stops until the run gets through (the seed fixes how many: 20 or more)
        how, by, where = plan.pop(0) if plan else ("TERM" if rng.random() < 0.2 else "KILL", "AFTER",
                                                   str(rng.integers(1, 6)))
        trace.write_text("")
        p = run_workdir(w, EXTRA, {f"SOFT_JAX_{how}_{by}": where, "SOFT_JAX_TRACE": str(trace)})
        reached = trace.read_text().split()
        if p.returncode == 0 and by == "AFTER" and len(reached) < int(where):
            break  # finished before the stop point
        at = where if by == "AT" else reached[int(where) - 1]
        stops.append((how, at))
        if how == "KILL":
            assert p.returncode == -9, f"{at}: expected SIGKILL, got {p.returncode}: {p.stderr[-2000:]}"
            continue
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
        if p.returncode == 0:  # SIGTERM after the run's last safe point: it finished anyway
            assert len(stops) > 2, p.stderr[-2000:]
            break
        assert p.returncode == 143, f"{at}: {p.stderr[-2000:]}"
        assert last.startswith("soft-jax: stopped by SIGTERM after ") and "resume with: soft-jax run" in last
        if at == "generate_r1_b0":
            assert "round 1 generation batch 1 of 2" in last
        if at == "train_step_3":  # saved at the stop although checkpoint_every is 2
            assert "training step 3" in last
            assert sorted(os.listdir(w / "checkpoints" / "train" / "001")) == ["2", "3"]
    else:
        pytest.fail(f"the run did not finish after {len(stops)} stops")
    print("stops:", stops)
    assert len(stops) >= 22 and {phase(at) for _, at in stops} >= set(PHASES), stops  # stops in every phase
    assert {at.split(":")[0] for _, at in stops} >= {"write", "append", "checkpoint"}  # and inside writes
    same_artifacts(Workdir(str(w)), reference, tiny_base)


def test_ctrl_c_once_stops_at_a_saved_point_twice_stops_at_once(tmp_path, reference, tiny_base):
    """Ctrl-C once: the run finishes the step it is in, saves it and stops (exit 130). Ctrl-C twice while a
    training step is still in progress (held there by SOFT_JAX_PAUSE_AT for 300 s): it stops at once, without
    saving that step, says so and how to resume (exit 130). The rerun ends with the uninterrupted run's
    artifacts."""
    w, trace = tmp_path / "w", tmp_path / "trace"
    argv = RUN + ["--workdir", str(w)] + [f"--config.{o}" for o in TINY_OVERRIDES + list(EXTRA)]

    def interrupt(point, pause, times):
        """Starts the run held `pause` s at `point`, sends `times` SIGINTs once it is there; (code, stderr)."""
        trace.write_text("")
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=subprocess_env(SOFT_JAX_PAUSE_AT=f"{point}@{pause}", SOFT_JAX_TRACE=str(trace)))
        while point not in trace.read_text().split():
            assert p.poll() is None, f"ended before {point}: {p.stderr.read()[-2000:]}"
            time.sleep(0.1)
        for _ in range(times):
            p.send_signal(signal.SIGINT)
            time.sleep(0.5)
        try:  # well before the pause would end
            err = p.communicate(timeout=120)[1]
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"still running 120 s after {times} Ctrl-C at {point}: it waited for the step")
        return p.returncode, err.strip().splitlines()[-1]

    code, last = interrupt("train_step_1", 2, 1)  # checkpoints are due every 2 steps: the stop saves step 1
    assert code == 130 and last.startswith("soft-jax: stopped by SIGINT after training step 1; progress is saved"), last
    assert sorted(os.listdir(w / "checkpoints" / "train" / "001")) == ["1"]
    code, last = interrupt("train_step_3", 300, 2)  # step 2 saved (due), step 3 done but not saved
    assert code == 130, last
    assert last.startswith("soft-jax: interrupted; the step or batch in progress is lost") and \
        "resume with: soft-jax run --config" in last, last
    assert "3" not in os.listdir(w / "checkpoints" / "train" / "001")
    p = run_workdir(w, EXTRA)
    assert p.returncode == 0, p.stderr[-2000:]
    same_artifacts(Workdir(str(w)), reference, tiny_base)


# --- a full disk ----------------------------------------------------------------------------------

def run_in_process(workdir, capsys, *extra, env=None, monkeypatch=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    code = main(["run", "--config", os.path.join(CONFIGS, "soft_plus.py"), "--workdir", str(workdir),
                 *[f"--config.{o}" for o in TINY_OVERRIDES + list(EXTRA) + list(extra)]])
    for k in env or {}:
        monkeypatch.delenv(k)
    return code, capsys.readouterr()


def test_a_group_of_batches_cut_between_its_lines_is_sampled_again_whole(tmp_path, tiny_base):
    """sampling.group_batches=2: a round's two generation batches are sampled as one device batch and appended as
    two lines. A kill inside the second line's write leaves the first batch alone in the partial file: the rerun
    samples the group again whole (its random stream is the group's, not the batch's) and ends with the
    uninterrupted run's artifacts."""
    extra = (*EXTRA, "sampling.group_batches=2")
    ref, trace = tmp_path / "ref", tmp_path / "trace"
    p = run_workdir(ref, extra, {"SOFT_JAX_TRACE": str(trace)})
    assert p.returncode == 0, p.stderr[-2000:]
    points = trace.read_text().split()
    appends = [i for i, name in enumerate(points) if name == "append:generations.partial.jsonl"]
    assert len(appends) == 4  # two rounds, two batches each, one group per round
    w = tmp_path / "w"
    p = run_workdir(w, extra, {"SOFT_JAX_KILL_AFTER": str(appends[1] + 1)})
    assert p.returncode == -9, p.stderr[-2000:]
    partial = [json.loads(line) for line in open(w / "rounds" / "001" / "generations.partial.jsonl")
               if line.endswith("\n")]
    assert [b["batch"] for b in partial] == [0]
    p = run_workdir(w, extra)
    assert p.returncode == 0, p.stderr[-2000:]
    same_artifacts(Workdir(str(w)), Workdir(str(ref)), tiny_base)


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
    redoes that round's training from its saved data, evaluates the retrained model again, and ends with the
    same parameters and the same eval.json."""
    w = tmp_path / "w"
    shutil.copytree(reference.path, w)
    how(w / "checkpoints" / "rounds" / "2")
    evaluated, evaluate = [], round_eval.evaluate
    monkeypatch.setattr(round_eval, "evaluate", lambda run, t, *a: evaluated.append(t) or evaluate(run, t, *a))
    code, out = run_in_process(w, capsys, monkeypatch=monkeypatch)
    assert code == 0, out.err
    assert evaluated == [2], evaluated  # the retrained round, not its old eval.json
    assert "checkpoints/rounds/2 is unreadable" in out.out
    assert "redoing round 2's training from its saved data" in out.out
    same_artifacts(Workdir(str(w)), reference, tiny_base)


def test_unreadable_step_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, tiny_base, capsys,
                                                                   monkeypatch):
    """Killed in round 1's training after step 4 (checkpoints at steps 2 and 4), the newest one corrupted: the
    rerun resumes from step 2, says so, and ends as the uninterrupted run."""
    w = tmp_path / "w"
    p = run_workdir(w, EXTRA, {"SOFT_JAX_KILL_AT": "train_step_4"})
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
    metrics = workdir.Metrics(str(tmp_path / "metrics.jsonl"))
    metrics.add({"round": 1, "phase": "train", "step": 1, "loss": 2.0})
    with open(metrics.path, "a") as f:
        f.write('{"round": 1, "phase": "train", "st')
    again = workdir.Metrics(metrics.path)
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


# --- a catalogue of bad inputs: exit 2, one line that says what and how to mend, nothing changed ----------

TINY_RUN = ["run", "--config", os.path.join(CONFIGS, "tiny.py"), "--workdir", "{new}"] + \
    [f"--config.{o}" for o in TINY_OVERRIDES]
ON_RUN = ["run", "--config", os.path.join(CONFIGS, "tiny.py"), "--workdir", "{run}"] + \
    [f"--config.{o}" for o in TINY_OVERRIDES] + ["--config.rounds=1"]
BAD_JSONL = '{"prompt": "fine"}\n{"prompt": "broken", \n'
FILES = {  # written into the test's directory before each case
    "bad.jsonl": BAD_JSONL, "empty.txt": "", "no_prompt.jsonl": '{"text": "no prompt key"}\n',
    "syntax.py": "def get_config(:\n", "no_get_config.py": "X = 1\n", "garbage.gguf": "GGUF" + "\x00" * 20,
    "model/config.json": "{", "empty_dir/.keep": "", "foreign/notes.txt": "mine", "a_file": "not a dir",
    "tq.json": "[{", "no_response.jsonl": '{"prompt": "only a prompt"}\n',
}
CASES = {  # id: (argv, a phrase the one line must hold)
    # config
    "unknown key": (TINY_RUN + ["--config.train.lr=1"], "unknown config key"),
    "value of the wrong type": (TINY_RUN + ["--config.rounds=two"], "rounds"),
    "override without a value": (TINY_RUN + ["--config.rounds"], "give a value as --config.rounds=VALUE"),
    "missing config file": (["run", "--config", "{tmp}/nope.py", "--workdir", "{new}"], "no such config file"),
    "config file that fails to import": (["run", "--config", "{tmp}/syntax.py", "--workdir", "{new}"],
                                         "fails to import (SyntaxError"),
    "config file without get_config": (["run", "--config", "{tmp}/no_get_config.py", "--workdir", "{new}"],
                                       "defines no get_config"),
    "unknown config variant": (["run", "--config", os.path.join(CONFIGS, "ablation_order.py") + ":sideways",
                                "--workdir", "{new}"], "sideways"),
    "zero rounds": (TINY_RUN + ["--config.rounds=0"], "rounds must be at least 1"),
    "more rounds than prompts": (TINY_RUN + ["--config.rounds=400"], "prompt pool"),
    "more exemplars than the pool": (TINY_RUN + ["--config.exemplars.k=100"], "exemplars.k = 100"),
    "negative temperature": (TINY_RUN + ["--config.sampling.temperature=-1"], "sampling.temperature = -1.0"),
    "top_p above 1": (TINY_RUN + ["--config.sampling.top_p=1.5"], "sampling.top_p"),
    "unknown curriculum order": (TINY_RUN + ["--config.curriculum.order=sideways"], "curriculum.order"),
    "unknown difficulty score": (TINY_RUN + ["--config.curriculum.score=vibes"], "curriculum.score"),
    "unknown generator": (TINY_RUN + ["--config.generator=other"], "generator 'other'"),
    "unknown SFT start": (TINY_RUN + ["--config.sft_start=middle"], "sft_start 'middle'"),
    "unknown validation metric": (TINY_RUN + ["--config.validation.metric=bleu"], "validation.metric 'bleu'"),
    "unknown eval task": (TINY_RUN + ["--config.eval.tasks=hhh,mmlu"], "unknown task(s) mmlu"),
    "unknown eval protocol": (TINY_RUN + ["--config.eval.tasks=hhh", "--config.eval.protocol=vibes"], "protocol"),
    "unknown dtype": (TINY_RUN + ["--config.model.dtype=float8"], "float8"),
    "unknown model preset": (TINY_RUN + ["--config.model.name=gpt5"], "unknown model preset 'gpt5'"),
    "7B preset without weights": (TINY_RUN + ["--config.model.name=llama2-7b"], "needs model.path"),
    "mesh that does not divide the devices": (TINY_RUN + ["--config.mesh.data=3"], "does not divide"),
    "warmup longer than training": (TINY_RUN + ["--config.train.warmup_ratio=1.5"], "train.warmup_ratio = 1.5"),
    "zero batch size": (TINY_RUN + ["--config.train.batch_size=0"], "train.batch_size"),
    "negative learning rate": (TINY_RUN + ["--config.train.learning_rate=-0.1"], "train.learning_rate"),
    "max length below the chat template": (TINY_RUN + ["--config.train.max_prompt_len=4"], "engraving format alone"),
    # model files
    "model path that does not exist": (TINY_RUN + ["--config.model.path={tmp}/none"], "no such file"),
    "GGUF file that is not one": (TINY_RUN + ["--config.model.path={tmp}/garbage.gguf"], "not a readable GGUF"),
    "model dir without config.json": (TINY_RUN + ["--config.model.path={tmp}/empty_dir"], "config.json"),
    "model dir with a broken config.json": (TINY_RUN + ["--config.model.path={tmp}/model"], "config.json"),
    # data files
    "prompt file that does not exist": (TINY_RUN + ["--config.prompts.path={tmp}/none.jsonl"], "no such file"),
    "prompt file with a broken line": (TINY_RUN + ["--config.prompts.path={tmp}/bad.jsonl"], "bad.jsonl:2"),
    "prompt rows without a prompt": (TINY_RUN + ["--config.prompts.path={tmp}/no_prompt.jsonl"], "prompt"),
    "empty prompt file": (TINY_RUN + ["--config.prompts.path={tmp}/empty.txt"], "no rows"),
    "exemplar file with a broken line": (TINY_RUN + ["--config.exemplars.path={tmp}/bad.jsonl"], "bad.jsonl:"),
    "empty principles file": (TINY_RUN + ["--config.principles={tmp}/empty.txt"], "principles file is empty"),
    "validation file that does not exist": (TINY_RUN + ["--config.validation.path={tmp}/none.jsonl"],
                                            "no such file"),
    "open-ended questions with a broken line": (TINY_RUN + ["--config.open_ended.path={tmp}/bad.jsonl",
                                                            "--config.open_ended.limit=3"], "bad.jsonl:2"),
    "TruthfulQA file that fails to parse": (TINY_RUN + ["--config.eval.tasks=truthfulqa_mc1",
                                                        "--config.eval.truthfulqa_file={tmp}/tq.json"], "tq.json"),
    "unknown TFDS prompt dataset": (TINY_RUN + ["--config.prompts.tfds=no_such_dataset",
                                                "--config.prompts.tfds_data_dir={tmp}/empty_dir"], "no_such_dataset"),
    # work dir
    "work dir that is a file": (TINY_RUN[:4] + ["{tmp}/a_file"] + TINY_RUN[5:], "a_file"),
    "work dir holding something else": (TINY_RUN[:4] + ["{tmp}/foreign"] + TINY_RUN[5:], "not empty"),
    "work dir of another config": (ON_RUN + ["--config.seed=7"], "another config (changed: seed)"),
    "work dir in use by another run": (ON_RUN, "another soft-jax run (pid"),
    "work dir with a damaged config.json": (ON_RUN, "config.json: malformed JSON"),
    "work dir with a damaged state.json": (ON_RUN, "state.json: malformed JSON"),
    # command line
    "unknown command": (["frobnicate"], "invalid choice"),
    "run without a work dir": (["run", "--config", os.path.join(CONFIGS, "tiny.py")], "--workdir"),
    "run with a stray argument": (TINY_RUN + ["extra"], "unrecognized argument 'extra'"),
    "eval of an unknown task": (["eval", "--model", "{run}", "--tasks", "mmlu", "--out", "{tmp}/o.json"],
                                "unknown task(s) mmlu"),
    "eval with an unknown protocol": (["eval", "--model", "{run}", "--protocol", "vibes", "--out", "{tmp}/o.json"],
                                      "unknown protocol 'vibes'"),
    "report of a directory that holds no run": (["report", "{tmp}/empty_dir"], "empty_dir"),
    "generate from a prompt file that does not exist": (["generate", "--model", "{run}", "--prompts",
                                                         "{tmp}/none.jsonl"], "no such file"),
    "train on rows without a response": (["train", "--model", "{run}", "--data", "{tmp}/no_response.jsonl", "--out",
                                          "{tmp}/out"], "response"),
    "a run's model whose best checkpoint is damaged": (["generate", "--model", "{run}", "--prompt", "hi"],
                                                       "rerun `soft-jax run`"),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-round tiny run: the work dir that bad reruns and commands must leave untouched."""
    w = run("tiny.py", tmp_path_factory.mktemp("finished") / "w", "rounds=1", "validation.confidence=0")
    assert w.state["best_round"] == 1  # so that --model WORKDIR reads round 1's checkpoint
    return w.path


def snapshot(root):
    """Relative path -> bytes of every file under root (a work dir's lock file records only who last held it)."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            if n != ".lock":
                out[os.path.relpath(os.path.join(d, n), root)] = open(os.path.join(d, n), "rb").read()
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(case, tmp_path, finished, capsys):
    argv, phrase = CASES[case]
    for name, text in FILES.items():
        os.makedirs((tmp_path / name).parent, exist_ok=True)
        (tmp_path / name).write_text(text)
    shutil.copytree(finished, tmp_path / "run")
    if "damaged config.json" in case:
        (tmp_path / "run" / "config.json").write_text('{"rounds": ')
    if "damaged state.json" in case:
        (tmp_path / "run" / "state.json").write_text("")
    if "best checkpoint is damaged" in case:
        truncate(tmp_path / "run" / "checkpoints" / "rounds" / "1")
    holder = workdir.lock(str(tmp_path / "run")) if "in use" in case else None
    before = snapshot(tmp_path)
    try:
        code = main([a.format(tmp=tmp_path, new=tmp_path / "new", run=tmp_path / "run") for a in argv])
    finally:
        if holder:
            holder.close()
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("soft-jax: error: ") and "\n" not in err and "Traceback" not in err, err
    assert phrase in err, err
    assert snapshot(tmp_path) == before, "a refused command changed files"
    assert not os.path.exists(tmp_path / "new"), "a refused run created its work dir"
