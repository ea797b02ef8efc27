"""The SOFT / SOFT+ loop end to end on a tiny random model: every config, determinism, resume, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import (
    CONFIGS,
    TINY_OVERRIDES,
    Workdir,
    assert_params_close,
    check_common,
    config,
    one_line_error,
    params_differ,
    round_params,
    run,
)

from soft_jax import training
from soft_jax.core.errors import UserError
from soft_jax.experiment import workdir
from soft_jax.rounds import loop, selfalign

pytestmark = pytest.mark.e2e  # whole runs, CLI processes, killed and restarted runs (conftest.py)


@pytest.fixture
def models_used(monkeypatch):
    """{"generator": [...], "start": [...]}: the parameters of the model each round generated with and trained
    from, in round order, captured as the run hands them over."""
    used = {"generator": [], "start": []}
    generate, train = selfalign.generate, training.train

    def spy_generate(run, t, generator, *args, **kwargs):
        used["generator"].append(jax.device_get(nnx.state(generator, nnx.Param)))
        return generate(run, t, generator, *args, **kwargs)

    def spy_train(model, *args, **kwargs):
        used["start"].append(jax.device_get(nnx.state(model, nnx.Param)))
        return train(model, *args, **kwargs)

    monkeypatch.setattr(selfalign, "generate", spy_generate)
    monkeypatch.setattr(training, "train", spy_train)
    return used


def by_category(w: Workdir, t: int) -> dict:
    """category -> the pool difficulty (curriculum.json) of round t's prompts of that category."""
    pool = json.load(open(os.path.join(w.path, "curriculum.json")))["difficulty"]
    out: dict = {}
    for r in w.rows(t, "prompts.jsonl"):
        out.setdefault(r["category"], []).append(pool[r["prompt_id"]])
    return out


def assert_easy_to_hard_within_categories(w: Workdir, reverse: bool = False):
    """Round 1's prompts of each category are easier (harder with reverse) than round 2's of that category."""
    r1, r2 = by_category(w, 1), by_category(w, 2)
    assert set(r1) & set(r2), "no category appears in both rounds: nothing to compare"
    for cat in set(r1) & set(r2):
        early, late = (r1[cat], r2[cat]) if not reverse else (r2[cat], r1[cat])
        assert max(early) <= min(late), (cat, r1[cat], r2[cat])


def test_soft_plus_orders_easy_to_hard_and_steps_on_feet(tmp_path, tiny_base, models_used):
    w = run("soft_plus.py", tmp_path / "w", "prompts.per_round=16")  # 2 of each of the 8 categories a round
    check_common(w, 2, 16)
    for t in (1, 2):
        d = [r["difficulty"] for r in w.rows(t, "train.jsonl")]
        assert d == sorted(d), "within-round order is not easy to hard"
    assert_easy_to_hard_within_categories(w)
    p = round_params(w, tiny_base)
    assert_params_close(models_used["generator"][0], p["base"], what="round 1's generator")
    assert_params_close(models_used["generator"][1], p["round 1"], what="round 2's generator")  # the previous model
    assert_params_close(models_used["start"][0], p["base"], what="round 1's start")
    assert_params_close(models_used["start"][1], p["round 1"], what="round 2's start")  # is trained further
    assert params_differ(p["round 1"], p["base"]) and params_differ(p["round 2"], p["round 1"])
    assert params_differ(p["round 2"], p["base"])
    report = os.path.join(w.path, "report")
    assert {"summary.md", "eval_per_round.png", "filters_per_round.png", "difficulty_per_round.png",
            "train_loss.png"} <= set(os.listdir(report))
    summary = open(os.path.join(report, "summary.md")).read()
    assert "| 2 | 16 | 16 | 0 |" in summary and "## Round 2: sample kept training pairs" in summary


