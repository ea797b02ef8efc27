"""Two local processes (jax.distributed over localhost, CPU collectives) run a tiny SOFT round."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import CONFIGS, Workdir, assert_params_close, launch_two, round_params, run, subprocess_env, wait

pytestmark = pytest.mark.e2e  # whole runs, CLI processes, killed and restarted runs (conftest.py)

# greedy (same generations), and a random model repeats itself under greedy decoding: no repetition filter
EXTRA = ["rounds=1", "prompts.per_round=8", "sampling.temperature=0.0", "train.checkpoint_every=1",
         "filters.max_repeated_ngram_fraction=1.0", "filters.max_line_repeats=100000", "filters.min_words=0",
         "filters.max_compression_ratio=1e9"]
# the two-process runs generate and score tensor-parallel over both processes' devices (training is data
# parallel over them): the weights move between the two layouts across processes at every phase boundary
TWO_MESHES = ["mesh_generate.data=1", "mesh_generate.fsdp=1", "mesh_generate.tensor=2"]


def launch(workdir, extra=(), env=({}, {})):
    """Processes 0 and 1 of a two-process tiny SOFT+ run of one round (EXTRA, TWO_MESHES, then `extra`)."""
    return launch_two(workdir, EXTRA + TWO_MESHES + list(extra), env)


# Process 1 starts 2 s late and process 0 sleeps 6 s halfway through writing config.json: a writer that wrote
# before every host had checked the work dir would show process 1 its temp file ("not empty ... no soft-jax run").
SLOW_START = ({"SOFT_JAX_PAUSE_AT": "write:config.json@6"}, {"SOFT_JAX_PAUSE_AT": "distributed_started@2"})


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """An uninterrupted two-process run, started with the work-dir race widened (SLOW_START)."""
    w = tmp_path_factory.mktemp("two") / "w"
    results = wait(launch(w, env=SLOW_START))
    assert [r for r, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    return Workdir(str(w))


def rows(w, name):
    return w.rows(1, name)


def test_two_processes_equal_one_and_a_dead_host_stops_both(tmp_path, two):
    ref = run("soft_plus.py", tmp_path / "ref", *EXTRA)
    assert rows(two, "prompts.jsonl") == rows(ref, "prompts.jsonl")
    assert [g["raw"] for g in rows(two, "generations.jsonl")] == [g["raw"] for g in rows(ref, "generations.jsonl")]
    a, b = rows(two, "train.jsonl"), rows(ref, "train.jsonl")
    assert [r["prompt_id"] for r in a] == [r["prompt_id"] for r in b]
    np.testing.assert_allclose([r["difficulty"] for r in a], [r["difficulty"] for r in b], rtol=1e-5)
    from soft_jax.models import presets

    base = presets.load_preset("tiny", seed=0)[0]
    # two processes vs one: float32 reductions in another order, nothing more. Where a gradient entry is near
    # Adam's eps its first update g / (|g| + eps) amplifies that order (tests/training/test_trainer.py measures it): a
    # few elements (at most 0.1% of a leaf) may differ by up to lr / 4; a lost, repeated or wrong step moves
    # nearly every element by ~lr (1e-3 here)
    FEW = dict(rtol=1e-5, atol=1e-6, few=1e-3, few_atol=2.5e-4)
    pa, pb = round_params(two, base), round_params(ref, base)
    assert_params_close(pa["round 1"], pb["round 1"], what="round 1, two processes vs one: ", **FEW)
    va, vb = (json.load(open(os.path.join(x.path, "rounds", "001", "eval.json")))["validation"]["value"]
              for x in (two, ref))
    np.testing.assert_allclose(va, vb, rtol=1e-5)

    # process 1 dies (SIGKILL) after training step 2: process 0 must stop too, and a restart resumes
    k = tmp_path / "killed"
    start = time.time()
    results = wait(launch(k, env=({}, {"SOFT_JAX_KILL_AT": "train_step_2"})), timeout=300)
    assert results[1][0] == -signal.SIGKILL and results[0][0] != 0, results[0][1][-2000:]
    assert time.time() - start < 300
    results = wait(launch(k))
    assert [r for r, _ in results] == [0, 0], results[0][1][-3000:]
    resumed = Workdir(str(k))
    assert [g["raw"] for g in rows(resumed, "generations.jsonl")] == [g["raw"] for g in rows(two, "generations.jsonl")]
    assert_params_close(round_params(resumed, base)["round 1"], pa["round 1"], what="round 1, resumed after a dead "
                        "host: ", **FEW)


# One SOFT round on the tiny model, greedy; the generation and train batches divide data x fsdp = 4.
# Two epochs of 2 steps, the first a warmup step at learning rate 0. Adam's first update is g / (|g| + eps): on the
# few gradient entries of size ~eps (1e-8), float32 reduction-order noise (~1e-9 there, 1e-7 of the tensor's
# largest entry) changes the update by ~1e-2, so a full-rate first step leaves parameter differences of ~5e-6.
# After it, v also holds the later steps' (larger) gradients and the update is well conditioned.
MESH_RUN = ["rounds=1", "prompts.per_round=8", "sampling.temperature=0.0", "sampling.batch_size=4",
            "sampling.max_new_tokens=8", "train.batch_size=4", "train.epochs=2", "train.warmup_ratio=0.25",
            "train.checkpoint_every=0", "open_ended.limit=0", "validation.batch_size=8", "progress=false",
            "filters.max_repeated_ngram_fraction=1.0", "filters.max_line_repeats=100000", "filters.min_words=0",
            "filters.max_compression_ratio=1e9"]


def run_devices(workdir, devices, extra=()):
    """`soft-jax run` of configs/tiny.py in a subprocess that sees `devices` CPU devices."""
    env = subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    argv = [sys.executable, "-m", "soft_jax.cli", "run", "--config", os.path.join(CONFIGS, "tiny.py"),
            "--workdir", str(workdir)] + [f"--config.{o}" for o in MESH_RUN + list(extra)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, Workdir(str(workdir))


def flat_params(w: Workdir | None, t: int = 0) -> dict:
    """Round t's saved parameters (the base model's when w is None), path -> numpy array on one device."""
    from flax import nnx

    from soft_jax.models import presets
    from soft_jax.training.checkpoints import StepCheckpointer

    state = nnx.state(presets.load_preset("tiny", seed=0)[0])
    if w is not None:
        ckpt = StepCheckpointer(os.path.join(w.path, "checkpoints", "rounds"), every=0, keep=None)
        state = ckpt.restore(t, state)[0]
        ckpt.close()
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("meshes", [
    ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    # training FSDP over the 8 devices, generation and scoring tensor-parallel (weights resharded between them);
    # 4 epochs of one batch of 8: a first warmup step at learning rate 0, as the 2x2x2 run has (see MESH_RUN)
    ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "mesh_generate.data=2", "mesh_generate.fsdp=1",
     "mesh_generate.tensor=4", "train.batch_size=8", "train.epochs=4", "sampling.batch_size=4"],
], ids=["2x2x2", "train_1x8x1-generate_2x1x4"])
def test_round_on_8_device_mesh_equals_one_device(tmp_path, meshes):
    """On 8 CPU devices, a tiny-model SOFT round produces the same greedy generations, training data and
    validation score, and allclose parameters, as one device: on a (2, 2, 2) mesh (data, fsdp, tensor), and
    training on (1, 8, 1) while generating and scoring on (2, 1, 4)."""
    mesh_proc, mesh = run_devices(tmp_path / "mesh", 8, meshes)
    one_proc, one = run_devices(tmp_path / "one", 1, [o for o in meshes if o.startswith("train.")])
    assert "8 device(s)" in mesh_proc.stdout and "1 device(s)" in one_proc.stdout, mesh_proc.stdout + one_proc.stdout
    assert mesh.rows(1, "prompts.jsonl") == one.rows(1, "prompts.jsonl")
    gm, go = mesh.rows(1, "generations.jsonl"), one.rows(1, "generations.jsonl")
    assert [g["raw"] for g in gm] == [g["raw"] for g in go]
    assert [g["kept"] for g in gm] == [g["kept"] for g in go] and any(g["kept"] for g in gm)
    a, b = mesh.rows(1, "train.jsonl"), one.rows(1, "train.jsonl")
    assert [(r["prompt_id"], r["prompt"], r["response"]) for r in a] == [
        (r["prompt_id"], r["prompt"], r["response"]) for r in b]
    np.testing.assert_allclose([r["difficulty"] for r in a], [r["difficulty"] for r in b], rtol=1e-5)
    assert mesh.event(1, "train_done")["steps"] == one.event(1, "train_done")["steps"] > 0
    for t in (0, 1):  # the base model's validation score and round 1's
        va, vb = (json.load(open(os.path.join(x.path, "rounds", f"{t:03d}", "eval.json")))["validation"]["value"]
                  for x in (mesh, one))
        np.testing.assert_allclose(va, vb, rtol=1e-5)
    pm, po, base = flat_params(mesh, 1), flat_params(one, 1), flat_params(None)
    assert sorted(pm) == sorted(po) == sorted(base)
    assert min(np.abs(po[k] - base[k]).max() for k in po) > 1e-4  # training moved every tensor
    if "mesh.fsdp=8" in meshes:
        # Training FSDP over 8 devices sums each gradient in yet another order; one element of o_proj (rel. 1.2e-4)
        # lands near Adam's eps and differs by 1.3e-6 after 4 steps. The same run without mesh_generate differs
        # in that same element by the same amount, so it is training's, not generation's: the few-elements
        # criterion of the two-process test, for the same reason
        assert_params_close(pm, po, rtol=1e-5, atol=1e-6, few=1e-3, few_atol=2.5e-4, what="8 devices vs one: ")
        return
    for key in po:
        np.testing.assert_allclose(pm[key], po[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_sigterm_on_one_host_stops_both_after_the_same_step(tmp_path, two):
    """Only process 1 receives SIGTERM (after training step 2): both agree at that step's safe point, save it,
    say where they stopped and exit 143; rerunning resumes to the uninterrupted run's parameters."""
    w = tmp_path / "w"
    results = wait(launch(w, env=({}, {"SOFT_JAX_TERM_AT": "train_step_2"})), timeout=300)
    assert [r for r, _ in results] == [143, 143], results[0][1][-2000:] + results[1][1][-2000:]
    last = [err.strip().splitlines()[-1] for _, err in results]
    assert last[0] == last[1] and last[0].startswith("soft-jax: stopped by SIGTERM after training step 2;"), last
    assert os.path.isdir(w / "checkpoints" / "train" / "001" / "2")
    results = wait(launch(w))
    assert [r for r, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    resumed = Workdir(str(w))
    steps = [m["step"] for m in resumed.metrics if m["phase"] == "train"]
    assert steps == [m["step"] for m in two.metrics if m["phase"] == "train"]  # each step once
    pr, pt = flat_params(resumed, 1), flat_params(two, 1)
    assert sorted(pr) == sorted(pt)
    for key in pt:
        np.testing.assert_allclose(pr[key], pt[key], rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.slow  # two CLI processes and a one-process run, each evaluating lm-eval tasks at rounds 0 and 1
def test_lm_eval_in_a_two_process_run_equals_one_process(tmp_path, monkeypatch):
    """eval.lm_eval in a two-process run, scoring and generating tensor-parallel over both processes' devices:
    every process answers every request and process 0 writes. Each round's lm-eval metrics and every item (its
    decision, its log-likelihoods, its generation) equal a one-process run's."""
    from helpers import lm_eval_tasks

    (tmp_path / "tasks").mkdir()
    include = lm_eval_tasks(tmp_path / "tasks")
    lm = ["eval.lm_eval.tasks=softjax_mc,softjax_gen", f"eval.lm_eval.include={include}", "eval.lm_eval.limit=4",
          "eval.lm_eval.batch_size=4"]
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    results = wait(launch(tmp_path / "two", lm, env=(env, env)))
    assert [r for r, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    one = run("soft_plus.py", tmp_path / "one", *EXTRA, *lm)
    two = Workdir(str(tmp_path / "two"))

    def close(a, b, where):
        if isinstance(a, float) and isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5), where
        elif isinstance(a, dict) and isinstance(b, dict):
            assert set(a) == set(b), where
            for k in a:
                close(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list) and isinstance(b, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                close(x, y, f"{where}[{i}]")
        else:
            assert a == b, where

    for t in (0, 1):
        ev = [json.load(open(os.path.join(w.path, "rounds", f"{t:03d}", "eval.json"))) for w in (two, one)]
        assert set(ev[0]["lm_eval"]) == {"softjax_mc", "softjax_gen"}
        close(ev[0]["lm_eval"], ev[1]["lm_eval"], f"round {t} lm_eval")
        items = [[json.loads(line) for line in open(os.path.join(w.path, "rounds", f"{t:03d}", "lm_eval_items.jsonl"))]
                 for w in (two, one)]
        assert len(items[0]) == 8
        close(items[0], items[1], f"round {t} items")
