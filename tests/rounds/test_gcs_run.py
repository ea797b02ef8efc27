"""Whole runs whose work dir, model and data live in a bucket on a real GCS server (fake-gcs-server on 127.0.0.1,
reached through STORAGE_EMULATOR_HOST as a user would): the run equals a local one byte for byte, resumes after
SIGKILLs, refuses a second run, runs on two processes with no shared folder, and stops with one line when the
server goes away; export, `--model gs://`, `data import` and bad URLs."""

import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    CONFIGS,
    INHOUSE_BIGBENCH,
    TESTS,
    TINY_OVERRIDES,
    GCSServer,
    Workdir,
    assert_params_close,
    launch_two,
    mirror,
    one_line_error,
    random_b,
    round_params,
    run,
    run_cli,
    run_workdir,
    same_artifacts,
    subprocess_env,
    wait,
)

from soft_jax import models
from soft_jax.core import io_utils, storage

pytestmark = pytest.mark.e2e  # whole runs, CLI processes, killed and restarted runs (conftest.py)

# as tests/rounds/test_faults.py: two generation batches per round, training-step checkpoints every 2 steps
EXTRA = ("prompts.per_round=8", "train.checkpoint_every=2")


def same_artifacts_in(bucket_run: str, ref: Workdir, base_model, dest) -> Workdir:
    """The bucket's run, copied object by object to `dest`, against the local run (helpers.same_artifacts: every
    artifact byte-equal, no stray temp object, every metrics event once, and the round checkpoints, written by
    TensorStore's GCS driver, restore to the local run's parameters)."""
    done = Workdir(mirror(bucket_run, dest))
    same_artifacts(done, ref, base_model)
    return done


def _objects(url: str) -> dict:
    """Relative name -> bytes of the objects under a prefix, TensorBoard's events aside (a rerun starts a new
    events file: tests/experiment/test_tensorboard_events.py)."""
    return {rel: storage.read_bytes(f"{url}/{rel}") for rel in storage.files(url) if not rel.startswith("tensorboard/")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_base):
    """The same run on local disk, uninterrupted."""
    return run("soft_plus.py", tmp_path_factory.mktemp("ref") / "w", *EXTRA)


def test_a_run_in_a_bucket_equals_a_local_run_resumes_and_refuses_a_second_run(bucket, reference, tiny_base,
                                                                                 tmp_path, capsys, monkeypatch):
    """A tiny SOFT+ run with `--workdir gs://...` ends with the local run's artifacts and leaves nothing on local
    disk; the same command again finds it done; a run on a work dir whose lease another process holds exits 2
    with one line and writes nothing."""
    monkeypatch.chdir(tmp_path)
    w = f"{bucket}/runs/w"
    p = run_workdir(w, EXTRA)
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.listdir(tmp_path) == []  # no local `gs:` folder
    done = same_artifacts_in(w, reference, tiny_base, tmp_path.parent / f"{tmp_path.name}-mirror")
    assert not storage.exists(f"{w}/.lock")  # released at the end
    before = _objects(w)

    p = run_workdir(w, EXTRA)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[run] done in" in p.stdout and "best round 1" in p.stdout, p.stdout[-2000:]
    after = _objects(w)
    assert after.keys() == before.keys()
    changed = {k for k in after if after[k] != before[k]}
    assert changed <= {k for k in after if k.startswith("report/")}, changed  # nothing redone; the report redrawn
    assert len(done.metrics) == len(Workdir(mirror(w, tmp_path.parent / f"{tmp_path.name}-again")).metrics)

    held = storage.Lease(f"{w}/.lock", ttl=60)
    try:
        argv = ["run", "--config", os.path.join(CONFIGS, "soft_plus.py"), "--workdir", w] + [
            f"--config.{o}" for o in TINY_OVERRIDES + list(EXTRA)]
        err = one_line_error(capsys, argv)
        assert "holds this work dir's lease" in err and f"pid {os.getpid()}" in err, err
    finally:
        held.release()
    assert _objects(w) == after