@pytest.mark.parametrize("name,extra,check", [
    ("soft.py", (), "random_order"),
    ("single_round.py", ("rounds=1", "prompts.per_round=0", "prompts.path=SMALL_POOL"), "single"),
    ("ablation_exemplars.py:fixed", (), "fixed"),
    ("ablation_sft_start.py:reinit", (), "reinit"),
    ("ablation_order.py:hard_to_easy", ("prompts.per_round=16",), "hard_to_easy"),
    ("ablation_generator.py:base", (), "generator_base"),
])
def test_configs_do_what_they_say(tmp_path, tiny_base, models_used, name, extra, check):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(6)))
    extra = tuple(e.replace("SMALL_POOL", str(pool)) for e in extra)
    c = config(name, *extra)
    w = run(name, tmp_path / "w", *extra)
    if check == "single":
        assert c.exemplars.strategy == "fixed" and c.rounds == 1
        check_common(w, 1, 6)  # the whole pool in one round
    else:
        check_common(w, 2, c.prompts.per_round)
    p = round_params(w, tiny_base)
    gens = [g for t in range(1, c.rounds + 1) for g in w.rows(t, "generations.jsonl")]
    if check in ("fixed", "single"):  # the set config.json records, chosen by principle coverage
        assert {tuple(g["exemplar_ids"]) for g in gens} == {tuple(w.config["exemplars"]["fixed_ids"])}
        assert len(w.config["exemplars"]["fixed_ids"]) == c.exemplars.k
    else:  # random exemplars: each prompt draws its own
        for t in range(1, c.rounds + 1):
            assert len({tuple(g["exemplar_ids"]) for g in w.rows(t, "generations.jsonl")}) > 1
    if check == "reinit":
        assert_params_close(models_used["start"][1], p["base"], what="round 2's start")
        assert_params_close(models_used["generator"][1], p["round 1"], what="round 2's generator")
    if check == "generator_base":
        assert_params_close(models_used["generator"][1], p["base"], what="round 2's generator")
        assert_params_close(models_used["start"][1], p["round 1"], what="round 2's start")
    if check == "hard_to_easy":
        for t in (1, 2):
            d = [r["difficulty"] for r in w.rows(t, "train.jsonl")]
            assert d == sorted(d, reverse=True)
        assert_easy_to_hard_within_categories(w, reverse=True)  # across rounds too: hardest prompts first
    if check == "random_order":
        orders = [[r["difficulty"] for r in w.rows(t, "train.jsonl")] for t in (1, 2)]
        assert any(o != sorted(o) for o in orders), "random order came out sorted in every round"


def test_collapse_guard_stops_and_keeps_the_best_round(tmp_path, tiny_base):
    # A huge learning rate wrecks the model: the validation loss rises after round 1, the guard stops.
    w = run("soft_plus.py", tmp_path / "w", "rounds=3", "train.learning_rate=0.5")
    assert w.state["stopped"] and "collapse guard" in w.state["stopped"]
    assert w.state["finished"] == [1]
    assert w.state["best_round"] == 0 and w.state["scores"]["1"] > w.state["scores"]["0"]
    model, _ = loop.best_model(w.path)
    assert_params_close(model, tiny_base, what="the kept model (round 0, the base)")


def test_collapse_guard_keeps_a_later_best_round(tmp_path):
    # confidence 0: the point estimates decide; the validation loss falls in both rounds, so round 2 is best
    w = run("soft_plus.py", tmp_path / "w", "validation.patience=2", "validation.confidence=0")
    scores = w.state["scores"]
    assert scores["2"] < scores["1"] < scores["0"]
    assert w.state["best_round"] == 2 and not w.state["stopped"]
    assert [w.state["comparisons"][t]["verdict"] for t in ("1", "2")] == ["better", "better"]


