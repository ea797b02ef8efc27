"""Where the SFT train step's time goes: its parts, soft-jax (XLA) vs PyTorch, same shapes, one process.

SmolLM2-135M shapes, float32, 8 x 256 tokens. Each part runs forward + backward (gradients of
sum(output * w) for a fixed random w) except the bare matmuls:
- the three matmul forms of one MLP projection (2048 x 576 x 1536): y = x W (forward), dW = x^T g (weight
  gradient), dx = g W^T (input gradient); XLA with the train step's compiler options vs torch's `@`;
- SmolLM2's decoder layer 0 (same weights on both sides: soft-jax's `DecoderLayer` vs transformers'
  `LlamaDecoderLayer` with SDPA attention), and its attention and MLP blocks (each with
  its RMSNorm) alone.
Prints milliseconds (median of 20 after 3 warm-up calls) and the ratio (> 1 means soft-jax is faster).

    python benchmarks/training_parts.py
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from soft_jax import models, training
from soft_jax.models.config import rope_inv_freq
from soft_jax.models.llama import make_mask, rope_tables
from soft_jax.models.weights import smollm2_path

BATCH, SEQ = 8, 256


def median_ms(fn, calls=20, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def report(name, ours, ref, flops=None):
    rate = f"  ({flops / ours / 1e6:4.0f} vs {flops / ref / 1e6:4.0f} GFLOP/s)" if flops else ""
    print(f"{name:34s} soft-jax {ours:8.1f} ms  torch {ref:8.1f} ms  ratio {ref / ours:4.2f}x{rate}")


def matmuls():
    import torch

    n, d_in, d_out = BATCH * SEQ, 576, 1536
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((n, d_in), np.float32), rng.standard_normal((n, d_out), np.float32)
    w = rng.standard_normal((d_in, d_out), np.float32)
    tx, tg, tw = map(torch.from_numpy, (x, g, w))
    options = training.compiler_options(jax.default_backend())
    forms = [("matmul y = x W", lambda x, g, w: x @ w, lambda: tx @ tw),
             ("matmul dW = x^T g", lambda x, g, w: x.T @ g, lambda: tx.T @ tg),
             ("matmul dx = g W^T", lambda x, g, w: g @ w.T, lambda: tg @ tw.T)]
    for name, ours, ref in forms:
        fn = jax.jit(ours, compiler_options=options)
        report(name, median_ms(lambda: jax.block_until_ready(fn(x, g, w))), median_ms(ref), 2 * n * d_in * d_out)


def layers():
    import torch
    import transformers

    model, _ = models.load("smollm2-135m", progress=False)
    path = smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32, attn_implementation="sdpa")
    cfg = model.config
    rng = np.random.default_rng(0)
    # Real hidden-state scale: embeddings of random tokens. (Unit-variance noise instead makes torch's
    # attention ~1.8x slower here: its softmax then underflows into denormals, which XLA flushes to zero.)
    x = np.asarray(model.embed_tokens[...])[rng.integers(0, cfg.vocab_size, (BATCH, SEQ))]
    w = rng.standard_normal((BATCH, SEQ, cfg.hidden_size), np.float32)
    positions = np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1))
    segments = np.ones((BATCH, SEQ), np.int32)
    options = training.compiler_options(jax.default_backend())

    tx, tw = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w)
    tpos = torch.from_numpy(positions).long()
    hf_layer = hf.model.layers[0]
    rope = hf.model.rotary_emb(tx, tpos)

    def ours(module, call):
        graphdef, params = nnx.split(module)

        def loss(params, x):
            rope_ = rope_tables(positions, rope_inv_freq(cfg), x.dtype)
            mask = make_mask(positions, segments, positions, segments, cfg.sliding_window)
            return jnp.sum(call(nnx.merge(graphdef, params), x, rope_, mask) * w)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options)
        return lambda: jax.block_until_ready(step(params, x))

    def ref(call):
        def run():
            (call(tx) * tw).sum().backward()
            hf_layer.zero_grad(set_to_none=True)
            tx.grad = None
        return run

    layer = model.layers[0]
    # Each block with the RMSNorm in front of it, as in the layer.
    report("norm + attention, fwd + bwd",
           median_ms(ours(layer, lambda m, x, r, k: m.self_attn(m.input_layernorm(x), r, k)[0])),
           median_ms(ref(lambda x: hf_layer.self_attn(hf_layer.input_layernorm(x), position_embeddings=rope)[0])))
    report("norm + MLP, fwd + bwd", median_ms(ours(layer, lambda m, x, r, k: m.mlp(m.post_attention_layernorm(x)))),
           median_ms(ref(lambda x: hf_layer.mlp(hf_layer.post_attention_layernorm(x)))))
    report("decoder layer, fwd + bwd", median_ms(ours(layer, lambda m, x, r, k: m(x, r, k)[0])),
           median_ms(ref(lambda x: hf_layer(x, position_embeddings=rope, position_ids=tpos))))


def main():
    print(f"device: {jax.devices()[0].device_kind}; SmolLM2-135M shapes, float32, {BATCH} x {SEQ} tokens")
    matmuls()
    layers()


if __name__ == "__main__":
    main()
