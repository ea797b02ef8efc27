"""Multiple-choice scoring: soft-jax vs a transformers reference on the same requests, one process.

SmolLM2-135M (the embedded GGUF), float32, CPU. The requests are the Dromedary protocol's (context,
continuation) pairs of the first N HHH items and N TruthfulQA MC1 items (MC2's are a superset of MC1's).
The reference scores them the way log-likelihood harnesses do with transformers: every request is one
row (context + continuation), rows sorted by length and batched, one forward pass per batch. soft-jax
runs each distinct sequence once and a prefix that rows share once (`scoring.score`). Prints both
throughputs (requests/s), the ratio with and without soft-jax's compile time, and the largest difference
between the two sets of log-probabilities.

    python benchmarks/eval.py [--items 50] [--protocol dromedary] [--batch 16]
"""

import argparse
import os
import time

import numpy as np

from soft_jax import evaluation, models, scoring
from soft_jax.models.checkpoint import smollm2_path


def reference_logps(hf, tok, contexts, continuations, batch):
    import torch

    rows = [(tok(c, add_special_tokens=False)["input_ids"], tok(k, add_special_tokens=False)["input_ids"])
            for c, k in zip(contexts, continuations)]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]) - len(rows[i][1]))
    out = np.zeros(len(rows), np.float64)
    with torch.no_grad():
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            seqs = [rows[i][0] + rows[i][1] for i in idx]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for b, i in enumerate(idx):
                ctx, cont = rows[i]
                pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                out[i] = logp[b, pos, torch.tensor(cont)].sum().item()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=50, help="items per task")
    ap.add_argument("--protocol", default="dromedary")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model, tok = models.load("smollm2-135m", progress=False)
    pairs = []
    for task in ("hhh", "truthfulqa_mc1"):
        pairs += evaluation.requests(task, evaluation.load_items(task, args.items), args.protocol, tok)
    contexts, continuations = [c for c, _ in pairs], [k for _, k in pairs]
    tokens = sum(len(tok(c + k, add_special_tokens=False)["input_ids"]) for c, k in pairs)
    print(f"{len(pairs)} requests ({args.items} HHH + {args.items} TruthfulQA MC1 items, {args.protocol}), "
          f"{tokens} tokens if each is run whole")

    start = time.perf_counter()
    scoring.score(model, tok, contexts, continuations, batch_size=args.batch)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    ours = np.asarray(scoring.score(model, tok, contexts, continuations, batch_size=args.batch), np.float64)
    warm = time.perf_counter() - start

    path = smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    reference_logps(hf, tok, contexts[:2], continuations[:2], args.batch)  # warm up
    start = time.perf_counter()
    ref = reference_logps(hf, tok, contexts, continuations, args.batch)
    seconds = time.perf_counter() - start

    n = len(pairs)
    print(f"soft-jax:     {n / warm:8.1f} requests/s warm ({warm:.1f} s); {n / cold:.1f} requests/s with "
          f"compilation ({cold:.1f} s)")
    print(f"transformers: {n / seconds:8.1f} requests/s ({seconds:.1f} s), batch {args.batch}")
    print(f"ratio (soft-jax / transformers): {seconds / warm:.2f}x warm, {seconds / cold:.2f}x with compilation")
    print(f"largest |log p difference|: {np.max(np.abs(ours - ref)):.2e} (summed continuation log-probabilities)")


if __name__ == "__main__":
    main()