def test_forced_answers_follow_the_thoughts_after_the_marker(tmp_path):
    """sampling.force_answer: thoughts that end without the answer marker get it written after them and an
    answer sampled in the same KV cache (sampler.Sampler's continue_with); the row says so, parses into those
    thoughts and that answer, and the answer's own stop reason is the row's."""
    from soft_jax.data import templates

    w = run("soft_plus.py", tmp_path / "w", "rounds=1", "sampling.force_answer=true", "filters.require_marker=true")
    gens = w.rows(1, "generations.jsonl")
    forced = [g for g in gens if g["forced_answer"]]
    assert len(forced) == len(gens) == 4  # a random tiny model does not write the marker itself
    for g in forced:
        thoughts, answer = g["raw"].split(f"\n\n{templates.ANSWER}", 1)
        assert thoughts == thoughts.rstrip() and templates.parse(g["raw"])[0] == thoughts.strip() == g["thoughts"]
        assert g["answer"] is not None and answer.strip().startswith(g["answer"].strip())
        assert g["finish"] in ("eos", "stop", "length")


def assert_numbers_close(got, want, where: str, rel: float = 1e-6, abs_: float = 1e-5):
    """Equal JSON trees, floats to `rel` or `abs_`: the scores are mean NLLs of about 10 nats, which float32
    carries to about 1e-6 (its epsilon x 10), so a difference of two of them is only that close absolutely."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_numbers_close(got[k], want[k], f"{where}/{k}", rel, abs_)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_numbers_close(g, w, f"{where}[{i}]", rel, abs_)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel, abs=abs_), where
    else:
        assert got == want, where


def test_same_config_and_seed_give_identical_round_files(tmp_path):
    """Run b stores its layers stacked and runs them as one scan (model.scan_layers): prefill, decode, scoring
    and training all scanned, round checkpoints in that layout. It writes the same prompts, tokens, draws and
    kept data; the scores of a trained model (validation, the guard's state) and its best round's weights, layer
    by layer, equal a's to float32 rounding: the scan sums in another order."""
    from soft_jax.models import weights

    a = run("soft_plus.py", tmp_path / "a").files()
    b = run("soft_plus.py", tmp_path / "b", "model.scan_layers=true").files()
    assert a.keys() == b.keys() and len(a) > 10
    scores = {"state.json"} | {k for k in a if k.startswith("rounds/") and k.endswith("eval.json")}
    for k in a:
        if k in scores:
            assert_numbers_close(json.loads(b[k]), json.loads(a[k]), k)
        elif k != "config.json":
            assert a[k] == b[k], k
    best = [loop.best_model(str(tmp_path / w))[0] for w in "ab"]
    assert isinstance(best[1].layers, nnx.List) is False and json.loads(a["state.json"])["best_round"]
    want, got = (weights.hf_tensors(m) for m in best)
    assert sorted(want) == sorted(got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    c = run("soft_plus.py", tmp_path / "c", "seed=1").files()
    assert c["rounds/001/prompts.jsonl"] != a["rounds/001/prompts.jsonl"] or \
        c["rounds/001/generations.jsonl"] != a["rounds/001/generations.jsonl"]


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    tiny = ["run", "--config", os.path.join(CONFIGS, "tiny.py")]
    err = one_line_error(capsys, tiny + ["--workdir", str(tmp_path / "a"), "--config.train.lr=1"])
    assert "unknown config key" in err and "learning_rate" in err
    err = one_line_error(capsys, tiny + ["--workdir", str(tmp_path / "a"), "--config.rounds=40"])
    assert "244" in err and "prompts" in err
    err = one_line_error(capsys, tiny + ["--workdir", str(tmp_path / "a"), "--config.rounds=two"])
    assert "rounds" in err
    bad = tmp_path / "ex.jsonl"
    bad.write_text('{"prompt": "a", "thoughts": "b", "answer": "c"}\n{"prompt": "x", "thoughts": \n')
    err = one_line_error(capsys, tiny + ["--workdir", str(tmp_path / "a"), f"--config.exemplars.path={bad}"])
    assert f"{bad}:2" in err
    assert not os.path.exists(tmp_path / "a"), "a refused run must not create its work dir"
    err = one_line_error(capsys, ["run", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "b")])
    assert "no such config file" in err


def test_workdir_of_another_config_is_refused(tmp_path, capsys):
    w = tmp_path / "w"
    run("tiny.py", w, "rounds=1")
    before = {k: v for k, v in Workdir(str(w)).files().items()}
    err = one_line_error(capsys, ["run", "--config", os.path.join(CONFIGS, "tiny.py"), "--workdir", str(w),
                                  *[f"--config.{o}" for o in TINY_OVERRIDES], "--config.rounds=1", "--config.seed=7"])
    assert "another config" in err and "seed" in err
    assert Workdir(str(w)).files() == before


def test_prompt_pool_from_a_tfds_dataset(tmp_path):
    from soft_jax.data import tfds

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me fact {i}."}) + "\n" for i in range(5)))
    tfds.build_prompt_dataset(str(pool), str(tmp_path / "tfds"), name="my_prompts")
    w = run("tiny.py", tmp_path / "w", "rounds=1", "prompts.per_round=0", "prompts.tfds=my_prompts",
            f"prompts.tfds_data_dir={tmp_path / 'tfds'}")
    assert sorted(r["prompt_id"] for r in w.rows(1, "prompts.jsonl")) == [f"q{i}" for i in range(5)]
    assert {r["prompt"] for r in w.rows(1, "generations.jsonl")} == {f"Tell me fact {i}." for i in range(5)}


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path, capsys):
    w = tmp_path / "w"
    os.makedirs(w)
    holder = workdir.lock(str(w))
    try:
        err = one_line_error(capsys, ["run", "--config", os.path.join(CONFIGS, "tiny.py"), "--workdir", str(w)])
        assert f"another soft-jax run (pid {os.getpid()})" in err
    finally:
        holder.close()
    assert os.listdir(w) == [".lock"]


