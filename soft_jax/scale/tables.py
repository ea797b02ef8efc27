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
               log=print) -> list[tuple[str, DecodeBound]]:
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
    resident = (1 + int(shapes.keep_base)) * param_bytes(abstract_model(cfg)[1], mesh)
    proposals = propose_generation_mesh(cfg, shapes, list(where.devices), chip, where.device_bytes, resident, mesh)
    if proposals:
        best = ", ".join(f"{','.join(map(str, shape))}: <= {b.tokens_per_s_per_chip:,.0f} tokens/s per chip"
                         for shape, b, _ in proposals[:3])
        log(f"[plan] generation meshes that fit, best decode bound first (weights and cache; try one with "
            f"--mesh-generate D,F,T): {best}")
    return rows


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
