"""GPU figures for the day a GPU is at hand: bf16 SFT MFU on a 1B-class model, batch-1 decode against the HBM bound.

Random weights of Llama-3.2-1B's architecture (presets.ARCHITECTURES["llama3.2-1b"]: 16 layers, hidden 2048, 32
heads, 8 KV heads, vocabulary 128,256, tied embeddings); no checkpoint is needed.

- `sft`: the real train step (soft_jax.training.Trainer: bf16 compute over float32 master weights and Adam
  moments, remat) on packed rows with loss on every token; median seconds per step after two warm-up steps,
  tokens/s, model TFLOP/s (training.flops_per_token: 6 x matmul parameters + attention) and MFU against the
  device's dense bf16 peak (training.PEAK_FLOPS).
- `decode`: the jitted decode loop alone (prefill excluded) at batch 1, bf16 weights; tokens/s against the
  HBM bound: bandwidth / bytes read per token (every weight once, plus the KV cache written so far, on average
  half of it).

    python benchmarks/gpu.py [--part sft decode] [--batch 8] [--seq 2048] [--new-tokens 256] [--layers N]

benchmarks/gpu.sh runs this and the demo round, each under a time limit, and prints the device first.
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from sampling import decode_only

from soft_jax import training
from soft_jax.models import presets
from soft_jax.models.llama import init_random

# Peak HBM bandwidth, bytes/s (vendor figures): the bound batch-1 decode is measured against.
HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.04e12, "L4": 0.3e12, "TPU v5 lite": 0.819e12,
                   "TPU v5e": 0.819e12, "TPU v4": 1.2e12, "TPU v5p": 2.765e12, "TPU v6": 1.64e12}


def device_figure(table: dict) -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in table.items() if k in kind), None)


def one_b(dtype: str, param_dtype: str, layers: int | None):
    cfg = presets.architecture("llama3.2-1b", param_dtype=param_dtype, dtype=dtype)
    return cfg if layers is None else dataclasses.replace(cfg, num_layers=layers)


def sft(batch: int, seq: int, steps: int, layers: int | None = None) -> None:
    cfg = one_b("bfloat16", "float32", layers)
    model = init_random(cfg)
    config = training.TrainConfig(batch_size=batch, max_prompt_len=seq // 2, max_response_len=seq // 2,
                                  learning_rate=1e-5, warmup_steps=0, remat=True)
    trainer = training.Trainer(model, config, total_steps=steps + 2)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, seq + 1)).astype(np.int32)
    rows = training.loss_rows({"inputs": ids[:, :-1], "targets": ids[:, 1:],
                               "weights": np.ones((batch, seq), np.float32),
                               "segment_ids": np.ones((batch, seq), np.int32),
                               "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}, seq)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        loss = float(jax.device_get(trainer.step(rows, i)["loss"]))
        if i >= 2:
            times.append(time.perf_counter() - start)
    per_step = float(np.median(times))
    tokens = batch * seq
    tflops = tokens * training.flops_per_token(model, seq) / per_step / 1e12
    peak = training.peak_flops()
    mfu = f", MFU {100 * tflops * 1e12 / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else ""
    print(f"sft: Llama-3.2-1B shape, {cfg.num_layers} layers ({cfg.num_params / 1e9:.2f}B params), "
          f"bf16 compute / f32 master, remat, batch {batch} x {seq}: {per_step:.3f} s/step (median of {steps}), "
          f"{tokens / per_step:,.0f} tokens/s, "
          f"{tflops:.1f} TFLOP/s{mfu} (loss {loss:.3f})")


def decode(new_tokens: int, layers: int | None = None, prompt_len: int = 64) -> None:
    cfg = one_b("bfloat16", "bfloat16", layers)
    model = init_random(cfg)
    rate = decode_only(model, 1, new_tokens, prompt_len)
    weights = cfg.num_params * 2
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * (prompt_len + new_tokens / 2)  # mean per step
    bandwidth = device_figure(HBM_BYTES_PER_S)
    bound = (f", the HBM bound {bandwidth / (weights + kv):,.0f} tokens/s: "
             f"{100 * rate * (weights + kv) / bandwidth:.0f}% of {bandwidth / 1e12:.2f} TB/s") if bandwidth else ""
    print(f"decode: Llama-3.2-1B shape, {cfg.num_layers} layers, bf16, batch 1, {new_tokens} new tokens after "
          f"{prompt_len}: {rate:,.1f} tokens/s ({(weights + kv) / 1e9:.2f} GB read per token){bound}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", nargs="+", choices=("sft", "decode"), default=["sft", "decode"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, help="fewer layers than the 16 (a smoke run on a small machine)")
    args = ap.parse_args()
    if min(args.batch, args.seq, args.steps, args.new_tokens) < 1:
        print("gpu.py: error: --batch, --seq, --steps and --new-tokens must be at least 1", file=sys.stderr)
        sys.exit(2)
    d = jax.devices()[0]
    print(f"device: {d.device_kind} ({d.platform}), {jax.device_count()} device(s), jax {jax.__version__}")
    if "sft" in args.part:
        sft(args.batch, args.seq, args.steps, args.layers)
    if "decode" in args.part:
        decode(args.new_tokens, args.layers)


if __name__ == "__main__":
    main()
