"""The estimated memory table: GiB per device of a SOFT round at scale (`soft_jax.scale.memory.TABLE_SETTINGS`) for each
architecture x parameter dtype x mesh preset, from `soft_jax.scale.memory.estimate` alone (nothing compiled; a first
guess: `soft-jax plan` and benchmarks/memory_table.py compile the programs).

    python benchmarks/memory_estimates.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # soft_jax from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py

from common import markdown_table

MESHES = ("gpu", "tpu-host", "v4-32", "v5e-64")


def estimates_table(meshes=MESHES, headroom: float = 0.9) -> str:
    from soft_jax.models import presets
    from soft_jax.scale import memory

    rows = []
    for name in presets.ARCHITECTURES:
        for param_dtype in ("float32", "bfloat16"):
            cfg = presets.architecture(name, param_dtype)
            for mesh_name in meshes:
                est = memory.preset_estimate(cfg, mesh_name)
                device = memory.PRESET_DEVICE_BYTES[mesh_name]
                peak = max(est["train_total"], est["generate_total"])
                fits = "-" if device is None else ("yes" if peak <= headroom * device else "no")
                rows.append({
                    "model": name, "params": "f32" if param_dtype == "float32" else "bf16",
                    "mesh (data, fsdp, tensor)": f"{mesh_name} {memory.MESH_PRESETS[mesh_name]}",
                    "grad_accum": est["grad_accum"], "params/copy": memory.gib(est["params"]),
                    "Adam": memory.gib(est["optimizer"]), "grads": memory.gib(est["gradients"]),
                    "activations + logits": memory.gib(est["activations"] + est["logits"]),
                    "train total": memory.gib(est["train_total"]), "KV cache": memory.gib(est["kv_cache"]),
                    "generate total": memory.gib(est["generate_total"]),
                    "fits": fits if device is None else f"{fits} ({memory.gib(device)} GiB)",
                })
    return markdown_table(rows)


if __name__ == "__main__":
    print(estimates_table())
