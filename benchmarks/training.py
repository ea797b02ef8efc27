"""SFT: soft-jax vs the PyTorch stack, one process; two levels.

Step level (the default): soft-jax's train step vs a transformers (PyTorch) AdamW step, same model and batch.
SmolLM2-135M, float32, CPU, batch 8 x 256 tokens, loss on every token; both clip gradients to norm 1.
Prints the median seconds per step (after two warm-up steps), tokens/s of both, and the ratio (> 1 means
soft-jax is faster).

Data level (--data): one round's real (prompt, response) pairs, of varying lengths, engraved (SFT in the chat
format, loss on the responses only) by soft_jax.training.train (packed rows, logits only where the loss is) and by
TRL's SFTTrainer on a conversational prompt-completion dataset (completion-only loss), with padding and with its BFD
packing (padding-free), each from the same SmolLM2 weights; same pairs, epochs, learning rate (cosine, no warmup),
batch (soft-jax and TRL packing: packed rows of max_prompt_len + max_response_len tokens; TRL padding: examples),
float32, gradient clipping to 1. --lora R engraves LoRA adapters of rank R instead (soft-jax's train.lora_rank; TRL
with PEFT's LoraConfig: the same rank, alpha, targets q/k/v/o/gate/up/down and dropout, 0 by default). soft-jax's
time includes compiling its step; --warm runs it a second time (the compiled step reused, as in a run's later
rounds). Prints wall time, tokens/s (the pairs' tokens in the chat format, the same count for all) and the ratios.
The pairs: --pairs FILE (JSONL rows with prompt and response, e.g. a work dir's rounds/001/train.jsonl); by default
benchmarks/round.py's cache of soft-jax's kept pairs (~/.cache/soft_jax/bench/round_pairs.jsonl), generated here
first (one soft-jax round's generation: 32 prompts, or --prompts N, 128 new tokens) when missing; --pairs exemplars
takes benchmarks/common.py's six hand-written exemplar answers instead (a smoke test, not the real number).

    python benchmarks/training.py [--batch 8] [--seq 256] [--steps 5] [--remat]
    JAX_PLATFORMS=cpu python benchmarks/training.py --data [--pairs FILE|exemplars|--prompts 32] [--epochs 1] \
        [--lr 5e-5] [--batch 2] [--max-prompt-len 192] [--max-response-len 192] [--trl padding packing] [--warm] \
        [--lora 64 --lora-alpha 16 --lora-dropout 0]
Needs TRL for --data (`pip install --no-deps trl` and `datasets`; see the README's benchmark line).
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

from soft_jax import models, training
from soft_jax.models.weights import smollm2_path


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
    batch = training.loss_rows(rows, rows["inputs"].shape[1])  # loss on every token: logits everywhere

    def step():
        return float(trainer.step(batch)["loss"])

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


# --- data level (--data) -------------------------------------------------------------------------


def round_bench():
    """benchmarks/round.py as a module (its reference pipeline, cache path and helpers)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import round as bench  # benchmarks/round.py

    return bench


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_pairs(path):
    """(prompt, response, finished) of a JSONL file with `prompt` and `response` (train.jsonl, round.py's cache)."""
    from soft_jax.core.errors import UserError
    from soft_jax.core.io_utils import read_jsonl

    try:
        rows = read_jsonl(path, required=("prompt", "response"))
    except UserError as e:
        fail(f"{e} (a work dir's rounds/NNN/train.jsonl has the rows this needs)")
    if not rows:
        fail(f"{path}: no pairs in it; give a file with at least one {{prompt, response}} row")
    return [(str(r["prompt"]), str(r["response"]), bool(r.get("finished", True))) for r in rows]


def exemplar_pairs():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import EXEMPLARS

    return [(q, a, True) for q, _, a in EXEMPLARS]


def generate_pairs(bench, path, prompts=32):
    """One soft-jax round's kept pairs (benchmarks/round.py's soft-jax generation of `prompts` prompts), cached at
    path."""
    c = bench.round_config(prompts, 128, 8, 2, "batch")
    round_ctx, prompts = bench.round_setup(c)
    model, tokenizer = models.load("smollm2-135m", progress=False)
    start = time.perf_counter()
    rows = bench.ours_generate(round_ctx, model, tokenizer, prompts)
    pairs = bench.kept_pairs(rows)
    print(f"generated {len(rows)} prompts in {time.perf_counter() - start:.0f} s, kept {len(pairs)}")
    if not pairs:
        fail("the round kept no pairs (every generation was filtered out); run it again or give --pairs FILE")
    bench.save_pairs(path, pairs, {"source": "benchmarks/training.py", "max_new_tokens": 128})
    print(f"cached -> {path}")
    return pairs


