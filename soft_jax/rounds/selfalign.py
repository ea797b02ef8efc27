"""A round's self-aligned generation (docs/method.md, "The self-align prompt"): prompts -> samples -> filtered.

Each prompt gets its own k exemplars (or a batch shares one draw, or the fixed set); the principles are one
shared prefix per batch, prefilled once by the sampler. sampling.group_batches batches are sampled together as
one device batch (each with its own shared prefix): more rows per decode step. Generation resumes at the
granularity of such a group: each finished batch is one line of a partial file (a torn last line is dropped),
and a group with a batch missing is sampled again whole. Random draws are keyed by (seed, round, batch or
prompt; the group's first batch for sampling), never by a running stream, so a resumed round samples exactly
what an uninterrupted one does.
"""

from __future__ import annotations

import math
import time

import numpy as np
from tqdm.auto import tqdm

from soft_jax import data
from soft_jax.core import faults, io_utils, preemption
from soft_jax.data import filters, templates
from soft_jax.experiment.workdir import save_line
from soft_jax.inference import sampler
from soft_jax.rounds import relevance
from soft_jax.rounds.context import RoundContext

PARTIAL = "generations.partial.jsonl"  # one line per finished batch of a round's generation in progress


def exemplars_for(ctx: RoundContext, t: int, b: int, prompt: dict) -> list[data.Exemplar]:
    e = ctx.config.exemplars
    if e.granularity == "batch":  # one draw per batch: the batch shares its whole prefix
        key = [ctx.config.seed, t, b]
    else:
        key = [ctx.config.seed, t, int(data.prompt_id(prompt["prompt_id"])[1:], 16)]
    return data.sample_exemplars(ctx.inputs.exemplars, e.k, e.strategy, key, e.fixed_ids)


def exemplar_coverage(rows: list[dict], exemplars: list[data.Exemplar]) -> dict:
    """How many distinct exemplars the round's prompts saw, the principles their thoughts cite, and the
    principles one prompt's exemplars cite on average (equal for the fixed and random strategies)."""
    cites = {e.id: filters.cited_principles(e.thoughts) for e in exemplars}
    per_row = [set().union(*(cites[i] for i in r["exemplar_ids"])) for r in rows]
    return {"exemplars_shown": len({i for r in rows for i in r["exemplar_ids"]}),
            "principles_shown": len(set().union(*per_row)) if per_row else 0,
            "principles_per_prompt": float(np.mean([len(s) for s in per_row])) if per_row else 0.0}


def generate_batches(ctx: RoundContext, t: int, b: int, generator, tokenizer, batches: list[list[dict]], cfg,
                     filter_ctx: filters.Context) -> list[list[dict]]:
    """Round t's batches b, b + 1, ... sampled together as one device batch (each with its own exemplars and
    shared prefix; every batch but the last has cfg.batch_size prompts): each batch's self-aligned outputs,
    parsed and judged by the filters (one row per prompt)."""
    shots = [exemplars_for(ctx, t, b + i, p) for i, batch in enumerate(batches) for p in batch]
    batch = [p for one in batches for p in one]
    texts = [templates.self_align_prompt(ctx.inputs.principles, ex, p["prompt"], p["input"])
             for p, ex in zip(batch, shots)]
    seed = np.random.default_rng([ctx.config.seed, t, b]).integers(2**31, size=2)
    # thoughts that end without an answer: the marker written, the answer sampled in the same KV cache
    forced = dict(continue_with=force_answer, continue_seed=int(seed[1])) if ctx.config.sampling.force_answer else {}
    out = sampler.Sampler(generator, tokenizer, cfg, ctx.mesh)(texts, seed=int(seed[0]), **forced)
    rows = [generation_row(p, ex, raw, f, end, filter_ctx)
            for p, ex, raw, f, end in zip(batch, shots, out.texts, out.continued, out.finish)]
    starts = np.cumsum([0] + [len(one) for one in batches])
    return [rows[lo:hi] for lo, hi in zip(starts[:-1], starts[1:])]


def force_answer(completion: str) -> str | None:
    """The head a completion goes on from when its thoughts ended without an answer (None: it has one): the
    thoughts, then the answer marker (templates.with_answer_marker); the sampled answer follows it."""
    if templates.parse(completion)[1] is None and f"\n{templates.USER}" not in completion:
        return templates.with_answer_marker(completion)
    return None


