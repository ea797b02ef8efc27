"""`soft-jax sweep`: every variant of an ablation config, each as its own `run` would be, round 0 evaluated once."""

import json
import os
import signal

import pytest
from helpers import CONFIGS, TINY_OVERRIDES, Workdir, one_line_error, run

from soft_jax import training
from soft_jax.cli import main
from soft_jax.core import faults
from soft_jax.experiment import config as config_lib
from soft_jax.rounds import round_eval, sweep

pytestmark = pytest.mark.e2e  # whole runs, CLI processes, killed and restarted runs (conftest.py)

ORDER = os.path.join(CONFIGS, "ablation_order.py")


@pytest.fixture
def calls(monkeypatch):
    """{"eval": [t, ...], "train": n}: the rounds round_eval.evaluate ran for, and how often training ran."""
    seen = {"eval": [], "train": 0}
    evaluate, train = round_eval.evaluate, training.train

    def spy_evaluate(run_, t, *args, **kwargs):
        seen["eval"].append(t)
        return evaluate(run_, t, *args, **kwargs)

    def spy_train(*args, **kwargs):
        seen["train"] += 1
        return train(*args, **kwargs)

    monkeypatch.setattr(round_eval, "evaluate", spy_evaluate)
    monkeypatch.setattr(training, "train", spy_train)
    return seen


