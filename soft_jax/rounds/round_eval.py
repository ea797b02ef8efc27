"""What a round's model is worth: the validation score with its per-item scores (the collapse guard compares
rounds on them), the eval tasks, and the open-ended answers with their degeneracy signals."""

from __future__ import annotations

import os
import time

import numpy as np

from soft_jax import evaluation
from soft_jax.core import io_utils, storage
from soft_jax.core.errors import UserError
from soft_jax.core.io_utils import read_json
from soft_jax.data import templates
from soft_jax.evaluation import guard, signals
from soft_jax.experiment.workdir import LM_EVAL_ITEMS, METRICS, WorkDir, save_jsonl
from soft_jax.inference import sampler
from soft_jax.parallel import distributed
from soft_jax.rounds import curriculum
from soft_jax.rounds.context import RoundContext

OPEN_ENDED = "open_ended.jsonl"


def open_ended(ctx: RoundContext, model, tokenizer) -> list[dict]:
    """Answers to the open-ended questions in the engraving format, with why each stopped and its signals."""
    qs = ctx.inputs.open_ended
    heads = [templates.engraving_parts(tokenizer, q["prompt"], "")[0] for q in qs]
    out = sampler.Sampler(model, tokenizer, sampler.SamplingConfig(
        max_new_tokens=ctx.config.open_ended.max_new_tokens, batch_size=ctx.config.sampling.batch_size),
        ctx.mesh)(heads, add_special_tokens=not tokenizer.chat_template)
    return [{"prompt_id": q["prompt_id"], "prompt": q["prompt"], "answer": a, "finish": f,
             "signals": signals.per_answer(a, f)} for q, a, f in zip(qs, out.texts, out.finish)]


def validation_items(ctx: RoundContext, model, tokenizer, answers: list[dict]
                     ) -> tuple[list[float], list[str], bool | None]:
    """(per-item validation scores, their ids, whether higher is better where the metric's task says, else None):
    each held-out pair's mean response NLL (the pair's id), an eval task's per-item score (evaluation.item_ids), an
    lm-eval metric's per-item value (TASK/doc_id) or an open-ended answer's signal (its prompt_id). The ids let
    `soft-jax compare` pair two runs' items by identity."""
    config, v = ctx.config, ctx.config.validation
    lm_metric = guard.lm_eval_metric(v.metric)
    if lm_metric is not None:
        return lm_eval_items(ctx, model, tokenizer, *lm_metric)
    if v.metric == "valid_nll":
        pairs = [(p["prompt"], p["response"]) for p in ctx.inputs.validation]
        logps = curriculum.response_logps(model, tokenizer, pairs, v.batch_size, ctx.mesh,
                                          (config.train.max_prompt_len, config.train.max_response_len))
        return [float(-np.mean(lp)) for lp in logps], [p["id"] for p in ctx.inputs.validation], None
    if v.metric in signals.SIGNALS:
        return ([a["signals"][signals.SIGNALS[v.metric][0]] for a in answers],
                [a["prompt_id"] for a in answers], None)
    res = evaluation.evaluate(model, tokenizer, [v.metric], config.eval.protocol, v.limit or None, mesh=ctx.mesh,
                              progress=False)
    rows = res[v.metric]["items"]
    return [r["correct"] for r in rows], evaluation.item_ids(rows), None


def lm_eval_items(ctx: RoundContext, model, tokenizer, task: str, metric: str
                  ) -> tuple[list[float], list[str], bool]:
    """An lm-eval metric's per-item values on the first validation.limit items of its task (0: all)."""
    from soft_jax.evaluation import harness

    v, lm = ctx.config.validation, ctx.config.eval.lm_eval
    res, rows = harness.run_tasks(model, tokenizer, [task], include=lm.include, num_fewshot=lm.num_fewshot,
                                  limit=v.limit, batch_size=v.batch_size, seed=ctx.config.seed, mesh=ctx.mesh)
    rows = sorted(rows, key=lambda r: r["doc_id"])
    if not rows or not all(isinstance(r.get(metric), (int, float)) for r in rows):
        raise UserError(f"validation.metric lm_eval:{task}:{metric}: lm-eval gives no per-item number for it (its "
                        f"per-item metrics: {', '.join(res[task]['higher_is_better']) or 'none'}); choose one of "
                        "those averaged over items (acc, exact_match, ...)")
    return ([float(r[metric]) for r in rows], [f"{task}/{r['doc_id']}" for r in rows],
            bool(res[task]["higher_is_better"].get(metric, True)))


