"""How fast can a SOFT round decode on a TPU slice? Lower bounds per chip, training layout against a generation mesh.

For Llama-2-7B and Llama-3-8B (bfloat16 weights and compute) on v4-32, v5e-64 and v5p-8, this compiles the decode
loop from this CPU (compile-only TPU devices, libtpu) twice: in the training layout (FSDP over every chip, what a
7B train step needs) and on the best tensor-parallel generation mesh that fits (`plan.propose_generation_mesh`),
each with 64 rows per model replica. It prints per case what a step must read, compute and receive per chip and
the bound that follows from the chip's published limits (`soft_jax.parallel.topology.chip`), beside JetStream's measured
Llama-2-7B decode on v5e-8 (3,975 output tokens/s, about 497 per chip), the figure a real engine reaches.

    pip install ".[plan-tpu]"
    python benchmarks/decode_bounds.py [llama2-7b:v5e-64 ...]

Each case compiles in a fresh process (benchmarks.common.in_fresh_processes).
"""

from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # soft_jax from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py

from common import in_fresh_processes

CASES = tuple((model, where) for model in ("llama2-7b", "llama3-8b") for where in ("v5e-64", "v4-32", "v5p-8"))
ROWS_PER_REPLICA = 64
JETSTREAM_PER_CHIP = 3975 / 8  # JetStream (JAX) Llama-2-7B on v5e-8, tensor parallel 8: output tokens/s per chip


def case(model: str, where: str) -> list[dict]:
    from soft_jax.models import presets
    from soft_jax.parallel import hlo, topology
    from soft_jax.parallel import sharding as shd
    from soft_jax.scale import plan

    cfg = presets.architecture(model, "bfloat16", "bfloat16")
    tgt = plan.target(tpu=where)
    n = len(tgt.devices)
    chip = topology.chip(tgt.devices[0].device_kind)
    train = shd.make_mesh((1, n, 1), tgt.devices)
    base, _ = plan.table_shapes((1, n, 1))
    resident = 2 * plan.param_bytes(plan.abstract_model(cfg)[1], train)  # the model and the base model
    candidates = []  # (shapes, generation mesh shape, bound), best bound first
    for tensor in (t for t in range(1, n + 1) if n % t == 0 and cfg.num_kv_heads % t == 0 and t <= 16):
        shapes = dataclasses.replace(base, sample_rows=ROWS_PER_REPLICA * (n // tensor))
        found = plan.propose_generation_mesh(cfg, shapes, tgt.devices, chip, tgt.device_bytes, resident, train)
        candidates += [(shapes, shape, bound) for shape, bound, _ in found if shape[2] == tensor]
    candidates.sort(key=lambda x: -x[2].tokens_per_s_per_chip)
    param_shapes = plan.param_shapes(dataclasses.replace(cfg, scan_layers=base.scan_layers))

    def row(name, used, shapes, program):
        t = plan.traffic(program)
        head = {"model": model, "slice": where, "decode on": f"{name} {tuple(used.shape.values())}",
                "rows": shapes.sample_rows}
        if t is None or program.total > tgt.device_bytes:  # refused by the compiler, or more than the chip's HBM
            why = "refused" if t is None else "over the chip"
            return {**head, "GiB per chip": f"{program.total / 2**30:.2f} ({why})",
                    **{k: "-" for k in ("param all-gathers per step", "collectives MiB/step", "weights+cache MiB/step",
                                        "step >= ms", "limited by", "tokens/s per chip <=", "x JetStream",
                                        "reshard >= s")}}
        b = plan.decode_bound(cfg, shapes, used, chip, t, train)
        return {**head, "GiB per chip": f"{program.total / 2**30:.2f}",
                "param all-gathers per step": sum(c.repeats for c in hlo.parameter_gathers(t, param_shapes)),
                "collectives MiB/step": f"{b.collectives / 2**20:,.1f}",
                "weights+cache MiB/step": f"{(b.weights_read + b.cache_read) / 2**20:,.0f}",
                "step >= ms": f"{b.step_s * 1e3:.2f}", "limited by": b.limited_by,
                "tokens/s per chip <=": f"{b.tokens_per_s_per_chip:,.0f}",
                "x JetStream": f"{b.tokens_per_s_per_chip / JETSTREAM_PER_CHIP:.1f}",
                "reshard >= s": "-" if b.reshard_s is None else f"{b.reshard_s:.3f}"}

    rows = []
    for shapes, gen_shape, _ in candidates:  # the best bound the compiler accepts (the bound counts no temporaries)
        gen = shd.make_mesh(gen_shape, tgt.devices)
        print(f"# {model} {where}: compiling decode on {gen_shape}", file=sys.stderr, flush=True)
        program = plan.compile_run(cfg, shapes, train, gen_mesh=gen, only=["decode"])[0]
        rows.append(row("generation mesh", gen, shapes, program))
        if program.compiled is not None and program.total <= tgt.device_bytes:
            break
    print(f"# {model} {where}: compiling decode in the training layout", file=sys.stderr, flush=True)
    program = plan.compile_run(cfg, shapes, train, only=["decode"])[0]
    rows.insert(0, row("training layout", train, shapes, program))
    return rows


def table(rows: list[dict]) -> str:
    head = list(rows[0])
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows])


if __name__ == "__main__":
    wanted = sys.argv[1:]
    rows = []
    for _, found in in_fresh_processes([c for c in CASES if not wanted or f"{c[0]}:{c[1]}" in wanted], case):
        rows += found
        print(table(found), flush=True)
    if rows:
        print(table(rows))