def test_bad_urls_exit_2_with_one_line(bucket, capsys, tmp_path):
    """A bucket that does not exist, a `gs://` model with no object, a scheme other than gs://: exit 2, one line
    saying what and where, nothing written."""
    run = ["run", "--config", os.path.join(CONFIGS, "tiny.py"), "--workdir"]
    err = one_line_error(capsys, run + ["gs://no-such-bucket-here/w"])
    assert "no-such-bucket-here" in err and "does not exist" in err, err
    err = one_line_error(capsys, ["info", "--model", f"{bucket}/models/absent"])
    assert f"{bucket}/models/absent" in err and "no such" in err, err
    err = one_line_error(capsys, run + ["s3://bucket/w"])
    assert "s3://" in err and "gs://" in err, err
    err = one_line_error(capsys, ["eval", "--model", "tiny", "--tasks", "hhh", "--out", "gs:///eval.json"])
    assert "bucket" in err, err
    assert storage.files(bucket) == []


def test_export_to_a_bucket_then_model_from_it_gives_the_same_logits(bucket, tiny_chat):
    """`export --out gs://...` of a model; `--model gs://...` loads it with the local source's logits. LoRA
    adapters exported to the bucket in the PEFT format load, on the base they name (in the bucket too), with the
    tuned model's logits, and `export --model gs://ADAPTER` merges them."""
    from soft_jax.models import lora

    base = f"{bucket}/models/base"
    p = run_cli("export", "--model", tiny_chat, "--out", base)
    assert p.returncode == 0, p.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(storage.listdir(base)), storage.listdir(base)
    _, cfg, tokenizer = models.inspect(base)  # what `plan` reads: the weights stay in the bucket
    copy = os.path.join(io_utils.cache_dir("gcs"), base[len("gs://"):])
    assert cfg.num_layers == 2 and tokenizer is not None and "model.safetensors" not in os.listdir(copy)
    local = models.load(tiny_chat, progress=False)[0]
    ids = jnp.asarray(np.random.default_rng(7).integers(3, local.config.vocab_size, size=(2, 24)))
    remote = models.load(base, progress=False)[0]
    np.testing.assert_array_equal(np.asarray(remote(ids)), np.asarray(local(ids)))

    tuned = random_b(lora.add_adapters(local, rank=4, alpha=8, seed=0))
    want = np.asarray(tuned(ids))
    assert np.abs(want - np.asarray(local(ids))).max() > 1e-3  # the adapters matter
    adapter = lora.export_peft(tuned, f"{bucket}/adapters/a", base_model=base)
    assert lora.is_peft_dir(adapter) and lora.peft_base(adapter) == base
    loaded = models.load(adapter, progress=False)[0]  # the adapter in the bucket on the base it names there
    np.testing.assert_allclose(np.asarray(loaded(ids)), want, rtol=0, atol=1e-5)
    p = run_cli("export", "--model", adapter, "--out", f"{bucket}/models/merged")
    assert p.returncode == 0, p.stderr[-2000:]
    merged = models.load(f"{bucket}/models/merged", progress=False)[0]
    np.testing.assert_allclose(np.asarray(merged(ids)), want, rtol=0, atol=1e-5)
    assert not [f for f in storage.files(bucket) if os.path.basename(f).startswith(".")]  # no temp objects


def test_data_import_reads_and_writes_a_bucket(bucket, tmp_path, capsys):
    """`data import` from an object in the bucket to a pool in the bucket writes the bytes the same import writes
    on local disk; a missing input object is one line, exit 2."""
    from soft_jax import cli

    src = os.path.join(TESTS, "fixtures", "pools", "alpaca.json")
    storage.write_atomic(f"{bucket}/raw/alpaca.json", open(src, "rb").read())
    assert cli.main(["data", "import", "--format", "alpaca", f"{bucket}/raw/alpaca.json",
                     "--out", f"{bucket}/pools/p.jsonl"]) == 0
    assert cli.main(["data", "import", "--format", "alpaca", src, "--out", str(tmp_path / "p.jsonl")]) == 0
    capsys.readouterr()
    assert storage.read_bytes(f"{bucket}/pools/p.jsonl") == (tmp_path / "p.jsonl").read_bytes()
    assert storage.listdir(f"{bucket}/pools") == ["p.jsonl"]
    err = one_line_error(capsys, ["data", "import", "--format", "alpaca", f"{bucket}/raw/absent.json",
                                  "--out", f"{bucket}/pools/q.jsonl"])
    assert f"{bucket}/raw/absent.json" in err, err
    assert storage.listdir(f"{bucket}/pools") == ["p.jsonl"]


