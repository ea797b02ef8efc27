"""What `plan` prints and refuses: the programs' memory table, the decode bounds table and log, and the one-line
refusal of a program that does not fit, with what to change."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from soft_jax.core.errors import UserError
from soft_jax.parallel import hlo
from soft_jax.scale import memory
from soft_jax.scale.plan import (
    DecodeBound,
    GiB,
    Program,
    abstract_model,
    compile_run,
    decode_bound,
    param_bytes,
    param_shapes,
    propose_generation_mesh,
    traffic,
)


def programs_table(programs: Sequence[Program], device_bytes: int | None) -> str:
    """Markdown: per program and device, GiB of each part, the total against the device, the MiB its
    collectives bring each device per loop iteration (a decode step) and once per call, compile seconds."""
    g = lambda n: f"{n / GiB:.2f}"
    mib = lambda n: f"{n / 2**20:,.1f}"
    lines = ["| program | compiled for | arguments | outputs | donated | temporaries | code | resident | total | "
             "collectives MiB per step | per call | fits | compile s |", "|" + "---|" * 13]
    for p in programs:
        fits = "-" if device_bytes is None else ("yes" if p.total <= device_bytes else "**no**")
        fits += " (refused by the compiler)" if p.refused else ""
        t = traffic(p)
        moved = "- | -" if t is None else f"{mib(t.per_step)} | {mib(t.per_call)}"
        lines.append(f"| {p.name} | {p.shapes} | {g(p.arguments)} | {g(p.outputs)} | {g(p.aliased)} | "
                     f"{g(p.temporaries)} | {g(p.code)} | {g(p.resident)} | {g(p.total)} | {moved} | {fits} | "
                     f"{p.compile_s:.1f} |")
    return "\n".join(lines)


def bounds_table(rows: Sequence[tuple[str, DecodeBound]]) -> str:
    """Markdown: per generation layout, what a decode step reads, computes and receives per chip, its bound."""
    mib = lambda n: f"{n / 2**20:,.0f}"
    lines = ["| decode on | weights read MiB | KV cache MiB | GFLOP | collectives MiB | step >= ms | limited by | "
             "tokens/s per chip <= | reshard >= s |", "|" + "---|" * 9]
    for name, b in rows:
        lines.append(f"| {name} | {mib(b.weights_read)} | {mib(b.cache_read)} | {b.flops / 1e9:,.1f} | "
                     f"{mib(b.collectives)} | {b.step_s * 1e3:.2f} | {b.limited_by} | "
                     f"{b.tokens_per_s_per_chip:,.0f} | " + ("-" if b.reshard_s is None else f"{b.reshard_s:.2f}")
                     + " |")
    return "\n".join(lines)


def log_bounds(cfg, shapes, mesh, gen_mesh, programs, chip, where, prompts: int,
               log=print, counts: dict | None = None) -> list[tuple[str, DecodeBound]]:
    """Logs how fast decoding can be at best: the run's generation layout against the training layout (compiled
    here for the comparison when they differ), the tensor-parallel meshes that fit, and a round's decode time at
    the token limit."""
    decode = next((p for p in programs if p.name == "decode" and p.compiled is not None), None)
    if decode is None:
        return []
    rows, gathers = [], []
    scanned = dataclasses.replace(cfg, scan_layers=shapes.scan_layers)
    if gen_mesh is not None and dict(gen_mesh.shape) != dict(mesh.shape):
        log("[plan] compiling decode in the training layout, for comparison ...")
        train_decode = compile_run(cfg, shapes, mesh, only=["decode"])[0]
        if train_decode.compiled is not None:
            rows.append((f"training mesh {tuple(mesh.shape.values())}",
                         decode_bound(cfg, shapes, mesh, chip, traffic(train_decode))))
            gathers.append((rows[-1][0], sum(c.repeats for c in hlo.parameter_gathers(traffic(train_decode),
                                                                                      param_shapes(scanned)))))
    used = gen_mesh if gen_mesh is not None else mesh
    run_bound = decode_bound(cfg, shapes, used, chip, traffic(decode), mesh)
    rows.append((("generation mesh " if gen_mesh is not None else "training mesh ") + str(tuple(used.shape.values())),
                 run_bound))
    gathers.append((rows[-1][0], sum(c.repeats for c in hlo.parameter_gathers(traffic(decode), param_shapes(scanned)))))
    link = (f"{chip.interconnect_bandwidth / 1e9:,.0f} GB/s interconnect" if chip.interconnect_bandwidth
            else "interconnect not published")
    log(f"[plan] decode bounds per chip ({chip.name}: {chip.peak_bf16_flops / 1e12:,.0f} TFLOP/s bf16, "
        f"{chip.hbm_bandwidth / 1e9:,.0f} GB/s HBM, {link}; {chip.source}), {shapes.sample_rows} rows a step:")
    log(bounds_table(rows))
    log("[plan] all-gathers of a parameter's shape (or one stacked layer's) per decode step, read from the HLO: "
        + ", ".join(f"{name}: {n}" for name, n in gathers))
    for _, b in rows:
        if b.note:
            log(f"[plan] {b.note}")
    batches = -(-prompts // shapes.sample_rows)
    log(f"[plan] a round's {prompts} prompts: {batches} batch(es) of {shapes.sample_rows} rows; decoding them to the "
        f"token limit ({shapes.new_tokens}) takes at least {batches * shapes.new_tokens * run_bound.step_s:,.1f} s "
        "on this layout")
    if counts is not None:
        log(f"[plan] a round at best on {chip.name} ({counts['prompts']} prompts, all taken as kept, "
            f"{counts['epochs']} epoch(s), {counts['validation']} validation pairs):")
        log(round_table(cfg, shapes, programs, chip, run_bound, counts, mesh.devices.size))
    resident = (1 + int(shapes.keep_base)) * param_bytes(abstract_model(cfg)[1], mesh)
    proposals = propose_generation_mesh(cfg, shapes, list(where.devices), chip, where.device_bytes, resident, mesh)
    if proposals:
        best = ", ".join(f"{','.join(map(str, shape))}: <= {b.tokens_per_s_per_chip:,.0f} tokens/s per chip"
                         for shape, b, _ in proposals[:3])
        log(f"[plan] generation meshes that fit, best decode bound first (weights and cache; try one with "
            f"--mesh-generate D,F,T): {best}")
    return rows


def call_bound(program, chip) -> tuple[float, str, float]:
    """(seconds, what limits it, matmul FLOPs per chip) at best for one call of a compiled program on `chip`: its
    matmul FLOPs from the optimized HLO (hlo.flops, loops by their trip counts) at the chip's peak, its arguments
    read once from HBM, and its collectives over the interconnect; the slowest of the three."""
    text = program.compiled.as_text()
    work, _ = hlo.flops(text)
    moved = traffic(program)
    times = {"FLOP/s": work / chip.peak_bf16_flops, "HBM": program.arguments / chip.hbm_bandwidth}
    if chip.interconnect_bandwidth and moved is not None:
        times["interconnect"] = (moved.per_call + moved.per_step) / chip.interconnect_bandwidth
    limit = max(times, key=times.get)
    return times[limit], limit, work


def round_table(cfg, shapes, programs, chip, decode: DecodeBound, counts: dict, chips: int) -> str:
    """Markdown: a round's time at best, per phase and summed, from the compiled programs (`call_bound`) and the
    decode bound. counts: prompts (a round's), epochs, validation (held-out pairs); optional: relevance, difficulty
    and eval (the pairs each scores; difficulty defaults to the prompts), frozen_base (LoRA: no weight gradients
    for the base), eval_missing and not_counted (what the round also runs but the table leaves out, named in its
    last row). Every prompt is taken as kept (an upper
    bound on the training and scoring work a round's filters leave); scoring is bounded at the scoring program's
    rows a call (eval.batch_size may be smaller: more calls, each reading the weights, so still a bound)."""
    by_name = {p.name: p for p in programs if p.compiled is not None}
    batches = -(-counts["prompts"] // shapes.sample_rows)
    rows = []

    def add(phase, calls, what, program):
        if program in by_name and calls:  # none: a phase the round skips (difficulty from token counts)
            seconds, limit, _ = call_bound(by_name[program], chip)
            note = "the pass after each row's cached context (the context's prefill left out)" \
                if program == "score" else ""
            rows.append((phase, f"{calls:,} x {what}", seconds * calls, limit, note))

    add("generation: prefix prefill", batches * shapes.prefix_groups, "shared prefix", "prefix_prefill")
    add("generation: prefill", batches, f"{shapes.sample_rows} prompts", "prefill")
    rows.append(("generation: decode", f"{batches * shapes.new_tokens:,} steps of {shapes.sample_rows} rows",
                 batches * shapes.new_tokens * decode.step_s, decode.limited_by.split(" ")[0], ""))
    scoring = lambda pairs: -(-pairs // shapes.score_rows)
    if counts.get("relevance"):
        add("relevance filter", scoring(counts["relevance"]), f"{shapes.score_rows} pairs", "score")
    add("difficulty scoring", scoring(counts.get("difficulty", counts["prompts"])), f"{shapes.score_rows} pairs",
        "score")
    if "train_step" in by_name:
        rows_per_step = shapes.train_rows * shapes.grad_accum
        steps = -(-counts["prompts"] * counts["epochs"] // rows_per_step)
        seconds, limit, work = call_bound(by_name["train_step"], chip)
        # the model's FLOPs per token: forward 2N, backward 4N; a frozen base (LoRA / QLoRA) has no weight
        # gradients, so 4N (the adapters' own are under 1% at rank 64)
        per_token = 4 if counts.get("frozen_base") else 6
        model = per_token * cfg.num_params * rows_per_step * shapes.row_len / chips  # per chip
        mfu = model / (seconds * chip.peak_bf16_flops)
        work_text = f"{steps:,} step{'s' * (steps != 1)} of {rows_per_step} rows x {shapes.row_len} tokens"
        rows.append(("SFT", work_text, steps * seconds, limit, f"{work / 1e12:,.2f} TFLOP a step per chip from the "
                     f"HLO; MFU <= {mfu:.0%} (model FLOPs {per_token}N a token)"))
    add("validation scoring", scoring(counts["validation"]), f"{shapes.score_rows} pairs", "score")
    if counts.get("eval"):
        add("eval tasks", scoring(counts["eval"]), f"{shapes.score_rows} pairs", "score")
    if decode.reshard_s is not None:
        rows.append(("reshard", "2 x the weights to and from the generation mesh", 2 * decode.reshard_s,
                     "interconnect", ""))
    total = sum(r[2] for r in rows)
    lines = ["| phase | work | time >= s | limited by | note |", "|---|---|---|---|---|"]
    text = lambda t: f"{t:,.2f}" if t >= 0.01 else f"{t:.1e}"
    lines += [f"| {phase} | {what} | {text(t)} | {limit} | {note} |" for phase, what, t, limit, note in rows]
    missing = counts.get("eval_missing")
    left = ([f"eval.tasks {', '.join(missing)} (no data here)"] if missing else []) + counts.get("not_counted", [])
    lines.append(f"| round | every phase above, one after another | {text(total)} | | "
                 f"{'not counted: ' + '; '.join(left) if left else ''} |")
    return "\n".join(lines)


REMEDIES = {
    "train_step": "set model.scan_layers=true (one layer's weights gathered at a time) and train.remat=true, raise "
                  "mesh.fsdp (split parameters and Adam state over more devices), lower the micro-batch (raise "
                  "train.grad_accum), or use model.param_dtype=bfloat16",
    "prefix_prefill": "use fewer or shorter exemplars (exemplars.k), or model.dtype=bfloat16",
    "prefill": "lower sampling.batch_size, raise mesh.fsdp / mesh.data, or use model.dtype=bfloat16",
    "decode": "lower sampling.batch_size or sampling.max_new_tokens, or raise mesh.fsdp / mesh.data",
    "score": "lower curriculum.batch_size / validation.batch_size or train.max_prompt_len, or raise mesh.fsdp",
}



def refuse_over(programs: Sequence[Program], device_bytes: int | None) -> None:
    """UserError (one line, with a mend) for the largest program over `device_bytes`; nothing when all fit."""
    over = [p for p in programs if device_bytes and p.total > device_bytes]
    if over:
        worst = max(over, key=lambda p: p.total)
        raise UserError(f"{worst.name} needs {memory.size_text(worst.total)} per device (compiled), more than the "
                        f"{memory.size_text(device_bytes)} a device has; {REMEDIES[worst.name]}")
