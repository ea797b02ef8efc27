"""lm-evaluation-harness on soft-jax's JAX model against lm-eval's own HFLM (PyTorch), the same tasks, one process.

SmolLM2-135M (the embedded GGUF), float32, CPU; both sides load the same weights (transformers reads the GGUF).
The tasks are written here in lm-eval's YAML format over local JSONL data (no network): a multiple-choice task
(`--mc` arithmetic questions, four choices each: loglikelihood requests) and a generate_until task (`--gen`
questions, greedy, stopped at a newline). Both models answer every request of `lm_eval.simple_evaluate` at the same
batch size; soft-jax is timed cold (its first evaluation in the process, JAX's persistent compilation cache off,
so compiling is included) and warm (the same evaluation again). Prints seconds, the ratio to HFLM, and how many
items differ (decisions, generations) with the largest log-likelihood difference, with the CPU model.

    python benchmarks/lm_harness.py [--mc 200] [--gen 40] [--batch 16] [--shots 0,5] [--layers stacked|loop]
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

MC_YAML = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_YAML = """task: bench_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tasks(folder: str, mc: int, gen: int) -> None:
    """In-house arithmetic items in lm-eval's layout (seeded)."""
    import numpy as np

    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "mc.jsonl"), "w") as f:
        for i in range(mc):
            a, b = (int(x) for x in rng.integers(2, 60, 2))
            wrong = sorted({a + b + int(d) for d in rng.choice([-3, -2, -1, 1, 2, 3, 10], 3, replace=False)})
            choices = [str(c) for c in wrong] + [str(a + b)]
            order = rng.permutation(4)
            f.write(json.dumps({"id": i, "question": f"What is {a} plus {b}?",
                                "choices": [choices[j] for j in order], "label": int(np.argmax(order == 3))}) + "\n")
    with open(os.path.join(folder, "gen.jsonl"), "w") as f:
        for i in range(gen):
            a, b = (int(x) for x in rng.integers(2, 30, 2))
            f.write(json.dumps({"id": i, "question": f"What is {a} times {b}?", "answer": str(a * b)}) + "\n")
    for name, text in (("bench_mc.yaml", MC_YAML), ("bench_gen.yaml", GEN_YAML)):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text.format(data=folder))


def evaluate(lm, include: str, shots: int) -> tuple[float, dict]:
    import lm_eval

    from soft_jax.evaluation import harness

    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=["bench_mc", "bench_gen"], task_manager=harness.task_manager(include),
                                  num_fewshot=shots, log_samples=True, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0, verbosity="ERROR")
    return time.perf_counter() - t0, res


def compare(a: dict, b: dict) -> tuple[int, int, float]:
    """(decisions that differ, generations that differ, largest log-likelihood difference) between two results."""
    gap = max(abs(x[0] - y[0]) for sa, sb in zip(a["samples"]["bench_mc"], b["samples"]["bench_mc"])
              for x, y in zip(sa["filtered_resps"], sb["filtered_resps"]))
    decisions = sum(sa["acc"] != sb["acc"] for sa, sb in zip(a["samples"]["bench_mc"], b["samples"]["bench_mc"]))
    texts = sum(sa["filtered_resps"] != sb["filtered_resps"]
                for sa, sb in zip(a["samples"]["bench_gen"], b["samples"]["bench_gen"]))
    return decisions, texts, gap


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mc", type=int, default=200, help="multiple-choice items (4 loglikelihood requests each)")
    ap.add_argument("--gen", type=int, default=40, help="generate_until items")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shots", default="0,5", help="num_fewshot settings to run, comma-separated (lm-eval draws each "
                    "item's examples from the other items)")
    ap.add_argument("--layers", choices=("stacked", "loop"), default="stacked",
                    help="soft-jax's layers: stacked (one scan; what `soft-jax eval` / `lm-eval` load) or a loop")
    args = ap.parse_args()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # cold: soft-jax compiles what it runs
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    from soft_jax import models
    from soft_jax.evaluation import harness
    from soft_jax.models.weights import smollm2_path

    torch.set_num_threads(os.cpu_count())
    folder = tempfile.mkdtemp()
    write_tasks(folder, args.mc, args.gen)
    harness.task_manager(folder)  # lm-eval indexes its task files once per process: outside both timings
    model, tok = models.load("smollm2-135m", progress=False, scan_layers=args.layers == "stacked")
    path = smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    print(f"CPU: {cpu_model()}; jax {jax.__version__}, torch {torch.__version__}; soft-jax layers {args.layers}")
    print(f"tasks: {args.mc} multiple-choice items ({4 * args.mc} loglikelihood requests), {args.gen} generate_until "
          f"items (max 16 tokens), batch {args.batch}")
    for shots in (int(x) for x in args.shots.split(",")):
        jax.clear_caches()  # each setting's cold run compiles its programs afresh
        ours = harness.SoftJaxLM(model, tok, batch_size=args.batch)
        cold, a = evaluate(ours, folder, shots)
        warm, _ = evaluate(ours, folder, shots)
        ref_s, b = evaluate(HFLM(pretrained=hf, tokenizer=tok, batch_size=args.batch, device="cpu"), folder, shots)
        decisions, texts, gap = compare(a, b)
        print(f"num_fewshot {shots}:")
        print(f"  HFLM (PyTorch):      {ref_s:7.1f} s")
        print(f"  soft-jax cold:       {cold:7.1f} s  ({ref_s / cold:.2f}x HFLM, compiling included)")
        print(f"  soft-jax warm:       {warm:7.1f} s  ({ref_s / warm:.2f}x HFLM)")
        print(f"  acc {a['results']['bench_mc']['acc,none']:.4f} vs {b['results']['bench_mc']['acc,none']:.4f}; "
              f"exact_match {a['results']['bench_gen']['exact_match,none']:.4f} vs "
              f"{b['results']['bench_gen']['exact_match,none']:.4f}; decisions that differ {decisions}/{args.mc}, "
              f"generations that differ {texts}/{args.gen}, largest log-likelihood difference {gap:.2e}")


if __name__ == "__main__":
    main()