@pytest.mark.slow  # about 10 restarted runs
def test_killed_at_random_points_in_a_bucket_resumes_to_the_local_runs_artifacts(bucket, reference, tiny_base,
                                                                                 tmp_path):
    """SIGKILLs at seeded random points of a `gs://` run (after a batch, a step or a phase, inside an object's
    write, between an appended line's upload and its compose, inside an Orbax save to the bucket), each followed
    by the same command, which takes over the dead run's lease and resumes: the run ends with the local run's
    artifacts and no temp object."""
    w, trace = f"{bucket}/w", tmp_path / "trace"
    rng = np.random.default_rng(20261207)
    stops = []
    for _ in range(40):
        where = int(rng.integers(1, 12))
        trace.write_text("")
        p = run_workdir(w, EXTRA, {"SOFT_JAX_KILL_AFTER": str(where), "SOFT_JAX_TRACE": str(trace)})
        reached = trace.read_text().split()
        if p.returncode == 0 and len(reached) < where:
            break  # finished before the stop point
        assert p.returncode == -9, f"expected SIGKILL at point {where}, got {p.returncode}: {p.stderr[-2000:]}"
        stops.append(reached[where - 1])
    else:
        pytest.fail(f"the run did not finish after {len(stops)} kills")
    print("kills:", stops)
    assert len(stops) >= 8 and {s.split(":")[0] for s in stops} >= {"write", "append"}, stops
    same_artifacts_in(w, reference, tiny_base, tmp_path / "mirror")


