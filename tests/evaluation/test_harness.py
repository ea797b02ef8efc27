"""lm-evaluation-harness on the JAX model (soft_jax.evaluation.harness) against lm-eval's own HFLM on PyTorch, the
same SmolLM2-135M weights in float32, item by item, on three tasks written in-house in lm-eval's format
(tests/fixtures/lm_eval): multiple choice (loglikelihood), a generate_until task with exact match, and a rolling
log-likelihood (perplexity) task."""

import os

import numpy as np
import pytest
from helpers import lm_eval_tasks

TASKS = ["softjax_mc", "softjax_gen", "softjax_ppl"]


def evaluate(lm, include: str, limit=None, tasks=TASKS) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=include),
                                   log_samples=True, limit=limit, random_seed=0, numpy_random_seed=0,
                                   torch_random_seed=0, fewshot_random_seed=0)


def by_doc(result: dict, task: str) -> dict:
    return {s["doc_id"]: s for s in result["samples"][task]}


@pytest.fixture(scope="module")
def hflm_result(smollm2_hf, smollm2_tokenizer, tmp_path_factory):
    from lm_eval.models.huggingface import HFLM

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    include = lm_eval_tasks(tmp_path_factory.mktemp("tasks"))
    return include, evaluate(HFLM(pretrained=smollm2_hf, tokenizer=smollm2_tokenizer, batch_size=8, device="cpu"),
                             include)


# slow: SmolLM2 on both sides, about a minute each; the requests on a tiny model run by default (the last test)
@pytest.mark.slow
def test_every_item_matches_lm_evals_hflm(smollm2, hflm_result):
    from soft_jax.evaluation.harness import SoftJaxLM

    include, ref = hflm_result
    ours = evaluate(SoftJaxLM(*smollm2, batch_size=8), include)
    # multiple choice: each choice's log-likelihood within 1e-3, the same is_greedy and the same decision
    for doc, want in by_doc(ref, "softjax_mc").items():
        got = by_doc(ours, "softjax_mc")[doc]
        a, b = [r[0] for r in got["filtered_resps"]], [r[0] for r in want["filtered_resps"]]
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), atol=1e-3, err_msg=str(doc))
        assert [r[1] for r in got["filtered_resps"]] == [r[1] for r in want["filtered_resps"]], doc
        assert (got["acc"], got["acc_norm"]) == (want["acc"], want["acc_norm"]), doc
    # generation: identical greedy text, the same exact match
    for doc, want in by_doc(ref, "softjax_gen").items():
        got = by_doc(ours, "softjax_gen")[doc]
        assert got["filtered_resps"] == want["filtered_resps"] and got["exact_match"] == want["exact_match"], doc
    # rolling log-likelihood of whole documents
    for doc, want in by_doc(ref, "softjax_ppl").items():
        got = by_doc(ours, "softjax_ppl")[doc]
        assert got["filtered_resps"][0] == pytest.approx(want["filtered_resps"][0], abs=1e-3), doc
    for task, metrics in ref["results"].items():
        for key, value in metrics.items():
            if key.split(",")[0] in ("acc", "acc_norm", "exact_match"):
                assert ours["results"][task][key] == value, (task, key)
            elif key.split(",")[0] in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)
    assert ours["results"]["softjax_mc"]["acc,none"] > 0.5  # the task measures something: chance is 0.25


@pytest.mark.slow
def test_a_wrong_token_boundary_breaks_parity(smollm2, hflm_result):
    """The continuation's first token scored as part of the context (what a naive split does): the
    log-likelihoods leave HFLM's by far more than the tolerance."""
    from soft_jax.evaluation.harness import SoftJaxLM

    class FirstTokenInContext(SoftJaxLM):
        def _encode_pair(self, context, continuation):
            ctx, cont = super()._encode_pair(context, continuation)
            return ctx + cont[:1], cont[1:] or cont

    include, ref = hflm_result
    ours = evaluate(FirstTokenInContext(*smollm2, batch_size=8), include, limit=4, tasks=["softjax_mc"])
    gaps = [abs(got["filtered_resps"][i][0] - want["filtered_resps"][i][0])
            for doc, want in by_doc(ref, "softjax_mc").items() if doc < 4
            for got in [by_doc(ours, "softjax_mc")[doc]] for i in range(len(want["filtered_resps"]))]
    assert max(gaps) > 1.0