@pytest.fixture
def signal_handlers():
    """`main` installs the stop handlers in this process; put the previous ones back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def sweep_argv(root, *extra):
    return ["sweep", "--config", ORDER, "--workdir", str(root), *[f"--config.{o}" for o in TINY_OVERRIDES],
            "--config.rounds=1", *extra]  # after TINY_OVERRIDES: a later override wins


def test_sweep_equals_individual_runs_shares_round_0_and_resumes(tmp_path, calls, monkeypatch, capsys,
                                                                  signal_handlers):
    root = tmp_path / "sweep"
    # run in the file's order (easy_to_hard first); with open-ended answers, which round 0 shares too
    argv = sweep_argv(root, "--only", "random,easy_to_hard", "--config.open_ended.limit=2")
    trained = []

    def term_in_second_variant(name):  # a preemption notice while the second variant trains its round 1
        if name == "trained_r1":
            trained.append(name)
            if len(trained) == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(faults, "point", term_in_second_variant)
    assert main(argv) == 143
    out, err = capsys.readouterr()
    assert "resume with: soft-jax sweep --config" in err.strip().splitlines()[-1]
    assert "variant 1/2 easy_to_hard" in out and "variant 2/2 random" in out
    assert "round 0 shared from easy_to_hard" in out
    rows = [line.split() for line in out.splitlines()
            if line.startswith("[sweep]") and line.split()[1] in ("easy_to_hard", "random")]
    # variant, state, finished rounds: each run's own (a fresh run's state shares no list with an earlier run's)
    assert {r[1]: r[2:4] for r in rows} == {"easy_to_hard": ["done", "1"], "random": ["stopped", "-"]}
    assert "redoing" not in out  # the second variant did not take the first one's rounds for its own
    assert calls["eval"] == [0, 1] and calls["train"] == 2  # the second variant's round 0 was not evaluated

    # the rerun skips the finished variant and resumes the stopped one past its saved training
    monkeypatch.setattr(faults, "point", lambda name: None)
    calls["eval"].clear()
    calls["train"] = 0
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "easy_to_hard: already finished" in out and "variant 2/2 random" in out
    assert calls["eval"] == [1] and calls["train"] == 0
    assert f"soft-jax compare {root / 'easy_to_hard'} {root / 'random'}" in out
    assert main(argv) == 0  # nothing left: both skipped
    assert calls["eval"] == [1] and calls["train"] == 0
    assert capsys.readouterr().out.count("already finished") == 2

    # each variant's work dir is what its own `soft-jax run` writes; round 0 is the same evaluation
    calls["eval"].clear()
    for name in ("easy_to_hard", "random"):
        alone = run(f"ablation_order.py:{name}", tmp_path / f"alone_{name}", "rounds=1", "open_ended.limit=2")
        swept = Workdir(str(root / name))
        a, b = alone.files(), swept.files()
        assert a.keys() == b.keys() and {"rounds/000/eval.json", "rounds/000/open_ended.jsonl"} <= a.keys()
        for k in a:
            assert a[k] == b[k], (name, k)
        strip = lambda m: {k: v for k, v in m.items() if k != "seconds"}
        assert strip(alone.event(0, "eval")) == strip(swept.event(0, "eval"))
    assert calls["eval"] == [0, 1, 0, 1]  # alone, each evaluates its own round 0
    shared = Workdir(str(root / "random")).event(0, "round0_shared")
    assert shared["from"] == "easy_to_hard"
    assert not any(m["phase"] == "round0_shared" for m in Workdir(str(root / "easy_to_hard")).metrics)


def test_round_0_is_evaluated_per_variant_when_the_base_model_differs(tmp_path, calls, capsys, signal_handlers):
    cfg = tmp_path / "seeds.py"  # the tiny model's weights come from the seed: another seed, another base model
    cfg.write_text("from soft_jax.experiment.config import load_file\n\nVARIANTS = ('s0', 's1')\n\n\n"
                   "def get_config(arg='s0'):\n"
                   f"    c = load_file({os.path.join(CONFIGS, 'tiny.py')!r})\n"
                   "    c.seed = int((arg or 's0')[1:])\n    return c\n")
    argv = ["sweep", "--config", str(cfg), "--workdir", str(tmp_path / "s"), *[f"--config.{o}" for o in TINY_OVERRIDES],
            "--config.rounds=1"]
    assert main(argv) == 0
    assert calls["eval"] == [0, 1, 0, 1]
    assert "shared" not in capsys.readouterr().out
    assert not any(m["phase"] == "round0_shared" for m in Workdir(str(tmp_path / "s" / "s1")).metrics)


def test_every_ablation_config_declares_variants_that_share_round_0():
    for name in sorted(os.listdir(CONFIGS)):
        if not name.startswith("ablation_"):
            continue
        path = os.path.join(CONFIGS, name)
        names = config_lib.variants(path)
        assert len(names) >= 2, name
        configs = [config_lib.to_dict(config_lib.load(f"{path}:{v}", TINY_OVERRIDES)) for v in names]
        assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(names), f"{name}: variants coincide"
        assert all(sweep.round0_settings(c) == sweep.round0_settings(configs[0]) for c in configs), name
    soft = config_lib.to_dict(config_lib.load(os.path.join(CONFIGS, "soft.py"), TINY_OVERRIDES))
    for key, value in (("seed", 1), ("validation.path", "v.jsonl"), ("eval.limit", 5), ("open_ended.limit", 3),
                       ("model.dtype", "bfloat16"), ("train.max_response_len", 32)):
        changed = json.loads(json.dumps(soft))
        *parents, leaf = key.split(".")
        node = changed
        for p in parents:
            node = node[p]
        node[leaf] = value
        assert sweep.round0_settings(changed) != sweep.round0_settings(soft), key
    for key, value in (("validation.patience", 3), ("curriculum.order", "hard_to_easy"), ("generator", "base")):
        changed = json.loads(json.dumps(soft))
        *parents, leaf = key.split(".")
        (changed[parents[0]] if parents else changed)[leaf] = value
        assert sweep.round0_settings(changed) == sweep.round0_settings(soft), key


def test_bad_sweeps_exit_2_with_one_line(tmp_path, capsys):
    root = tmp_path / "s"
    err = one_line_error(capsys, ["sweep", "--config", os.path.join(CONFIGS, "soft.py"), "--workdir", str(root)])
    assert "declares no variants" in err and "VARIANTS" in err
    err = one_line_error(capsys, sweep_argv(root, "--only", "easy_to_hard,sideways"))
    assert "unknown variant 'sideways'" in err and "easy_to_hard, hard_to_easy, random" in err
    err = one_line_error(capsys, ["sweep", "--config", ORDER + ":random", "--workdir", str(root)])
    assert "without :ARG" in err
    err = one_line_error(capsys, sweep_argv(root, "--config.rounds=two"))
    assert "rounds" in err
    assert not os.path.exists(root)