def pairs_cache(bench, prompts):
    """Where the kept pairs of a round of `prompts` prompts are cached (round.py's own cache for 32)."""
    return bench.PAIRS if prompts == 32 else bench.PAIRS.replace(".jsonl", f"_{prompts}.jsonl")


def data_pairs(bench, source, prompts=32):
    if source == "exemplars":
        print("pairs: benchmarks/common.py's 6 hand-written exemplars (a smoke test; the real number needs real "
              "generations: --pairs FILE or the round cache)")
        return exemplar_pairs()
    path = source or pairs_cache(bench, prompts)
    if source or os.path.isfile(path):
        pairs = read_pairs(path)
        print(f"pairs: {len(pairs)} from {path}")
        return pairs
    print(f"pairs: no cache at {path}; generating one round's pairs ({prompts} prompts) with soft-jax first")
    return generate_pairs(bench, path, prompts)


def time_ours_data(model, tokenizer, pairs, config, warm):
    """([(seconds, TrainResult)] of training.train from `model` (which it leaves as is), once or twice; the FLOPs
    of every step it ran, from each step's compiled HLO)."""
    calls = []  # the abstract arguments of every step call, recorded before the step donates them

    def recording(*args, **kwargs):
        step = compiled_step(*args, **kwargs)

        def call(*inputs):
            calls.append((step, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs)))
            return step(*inputs)
        return call

    compiled_step, training.compiled_step = training.compiled_step, recording
    runs = []
    try:
        for _ in range(2 if warm else 1):
            start = time.perf_counter()
            _, result = training.train(model, tokenizer, pairs, config, progress=False)
            runs.append((time.perf_counter() - start, result))
    finally:
        training.compiled_step = compiled_step
    one_run = calls[:len(calls) // len(runs)]
    costs = {}
    for step, inputs in one_run:
        key = (step, str(inputs))
        if key not in costs:
            costs[key] = step.lower(*inputs).compile().cost_analysis()["flops"]
    return runs, sum(costs[(step, str(inputs))] for step, inputs in one_run)


def matmul_rate(n=1024, repeats=20) -> float:
    """FLOP/s of this CPU's best float32 matmul through jax (n x n by n x n, the best of `repeats`): what a
    compute-bound step can at most reach here."""
    a = jax.random.normal(jax.random.key(0), (n, n), np.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peft_config(config):
    """PEFT's LoraConfig with soft-jax's LoRA settings (None for full fine-tuning)."""
    if not config.lora_rank:
        return None
    from peft import LoraConfig

    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      bias="none", target_modules=config.lora_targets.split(","), task_type="CAUSAL_LM")


def time_trl_data(bench, pairs, config, modes):
    """{mode: (seconds, steps, mean loss)}; every mode starts from the same weights."""
    import torch

    model, tokenizer = bench.hf_load()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # torch's first forward + backward in a process can be much slower than the next (one-time kernel and
    # allocator set-up; once 20 s vs 4 s for 550 tokens here): one untimed, so it does not fall on the first mode
    start = time.perf_counter()
    ids = torch.tensor([tokenizer(bench.chat_text(tokenizer, *pairs[0]))["input_ids"]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    print(f"[TRL] untimed torch warm-up step: {time.perf_counter() - start:.1f} s")
    out = {}
    for mode in modes:
        if config.lora_rank:  # PEFT put adapters into the last mode's model: start from a fresh one
            model, tokenizer = bench.hf_load()
        else:
            model.load_state_dict(initial)
        model.train()
        torch.manual_seed(config.seed)
        start = time.perf_counter()
        trainer, result = bench.trl_train(model, tokenizer, pairs, config, mode, config.seed, peft_config(config))
        seconds = time.perf_counter() - start
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        out[mode] = (seconds, result.global_step, float(np.mean(losses)) if losses else float("nan"))
        print(f"[TRL {mode}] {seconds:.1f} s, load avg {bench.load_avg()}")
    return out


def data_main(args):
    from soft_jax.core.errors import UserError

    bench = round_bench()
    try:
        import datasets  # noqa: F401 - a missing reference dependency stops here, with one line
        import trl
    except ImportError as e:
        fail(f"--data needs TRL and datasets ({e}); install them (see the README's benchmark line)")
    pairs = data_pairs(bench, args.pairs, args.prompts)
    try:
        config = training.TrainConfig(batch_size=args.batch or 2, epochs=args.epochs, learning_rate=args.lr,
                                      warmup_steps=0, max_prompt_len=args.max_prompt_len,
                                      max_response_len=args.max_response_len, lora_rank=args.lora,
                                      lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    except UserError as e:
        fail(str(e))
    import torch
    import transformers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model, tokenizer = models.load("smollm2-135m", progress=False)
    tokens = bench.chat_tokens(tokenizer, pairs)
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for _, r, _ in pairs]
    print(f"CPU: {bench.cpu_model()}; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}, trl {trl.__version__}; load avg {bench.load_avg()}")
    print(f"{len(pairs)} pairs ({sum(not f for _, _, f in pairs)} unfinished), responses {min(lengths)}-"
          f"{max(lengths)} tokens, {tokens} tokens in the chat format; {config.epochs} epoch(s), lr "
          f"{config.learning_rate} cosine, batch {config.batch_size}, max prompt/response "
          f"{config.max_prompt_len}/{config.max_response_len}, float32"
          + (f"; LoRA rank {config.lora_rank}, alpha {config.lora_alpha}, dropout {config.lora_dropout}, "
             f"{config.lora_targets}" if config.lora_rank
             else "; full fine-tuning"))
    ours, flops = time_ours_data(model, tokenizer, pairs, config, args.warm)
    del model
    for label, (seconds, result) in zip(("soft-jax (cold: compiles its step)", "soft-jax (warm: step compiled)"), ours):
        print(f"{label:36s} {seconds:8.2f} s  {tokens * config.epochs / seconds:8.1f} tokens/s  {result.steps} steps "
              f"of {config.batch_size} packed rows, mean loss {np.mean(result.losses):.3f}")
    print(f"[soft-jax] load avg {bench.load_avg()}")
    refs = time_trl_data(bench, pairs, config, args.trl)
    for mode, (seconds, steps, loss) in refs.items():
        unit = "examples" if mode == "padding" else "packed rows"
        print(f"{'TRL SFTTrainer (' + mode + ')':36s} {seconds:8.2f} s  {tokens * config.epochs / seconds:8.1f} "
              f"tokens/s  {steps} steps of {config.batch_size} {unit}, mean loss {loss:.3f}")
    for mode, (seconds, _, _) in refs.items():
        line = f"ratio TRL {mode} / soft-jax (wall time): cold {seconds / ours[0][0]:.2f}x"
        if args.warm:
            line += f", warm {seconds / ours[1][0]:.2f}x"
        print(line)
    # how far a faster step could go: soft-jax's work (its steps' compiled HLO) against what this CPU's matmul does
    peak, warm_s = matmul_rate(), ours[-1][0]
    print(f"soft-jax's steps: {flops / 1e9:.1f} GFLOP (compiled HLO), {flops / warm_s / 1e9:.1f} GFLOP/s over the "
          f"{'warm' if args.warm else 'cold'} run = {flops / warm_s / peak:.0%} of this CPU's float32 matmul rate "
          f"({peak / 1e9:.1f} GFLOP/s, jax, 1024^3)")
    for mode, (seconds, _, _) in refs.items():
        need = flops / (seconds / 1.5)
        print(f"1.5x TRL {mode} with the same work needs {need / 1e9:.1f} GFLOP/s = {need / peak:.0%} of that rate, "
              "nothing else timed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 8; --data: 2)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--data", action="store_true", help="engrave one round's real pairs: soft-jax vs TRL")
    parser.add_argument("--pairs", default="", help="--data: JSONL of {prompt, response} rows, or 'exemplars' "
                                                    "(default: benchmarks/round.py's cache, generated if missing)")
    parser.add_argument("--prompts", type=int, default=32,
                        help="--data without --pairs: the round's prompts (default 32: about 20 kept pairs; the "
                             "built-in pool holds 244)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-prompt-len", type=int, default=192)
    parser.add_argument("--max-response-len", type=int, default=192)
    parser.add_argument("--trl", nargs="+", choices=("padding", "packing"), default=["padding", "packing"],
                        help="--data: the TRL modes to time")
    parser.add_argument("--warm", action="store_true", help="--data: also time soft-jax with its step compiled")
    parser.add_argument("--lora", type=int, default=0, help="--data: LoRA adapters of this rank (0: full)")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="--data: torch's intra-op threads for TRL (default: torch's own choice; on a loaded CPU 1 "
                             "can be much faster than 2)")
    args = parser.parse_args()
    for name in ("batch", "torch_threads", "prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.data:
        return data_main(args)
    args.batch = args.batch or 8
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
