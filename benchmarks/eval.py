"""Multiple-choice scoring: soft-jax vs a transformers reference on the same requests, cold and warm.

SmolLM2-135M (the embedded GGUF), float32, CPU. The requests are a mixed set, as a round's evaluation and a
researcher's reruns ask for them: the first N items of HHH under both protocols (Dromedary's A/B in both orders,
and log-likelihood of each answer) and of TruthfulQA MC1 and MC2 under Dromedary's protocol (true / false per
candidate). The reference scores them the way log-likelihood harnesses do with transformers: every request is
one row (context + continuation), rows sorted by length and batched, one forward pass per batch. soft-jax runs
each distinct sequence once and a prefix that rows share once (`scorer.score`).

soft-jax is timed three ways, each from its tokenization to the last log-probability, model loading excluded:
- cold: a fresh process with an empty compilation cache (the first evaluation ever on a machine);
- cached: a second fresh process reading JAX's persistent compilation cache the first one filled (what
  `soft-jax eval`, `run` and `sweep` keep in ~/.cache/soft_jax/jax: every later process on that machine);
- warm: the second call in that process (a run's rounds after round 0: the same requests, the same programs).
Prints requests/s, the ratios to the reference and the largest difference between the two sets of
log-probabilities, with the CPU model.

    python benchmarks/eval.py [--items 50] [--batch 16]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model

from soft_jax import evaluation, models
from soft_jax.inference import scorer
from soft_jax.models.weights import smollm2_path

MIXED = (("hhh", "dromedary"), ("hhh", "loglik"), ("truthfulqa_mc1", "dromedary"), ("truthfulqa_mc2", "dromedary"))


def request_set(tok, items: int) -> list[tuple[str, str]]:
    pairs = []
    for task, protocol in MIXED:
        pairs += evaluation.requests(task, evaluation.load_items(task, items), protocol, tok)
    return pairs


def child(items: int, batch: int, out: str) -> None:
    """soft-jax's side in this process: the first call (cold or cached, as the cache directory holds), then warm."""
    model, tok = models.load("smollm2-135m", progress=False)
    pairs = request_set(tok, items)
    contexts, continuations = [c for c, _ in pairs], [k for _, k in pairs]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        logps = np.asarray(scorer.score(model, tok, contexts, continuations, batch_size=batch), np.float64)
        times.append(time.perf_counter() - start)
    with open(out, "w") as f:
        json.dump({"first": times[0], "warm": times[1], "logps": logps.tolist()}, f)


def run_child(items: int, batch: int, cache: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        subprocess.run([sys.executable, __file__, "--items", str(items), "--batch", str(batch), "--child", out.name],
                       check=True, env=env)
        with open(out.name) as f:
            return json.load(f)


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=50, help="items per task")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.items < 1 or args.batch < 1:
        print("eval.py: error: --items and --batch must be at least 1", file=sys.stderr)
        sys.exit(2)
    if args.child:
        return child(args.items, args.batch, args.child)

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    _, tok = models.load("smollm2-135m", progress=False)
    pairs = request_set(tok, args.items)
    contexts, continuations = [c for c, _ in pairs], [k for _, k in pairs]
    tokens = sum(len(tok(c + k, add_special_tokens=False)["input_ids"]) for c, k in pairs)
    print(f"{cpu_model()}; {len(pairs)} requests (the first {args.items} items of "
          f"{', '.join(f'{t} ({p})' for t, p in MIXED)}), {tokens} tokens if each is run whole")

    with tempfile.TemporaryDirectory() as cache:
        cold, cached = run_child(args.items, args.batch, cache), run_child(args.items, args.batch, cache)
    ours = np.asarray(cached["logps"])

    path = smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    reference_logps(hf, tok, contexts[:2], continuations[:2], args.batch)  # warm up
    start = time.perf_counter()
    ref = reference_logps(hf, tok, contexts, continuations, args.batch)
    seconds = time.perf_counter() - start

    n = len(pairs)
    print(f"transformers: {n / seconds:6.1f} requests/s ({seconds:.1f} s), batch {args.batch}")
    for name, t in (("cold", cold["first"]), ("cached", cached["first"]), ("warm", cached["warm"])):
        print(f"soft-jax {name:6s}: {n / t:6.1f} requests/s ({t:.1f} s); "
              f"ratio soft-jax / transformers {seconds / t:.2f}x")
    print(f"largest |log p difference|: {np.max(np.abs(ours - ref)):.2e} (summed continuation log-probabilities); "
          f"cold and cached runs equal: {np.array_equal(ours, np.asarray(cold['logps']))}")


if __name__ == "__main__":
    main()