def generation_row(p: dict, shots, raw: str, forced: bool, finish: str, filter_ctx: filters.Context) -> dict:
    """The generation row of prompt `p`: its raw output parsed into thoughts and answer (a repeated last sentence
    cut) and the filters' verdict. shots: the exemplars it was shown; finish: why sampling stopped."""
    thoughts, answer = templates.parse(raw)
    if answer is None and not filter_ctx.config.require_marker:
        thoughts, answer = "", templates.parse("\n" + templates.ANSWER + raw)[1]
    if answer is not None:
        answer = filters.cut(answer, filter_ctx.config.cut_repeated)
    reason = filters.verdict(answer, p["prompt"], filter_ctx, thoughts, finish)
    return {"prompt_id": p["prompt_id"], "prompt": p["prompt"], "input": p["input"], "category": p.get("category", ""),
            "exemplar_ids": [e.id for e in shots], "raw": raw, "finish": finish, "thoughts": thoughts,
            "answer": answer, "forced_answer": forced, "kept": reason is None, "dropped_by": reason}


def generate(ctx: RoundContext, t: int, generator, tokenizer, prompts: list[dict], about: dict
             ) -> tuple[list[dict], dict]:
    """(rows, metrics event) of round t's generation, resuming from its partial file (PARTIAL; the caller
    removes it once the rows are written). `about`: what the event records of the generator."""
    partial = ctx.workdir.round_file(t, PARTIAL)
    done = {b["batch"]: b["rows"] for b in io_utils.read_appended(partial)}
    s = ctx.config.sampling
    cfg = ctx.config.sampling_config(stop_strings=templates.STOP_STRINGS)
    filter_ctx = filters.Context(ctx.inputs.exemplars, ctx.inputs.principles, ctx.config.filters,
                                 [p["prompt"] for p in ctx.inputs.pool])
    n_batches = math.ceil(len(prompts) / s.batch_size)
    group = s.group_batches
    bar = tqdm(total=len(prompts), desc=f"round {t} generating", unit="prompt", disable=not ctx.progress)
    t0, new_tokens = time.perf_counter(), 0
    try:  # a stop or an error closes the bar first, so the message after it starts on its own line
        for first in range(0, n_batches, group):
            ids = range(first, min(first + group, n_batches))
            batches = [prompts[b * s.batch_size:(b + 1) * s.batch_size] for b in ids]
            if all(b in done for b in ids):
                bar.update(sum(map(len, batches)))
                continue
            for b, rows in zip(ids, generate_batches(ctx, t, first, generator, tokenizer, batches, cfg, filter_ctx)):
                new_tokens += sum(len(tokenizer(r["raw"], add_special_tokens=False)["input_ids"]) for r in rows)
                save_line(partial, {"batch": b, "rows": rows})
                done[b] = rows
                bar.update(len(rows))
            bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
            faults.point(f"generate_r{t}_b{ids[-1]}")
            preemption.raise_if_stopped(f"round {t} generation batch {ids[-1] + 1} of {n_batches}")
    finally:
        bar.close()
    rows = [r for b in range(n_batches) for r in done[b]]
    if ctx.config.filters.max_relevance_ratio:  # the model's verdict, after the string filters' (every batch done)
        tr = ctx.config.train
        rows = relevance.judge(rows, generator, tokenizer, ctx.config.filters, ctx.config.curriculum.batch_size,
                               ctx.mesh, (tr.max_prompt_len, tr.max_response_len),
                               prompt=lambda r: templates.user_turn(r["prompt"], r["input"]), progress=ctx.progress)
    seconds = time.perf_counter() - t0
    kept = [r for r in rows if r["kept"]]
    lengths = [len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in kept]
    event = {"round": t, "phase": "generate", **about, "prompts": len(rows), "seconds": seconds,
             "answer_tokens_mean": float(np.mean(lengths)) if lengths else None,
             "answer_tokens_median": float(np.median(lengths)) if lengths else None,
             "kept_finish": {f: sum(r["finish"] == f for r in kept) for f in filters.FINISHES},
             "max_relevance_ratio": ctx.config.filters.max_relevance_ratio,
             "new_tokens_per_s": new_tokens / max(seconds, 1e-9), **exemplar_coverage(rows, ctx.inputs.exemplars),
             "truncated_generations": sum(r["finish"] == "length" for r in rows),
             **filters.counts([r["dropped_by"] for r in rows])}
    return rows, event