def test_a_run_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    from soft_jax.scale import memory

    monkeypatch.setattr(memory, "device_memory", lambda: 64 * 2**20)  # a 64 MiB device: the compiler is asked
    with pytest.raises(UserError, match=r"train_step needs .* GiB per device \(compiled\), more than the 64.0 MiB "
                                        r"a device has; set model.scan_layers=true"):
        loop.Run(config("tiny.py", "train.batch_size=64", "train.max_prompt_len=1024"), str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w")


def test_per_round_eval_tasks_and_open_ended_answers(tmp_path, inhouse_bigbench):
    w = run("tiny.py", tmp_path / "w", "rounds=1", "eval.tasks=hhh,truthfulqa_mc1", "eval.limit=8",
            "open_ended.limit=3", "validation.metric=truthfulqa_mc2", "validation.limit=4")
    for t in (0, 1):
        ev = json.load(open(os.path.join(w.path, "rounds", f"{t:03d}", "eval.json")))
        assert ev["protocol"] == "dromedary" and ev["validation"]["metric"] == "truthfulqa_mc2"
        assert ev["validation"]["n"] == 4 and 0 <= ev["validation"]["value"] <= 1
        assert ev["tasks"]["hhh"]["n"] == 8 and ev["tasks"]["truthfulqa_mc1"]["n"] == 8
        assert {"harmless", "helpful", "honest", "other"} <= set(ev["tasks"]["hhh"])
        assert len(w.rows(t, "open_ended.jsonl")) == 3
        event = w.event(t, "eval")
        assert event["hhh"] == ev["tasks"]["hhh"]["accuracy"] and event["truthfulqa_mc2"] == ev["validation"]["value"]
    summary = open(os.path.join(w.path, "report", "summary.md")).read()
    assert "| truthfulqa_mc2 | vs best [interval] | hhh (dromedary) | truthfulqa_mc1 (dromedary) |" in summary
    assert "sample open-ended answers" in summary


def test_mesh_problems_are_refused_up_front(tmp_path):
    code = ("import sys; from soft_jax.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    base = [sys.executable, "-c", code, "run", "--config", os.path.join(CONFIGS, "tiny.py")]
    for extra, needle in ((["--config.mesh.data=3"], "does not divide the 4 devices"),
                          (["--config.sampling.batch_size=6"], "sampling.batch_size = 6 is not divisible")):
        p = subprocess.run(base + ["--workdir", str(tmp_path / "w")] + extra, capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 2 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not os.path.exists(tmp_path / "w")