@pytest.mark.parametrize("kind", ["loglikelihood", "loglikelihood_rolling", "generate_until"])
def test_the_requests_are_answered_as_hflm_answers_them_on_a_tiny_model(tiny_chat, kind):
    """Request by request against HFLM on the same tiny random Llama (an HF directory both load): the pair
    boundaries (trailing whitespace, an empty context), windows longer than max_length, stop sequences and
    max_gen_toks. Not slow: runs by default."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from soft_jax import models
    from soft_jax.evaluation.harness import SoftJaxLM

    model, tok = models.load(tiny_chat, progress=False)
    ours = SoftJaxLM(model, tok, batch_size=4, max_length=48)
    ref = HFLM(pretrained=tiny_chat, batch_size=4, device="cpu", max_length=48, dtype="float32")
    long = " ".join(f"word{i}" for i in range(60))  # past max_length: cut on the left, rolled in windows
    args = {
        "loglikelihood": [("Question: is it?\nAnswer:", " yes"), ("Question: is it?\nAnswer: ", "no"), ("", "Hello"),
                          ("A\n\n", "B C D"), (long, " end")],
        "loglikelihood_rolling": [("One short line.",), (long,)],
        "generate_until": [("Once upon a time", {"until": ["."], "max_gen_toks": 10, "do_sample": False}),
                           ("The list: 1, 2,", {"until": ["\n", "7"], "max_gen_toks": 6}),
                           (long, {"until": [], "max_gen_toks": 5, "temperature": 0.0})],
    }[kind]
    requests = [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]
    got, want = getattr(ours, kind)(requests), getattr(ref, kind)(requests)
    if kind == "generate_until":
        assert got == want
    elif kind == "loglikelihood":
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4)
        assert [g[1] for g in got] == [w[1] for w in want]
    else:
        np.testing.assert_allclose(got, want, atol=1e-3)


@pytest.mark.e2e
def test_a_run_evaluates_its_lm_eval_tasks_every_round_and_a_task_without_data_is_na(tmp_path, monkeypatch):
    """eval.lm_eval on a tiny one-round SOFT+ run: per-task metrics with lm-eval's stderr in eval.json, the metrics
    events and the round table, every item in the round's lm_eval_items.jsonl; a task whose data file is missing
    stops the run before any weights when eval.required, and is n/a otherwise."""
    import json

    from helpers import config, run

    from soft_jax.core.errors import UserError
    from soft_jax.reports import report
    from soft_jax.rounds import loop

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    include = lm_eval_tasks(tmp_path)
    with open(os.path.join(include, "softjax_missing.yaml"), "w") as f:  # the mc task, its data file gone
        f.write(open(os.path.join(include, "softjax_mc.yaml")).read().replace("task: softjax_mc",
                                                                               "task: softjax_missing")
                .replace("mc.jsonl", "absent.jsonl"))
    lm = ["eval.lm_eval.tasks=softjax_mc,softjax_gen,softjax_missing", f"eval.lm_eval.include={include}",
          "eval.lm_eval.limit=3", "eval.lm_eval.batch_size=4", "rounds=1"]
    with pytest.raises(UserError, match="eval.lm_eval.tasks softjax_missing: its data cannot be loaded"):
        loop.Run(config("soft_plus.py", *lm), str(tmp_path / "refused"), log=lambda _: None)
    assert not os.path.exists(tmp_path / "refused")  # refused before the work dir (and any weights)

    # the collapse guard on an lm-eval metric: its per-item values, its task's direction
    with pytest.raises(UserError, match="validation.metric 'lm_eval:softjax_ppl:acc'"):  # not among the tasks
        config("soft_plus.py", *lm, "validation.metric=lm_eval:softjax_ppl:acc")
    w = run("soft_plus.py", tmp_path / "w", *lm, "eval.required=false", "validation.metric=lm_eval:softjax_mc:acc",
            "validation.limit=3")
    for t in (0, 1):
        ev = json.load(open(os.path.join(w.path, "rounds", f"{t:03d}", "eval.json")))
        assert set(ev["lm_eval"]) == {"softjax_mc", "softjax_gen"} and "softjax_missing" in ev["unavailable"]
        mc = ev["lm_eval"]["softjax_mc"]
        assert set(mc["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} and mc["n"] == 3
        assert 0 <= mc["metrics"]["acc"] <= 1 and mc["higher_is_better"]["acc"] is True
        items = [json.loads(x) for x in open(os.path.join(w.path, "rounds", f"{t:03d}", "lm_eval_items.jsonl"))]
        assert sorted((r["task"], r["doc_id"]) for r in items) == sorted(
            (task, d) for task in ("softjax_mc", "softjax_gen") for d in range(3))
        assert np.mean([r["acc"] for r in items if r["task"] == "softjax_mc"]) == pytest.approx(mc["metrics"]["acc"])
        event = w.event(t, "eval")
        assert event["lm_eval/softjax_mc/acc"] == mc["metrics"]["acc"]
        v = ev["validation"]
        assert v["ids"] == [f"softjax_mc/{d}" for d in range(3)] and v["higher"] is True
        assert v["items"] == [r["acc"] for r in sorted(items, key=lambda r: r["doc_id"]) if r["task"] == "softjax_mc"]
        assert event["lm_eval/softjax_gen/exact_match_stderr"] == ev["lm_eval"]["softjax_gen"]["metrics"][
            "exact_match_stderr"]
    assert w.state["comparisons"]["1"]["vs"] == 0  # the guard compared round 1 with round 0 on those items
    table = report.round_table(w.metrics, "lm_eval:softjax_mc:acc")
    head, _, r0, r1 = table.splitlines()[:4]
    assert "| softjax_mc acc |" in head and "| softjax_missing |" in head
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
    cells = dict(zip(split(head), split(r1)))
    assert cells["softjax_missing"] == "n/a" and " ± " in cells["softjax_mc acc"]
    # the report plots lm-eval's metrics; `compare` pairs two runs' lm-eval items by doc_id (a copy: every diff 0)
    import shutil

    from soft_jax.reports import compare

    assert os.path.isfile(os.path.join(report.write(w.path), "eval_per_round.png"))
    shutil.copytree(w.path, tmp_path / "w2")
    out = compare.write([w.path, str(tmp_path / "w2")], str(tmp_path / "cmp"))
    res = json.load(open(os.path.join(out, "compare.json")))
    assert os.path.isfile(os.path.join(out, "softjax_mc_acc.png"))
    by = {m["key"]: m for m in res["metrics"]}
    acc = by["lm_eval/softjax_mc/acc"]
    assert acc["paired"] and [d["diff"] for d in acc["diffs"]["w2"].values()] == [0.0, 0.0]
    assert "lm_eval/softjax_gen/exact_match" in by


@pytest.mark.slow  # four CLI processes, each importing lm-eval's task index: about a minute and a half
def test_the_command_lines(tiny_chat, tmp_path):
    """`soft-jax eval --lm-eval` writes lm-eval's metrics and items; `soft-jax lm-eval` is lm-eval's own command line
    with --model soft-jax; an unknown task and a missing lm-eval are one line, exit 2, before the model loads."""
    import json
    import subprocess
    import sys

    from helpers import run_cli, subprocess_env

    include = lm_eval_tasks(tmp_path)
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = tmp_path / "e.json"
    proc = run_cli("eval", "--model", tiny_chat, "--lm-eval", "softjax_mc", "--lm-eval-include", include, "--limit",
                   "3", "--batch-size", "4", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res) == {"lm_eval", "lm_eval_items"} and res["lm_eval"]["softjax_mc"]["n"] == 3
    assert len(res["lm_eval_items"]) == 3 and "softjax_mc       acc " in proc.stdout
    proc = run_cli("lm-eval", "run", "--model", "soft-jax", "--model_args", f"model={tiny_chat}", "--tasks",
                   "softjax_mc", "--include_path", include, "--limit", "3", "--batch_size", "4", env=env)
    assert proc.returncode == 0 and "|softjax_mc|" in proc.stdout and "acc_norm" in proc.stdout, proc.stderr[-2000:]
    proc = run_cli("eval", "--model", tiny_chat, "--lm-eval", "no_such_task", "--lm-eval-include", include, "--out",
                   str(out), env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown lm-eval task(s) no_such_task" in proc.stderr
    code = "import sys; sys.modules['lm_eval'] = None; from soft_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "eval", "--model", tiny_chat, "--lm-eval", "softjax_mc",
                           "--out", str(out)], capture_output=True, text=True, env=subprocess_env(**env), timeout=300)
    assert proc.returncode == 2 and "pip install 'soft-jax[lm-eval]'" in proc.stderr and proc.stderr.count("\n") == 1


def test_task_yamls_in_a_bucket_are_refused_in_one_line():
    from soft_jax.core.errors import UserError
    from soft_jax.evaluation import harness

    with pytest.raises(UserError, match="^eval.lm_eval.include gs://b/tasks: lm-eval reads its task YAMLs"):
        harness.check_tasks(["softjax_mc"], "gs://b/tasks")