def evaluate(ctx: RoundContext, t: int, model, tokenizer) -> tuple[dict, dict]:
    """(eval.json's content, metrics event) of the model after round t (0: the base model)."""
    config, out, t0 = ctx.config, {"round": t}, time.perf_counter()
    answers = open_ended(ctx, model, tokenizer) if ctx.inputs.open_ended else []
    if answers:
        save_jsonl(ctx.workdir.round_file(t, OPEN_ENDED), answers)
        out["open_ended"] = {"file": OPEN_ENDED, "n": len(answers), "signals": signals.summary(
            [a["answer"] for a in answers], [a["finish"] for a in answers])}
    items, ids, higher = validation_items(ctx, model, tokenizer, answers)
    out["validation"] = {"metric": config.validation.metric, "value": float(np.mean(items)), "n": len(items),
                         "items": items, "ids": ids}
    if higher is not None:  # an lm-eval metric: which way is better, as its task says
        out["validation"]["higher"] = higher
    if ctx.inputs.eval_tasks:
        res = evaluation.evaluate(model, tokenizer, ctx.inputs.eval_tasks, config.eval.protocol,
                                  config.eval.limit or None, truthfulqa_file=config.eval.truthfulqa_file or None,
                                  batch_size=config.eval.batch_size, mesh=ctx.mesh, progress=ctx.progress)
        out["protocol"], out["protocol_description"] = res.pop("protocol"), res.pop("protocol_description")
        if "data" in res:
            out["data"] = res.pop("data")
        out["tasks"] = res
    rows = lm_eval_phase(ctx, t, model, tokenizer, out)
    if ctx.inputs.unavailable:  # eval.required=false: recorded with the reason, shown as n/a, never as 0
        out["unavailable"] = dict(ctx.inputs.unavailable)
    event = {"round": t, "phase": "eval", "seconds": time.perf_counter() - t0,
             config.validation.metric: out["validation"]["value"],
             **{task: r["accuracy"] for task, r in out.get("tasks", {}).items()},
             **({"unavailable": sorted(ctx.inputs.unavailable)} if ctx.inputs.unavailable else {})}
    for task, r in out.get("lm_eval", {}).items():
        event.update({f"lm_eval/{task}/{k}": v for k, v in r["metrics"].items()})
    if rows:
        event["lm_eval_items"] = len(rows)
    if answers:
        event.update({f"open_{k}": out["open_ended"]["signals"][k]
                      for k in ("distinct_2", "repeated_ngram_rate", "length", "truncation_rate")})
    return out, event


def lm_eval_phase(ctx: RoundContext, t: int, model, tokenizer, out: dict) -> list[dict]:
    """The eval.lm_eval tasks on the round's model (soft_jax.evaluation.harness): per-task metrics with lm-eval's
    stderr into eval.json (`lm_eval`), and each item's result into the round's LM_EVAL_ITEMS file, so that rounds
    and runs can be paired item by item."""
    if not ctx.inputs.lm_eval_tasks:
        return []
    from soft_jax.evaluation import harness

    lm = ctx.config.eval.lm_eval
    out["lm_eval"], rows = harness.run_tasks(model, tokenizer, ctx.inputs.lm_eval_tasks, include=lm.include,
                                             num_fewshot=lm.num_fewshot, limit=lm.limit, batch_size=lm.batch_size,
                                             seed=ctx.config.seed, mesh=ctx.mesh, progress=ctx.progress)
    save_jsonl(ctx.workdir.round_file(t, LM_EVAL_ITEMS), rows)
    return rows


def shared_round0(ctx: RoundContext, source: str) -> tuple[dict, dict]:
    """(eval.json, metrics event) of round 0 taken from the work dir `source` (soft_jax.rounds.sweep), whose round 0
    evaluated the same base model under the same settings (sweep.round0_settings): its eval.json, open-ended
    answers and lm-eval items are copied as they are, and a `round0_shared` event names the run they came from."""
    src = WorkDir(source)
    ev = read_json(src.round_file(0, "eval.json"))
    if ev is None:
        raise UserError(f"{src.round_file(0, 'eval.json')}: missing, so round 0 cannot be shared from {source}; "
                        "rerun the sweep")
    for name in (OPEN_ENDED, LM_EVAL_ITEMS):
        copied = src.round_file(0, name)
        if storage.exists(copied) and distributed.is_writer():
            io_utils.write_atomic(ctx.workdir.round_file(0, name), storage.read_bytes(copied))
    event = next((r for r in io_utils.read_appended(src.file(METRICS))
                  if r.get("round") == 0 and r.get("phase") == "eval"), None)
    ctx.workdir.metrics.add({"round": 0, "phase": "round0_shared", "from": os.path.basename(os.path.normpath(source)),
                             "path": storage.abspath(source)})
    ctx.log(f"[run] round 0 (the base model) shares the evaluation of {source}")
    return ev, event
