"""Memory per device of 7-8B SOFT rounds: the compiler against `soft_jax.scale.memory`'s estimate.

For Llama-2-7B and Llama-3-8B on v4-32, v5e-64 and v5p-8 (FSDP over every chip, as launch/tpu_pod.sh runs a
slice) and Llama-3.2-1B on one H100, this compiles a round's programs from this CPU (compile-only devices:
`pip install ".[plan-tpu]"`, `".[plan-gpu]"`) at `memory.TABLE_SETTINGS`' sizes and prints, per device, the
compiled GiB next to the estimate's, a row at a time (benchmarks/RESULTS.md holds the table).

    python benchmarks/memory_table.py [llama2-7b:v5e-64 ...]
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # soft_jax from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py

from common import in_fresh_processes, markdown_table

# (model, target, mesh): FSDP over every device, as launch/tpu_pod.sh runs a slice.
CASES = tuple((model, where, mesh) for model in ("llama2-7b", "llama3-8b")
              for where, mesh in (("v4-32", (1, 16, 1)), ("v5e-64", (1, 64, 1)), ("v5p-8", (1, 4, 1)))
              ) + (("llama3.2-1b", "h100", (1, 1, 1)),)
GENERATION = ("prefix_prefill", "prefill", "decode")


def compare_row(model: str, where: str, mesh_shape, param_dtype="bfloat16") -> dict:
    """One row of the memory table: compiled GiB per device (training, generation) beside the estimate's."""
    from soft_jax.models import presets
    from soft_jax.parallel import sharding as shd
    from soft_jax.scale import memory, plan

    cfg = presets.architecture(model, param_dtype, "bfloat16")
    log = lambda name: print(f"# {model} {where}: {name}", file=sys.stderr, flush=True)
    tgt = plan.target(gpu_target="h100", gpus=math.prod(mesh_shape)) if where == "h100" else plan.target(tpu=where)
    mesh = shd.make_mesh(mesh_shape, tgt.devices)
    shapes, kwargs = plan.table_shapes(mesh_shape)
    programs = {p.name: p for p in plan.compile_run(cfg, shapes, mesh, progress=log)}
    est = memory.estimate(cfg, mesh_shape=dict(mesh.shape), **kwargs)
    train, generate = programs["train_step"].total, max(programs[n].total for n in GENERATION)
    g = lambda n: f"{n / plan.GiB:.1f}"
    return {"model": model, "params": "bf16" if param_dtype == "bfloat16" else "f32", "target": where,
            "mesh (data, fsdp, tensor)": str(tuple(mesh_shape)), "device GiB": g(tgt.device_bytes),
            "train: compiled": g(train), "estimate": g(est["train_total"]),
            "est / compiled": f"{est['train_total'] / train:.2f}",
            "generate: compiled": g(generate), "estimate ": g(est["generate_total"]),
            "est / compiled ": f"{est['generate_total'] / generate:.2f}",
            "fits": "yes" if max(train, generate) <= tgt.device_bytes else "no",
            "compile s": f"{sum(p.compile_s for p in programs.values()):.0f}"}


if __name__ == "__main__":
    wanted = sys.argv[1:]
    rows = []
    for _, row in in_fresh_processes([c for c in CASES if not wanted or f"{c[0]}:{c[1]}" in wanted], compare_row):
        rows.append(row)
        print(markdown_table(rows[-1:]), flush=True)
    print(markdown_table(rows))
