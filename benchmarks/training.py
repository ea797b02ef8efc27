"""SFT train step: soft-jax vs a transformers (PyTorch) AdamW step, same model and batch, one process.

SmolLM2-135M, float32, CPU, batch 8 x 256 tokens, loss on every token; both clip gradients to norm 1.
Prints the median seconds per step (after two warm-up steps), tokens/s of both, and the ratio (> 1 means
soft-jax is faster).

    python benchmarks/training.py [--batch 8] [--seq 256] [--steps 3] [--remat]
"""

import argparse
import os
import time

import jax
import numpy as np

from soft_jax import models, training
from soft_jax.models.checkpoint import smollm2_path


def make_rows(batch, seq, vocab, seed=0):
    ids = np.random.default_rng(seed).integers(0, vocab, size=(batch, seq + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((batch, seq), np.float32),
            "segment_ids": np.ones((batch, seq), np.int32), "positions": np.tile(np.arange(seq, dtype=np.int32),
                                                                                 (batch, 1))}


def median_time(step, steps, warmup=2):
    """Median seconds per step after `warmup` untimed steps (compilation, allocator warm-up), and the last loss."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), loss


def time_ours(rows, steps, remat):
    model, _ = models.load("smollm2-135m", progress=False)
    config = training.TrainConfig(batch_size=rows["inputs"].shape[0], learning_rate=1e-5, warmup_steps=0,
                                  remat=remat)
    trainer = training.Trainer(model, config, 100)
    def step():
        return float(trainer.step(rows)["loss"])

    return median_time(step, steps)


def time_hf(rows, steps):
    import torch
    import transformers

    path = smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.0)
    inputs, targets = torch.as_tensor(rows["inputs"]).long(), torch.as_tensor(rows["targets"]).long()

    def step():
        logits = hf(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return median_time(step, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", action="store_true")
    args = parser.parse_args()
    rows = make_rows(args.batch, args.seq, 49152)
    tokens = args.batch * args.seq
    print(f"device: {jax.devices()[0].device_kind}; SmolLM2-135M float32; batch {args.batch} x {args.seq}; "
          f"median of {args.steps} timed steps after two warm-up steps")
    ours, ours_loss = time_ours(rows, args.steps, args.remat)
    print(f"soft-jax      {ours:6.2f} s/step  {tokens / ours:8.0f} tokens/s  (loss {ours_loss:.3f})")
    ref, ref_loss = time_hf(rows, args.steps)
    print(f"transformers  {ref:6.2f} s/step  {tokens / ref:8.0f} tokens/s  (loss {ref_loss:.3f})")
    print(f"ratio soft-jax / transformers (speed): {ref / ours:.2f}x")


if __name__ == "__main__":
    main()