@pytest.mark.slow  # two processes, then one, each compiling
def test_two_processes_share_a_bucket_work_dir_with_no_shared_local_folder(bucket, tmp_path):
    """Two processes (jax.distributed over localhost) run one round on a `gs://` work dir, each with its own
    local cache folder: process 0 writes the JSON files, both write the Orbax checkpoints; the result equals
    a one-process local run (the same generations, parameters to float32 reduction order)."""
    from soft_jax.models import presets

    # as tests/parallel/test_distributed.py: greedy, no repetition filters, generation tensor-parallel across both
    two = ["rounds=1", "prompts.per_round=8", "sampling.temperature=0.0", "train.checkpoint_every=1",
           "filters.max_repeated_ngram_fraction=1.0", "filters.max_line_repeats=100000", "filters.min_words=0",
           "filters.max_compression_ratio=1e9"]
    meshes = ["mesh_generate.data=1", "mesh_generate.fsdp=1", "mesh_generate.tensor=2"]
    w = f"{bucket}/two"
    env = tuple({"SOFT_JAX_CACHE": str(tmp_path / f"host{i}")} for i in range(2))
    results = wait(launch_two(w, two + meshes, env))
    assert [r for r, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    done = Workdir(mirror(w, tmp_path / "mirror"))
    ref = run("soft_plus.py", tmp_path / "ref", *two)
    assert [g["raw"] for g in done.rows(1, "generations.jsonl")] == [g["raw"] for g in ref.rows(1, "generations.jsonl")]
    assert [r["prompt_id"] for r in done.rows(1, "train.jsonl")] == [r["prompt_id"] for r in ref.rows(1, "train.jsonl")]
    base = presets.load_preset("tiny", seed=0)[0]
    # two processes vs one: the criterion of tests/parallel/test_distributed.py (Adam's first update near eps)
    assert_params_close(round_params(done, base)["round 1"], round_params(ref, base)["round 1"], rtol=1e-5,
                        atol=1e-6, few=1e-3, few_atol=2.5e-4, what="round 1, two processes on a bucket vs one: ")
    assert not [f for f in storage.files(w) if os.path.basename(f).startswith(".")]  # lease released, no temps


@pytest.mark.slow  # gcsfs's retries run out (about half a minute) before the run stops
def test_a_server_gone_mid_write_stops_the_run_with_one_line_and_the_rerun_resumes(reference, tiny_base, tmp_path,
                                                                                   monkeypatch):
    """The server stops while the run is about to write round 1's state.json: the run stops (exit 1) with one
    line naming the object and saying that rerunning resumes. The server back (same port, same objects), the
    same command finishes with the local run's artifacts."""
    server = GCSServer(str(tmp_path / "gcs")).start()
    env = server.env()
    bucket = server.bucket()
    w, trace = f"{bucket}/w", tmp_path / "trace"
    argv = [sys.executable, "-m", "soft_jax.cli", "run", "--config", os.path.join(CONFIGS, "soft_plus.py"),
            "--workdir", w] + [f"--config.{o}" for o in TINY_OVERRIDES + list(EXTRA)]
    trace.write_text("")
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env(**env, SOFT_JAX_PAUSE_AT="write:state.json@5",
                                                   SOFT_JAX_TRACE=str(trace)))
        while "write:state.json" not in trace.read_text().split():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.1)
        server.stop()
        start = time.time()
        err = proc.communicate(timeout=400)[1]
        print(f"stopped {time.time() - start:.0f} s after the server")
        last = err.strip().splitlines()[-1]
        assert proc.returncode == 1, err[-3000:]
        assert last.startswith(f"soft-jax: error: {w}/state.json: Cloud Storage request failed") and \
            "rerun the same command" in last, last
        assert "Traceback" not in err, err[-3000:]
        server.start()
        p = run_workdir(w, EXTRA, env)
        assert p.returncode == 0, p.stderr[-3000:]
        for k, v in env.items():  # read back through this server
            monkeypatch.setenv(k, v)
        same_artifacts_in(w, reference, tiny_base, tmp_path / "mirror")
    finally:
        server.stop()


def test_benchmark_files_pools_principles_and_exemplars_read_from_a_bucket(bucket, monkeypatch):
    """SOFT_JAX_BIGBENCH_DIR=gs://... (a tree of task files in a bucket) gives the items the same files give on
    local disk; a prompt pool, principles and exemplars in the bucket load as their local copies do."""
    from soft_jax import data
    from soft_jax.data import sources

    monkeypatch.delenv("SOFT_JAX_BIGBENCH_ARCHIVE", raising=False)
    for rel in sources.TASK_FILES.values():
        storage.write_atomic(f"{bucket}/BIG-bench/{rel}", open(os.path.join(INHOUSE_BIGBENCH, rel), "rb").read())
    monkeypatch.setenv("SOFT_JAX_BIGBENCH_DIR", INHOUSE_BIGBENCH)
    local = (sources.load_hhh(), sources.load_truthfulqa("mc1"), sources.load_truthfulqa("mc2"))
    monkeypatch.setenv("SOFT_JAX_BIGBENCH_DIR", f"{bucket}/BIG-bench")
    assert sources.locate().describe().count(f"{bucket}/BIG-bench") == 1
    assert (sources.load_hhh(), sources.load_truthfulqa("mc1"), sources.load_truthfulqa("mc2")) == local
    assert len(local[0]) > 0

    for name in ("prompts.jsonl", "principles.txt", "exemplars.jsonl"):
        storage.write_atomic(f"{bucket}/assets/{name}", open(data.asset(name), "rb").read())
    assert data.load_prompts(f"{bucket}/assets/prompts.jsonl") == data.load_prompts()
    assert data.load_principles(f"{bucket}/assets/principles.txt") == data.load_principles()
    assert data.load_exemplars(f"{bucket}/assets/exemplars.jsonl") == data.load_exemplars()
