"""SOFT generation workload: soft-jax vs transformers `generate`, same weights and batch, one process.

SmolLM2-135M, float32, CPU; 16 prompts sharing a ~1,000-token principles + exemplars prefix; 64 new
tokens each (stop tokens ignored so both do the same work); temperature 0.7, top-p 0.95.
Prints tokens/s of both and the ratio, then soft-jax decode-only tokens/s at batch 1 and 16.

With --exemplars, then (same process, same model): a batch of real self-align prompts built from the shipped
assets (load_principles, load_exemplars, the first --batch prompts of load_prompts) for k = 2 and 3, once with
one exemplar draw shared by the batch ("per batch": the whole principles + exemplars text is one shared token
prefix) and once with each prompt's own seeded draw ("per prompt", exemplars.granularity="prompt": only the
principles are shared, the exemplars follow in each row's own part). Each shape is compiled once, then timed
--repeats times, alternating the two cases; prints the median tokens/s of both, the ratio per-prompt /
per-batch, the shared-prefix length `generate_tokens` took (engine.shared_len) and the rows' own
lengths (unpadded range, and the bucket they are left-padded to).

    python benchmarks/sampling.py [--new-tokens 64] [--batch 16] [--prefix-tokens 1000]
    python benchmarks/sampling.py --skip-hf --exemplars [--k 2 3] [--repeats 3]
    python benchmarks/sampling.py --windows 256 512 [--segments 0 128] [--batch 16] [--repeats 3] [--skip-hf]

With --windows, only that: decode reading the cache slots written so far (sampling.decode_segment) against the
whole cache (0), each with the model's dtype and int8, on a batch of shipped self-align prompts; then
transformers `generate` on the same rows.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))
from common import soft_prompts

from soft_jax import models
from soft_jax.inference import engine, sampler
from soft_jax.models.weights import smollm2_path

NEVER = (-1,)  # a stop id no token has: every row generates exactly max_new_tokens


def time_ours(model, tok, prompts, new_tokens, batch):
    config = sampler.SamplingConfig(max_new_tokens=new_tokens, temperature=0.7, top_p=0.95, batch_size=batch,
                                    stop_token_ids=NEVER)
    rows = [tok(p)["input_ids"] for p in prompts]
    sampler.generate_tokens(model, rows, config, NEVER)  # compile
    start = time.perf_counter()
    out = sampler.generate_tokens(model, rows, config, NEVER, rng=jax.random.key(1))
    seconds = time.perf_counter() - start
    assert all(len(r) == new_tokens for r in out)
    return len(rows) * new_tokens / seconds, seconds


def time_hf(tok, prompts, new_tokens):
    import torch
    import transformers

    path = smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=0.7, top_p=0.95,
              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        hf.generate(**{k: v[:2] for k, v in enc.items()}, **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm up
        start = time.perf_counter()
        out = hf.generate(**enc, **kw)
        seconds = time.perf_counter() - start
    assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
    return len(prompts) * new_tokens / seconds, seconds


def decode_only(model, batch, new_tokens, prompt_len=64):
    """Tokens/s of the jitted decode loop alone (prefill excluded), after compiling."""
    graphdef, state = nnx.split(model)
    cfg = model.config
    rows = np.random.default_rng(0).integers(100, 1000, size=(batch, prompt_len)).astype(np.int32)
    params = (jnp.float32(0.7), jnp.float32(0.95), jnp.int32(0), jnp.asarray(NEVER, jnp.int32))

    def run():
        cache = models.KVCache.init(cfg, batch, prompt_len + new_tokens)
        seg = jnp.ones((batch, prompt_len), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
        last, cache = engine.prefill(graphdef, None, state, jnp.asarray(rows), pos, seg, cache)
        jax.block_until_ready(last)
        ds = engine.DecodeState(step=jnp.int32(0), cache=cache, logits=last, done=jnp.zeros((batch,), bool),
                                out=jnp.full((batch, new_tokens), -1, jnp.int32), rng=jax.random.key(0))
        start = time.perf_counter()
        ds = engine.decode(graphdef, None, state, ds, jnp.full((batch,), prompt_len, jnp.int32), params,
                           jnp.int32(new_tokens), True, False)
        jax.block_until_ready(ds.out)
        return time.perf_counter() - start

    run()
    return batch * new_tokens / run()


def self_align_rows(tok, batch, k, per_prompt, seed=0, rnd=1):
    """Token rows of `batch` self-align prompts with k exemplars: one draw for the batch, or one per prompt
    (keyed as soft_jax.rounds.selfalign.exemplars_for keys them)."""
    from soft_jax import data
    from soft_jax.data import templates

    principles, pool, prompts = data.load_principles(), data.load_exemplars(), data.load_prompts()[:batch]
    texts = []
    for p in prompts:
        key = [seed, rnd, int(data.prompt_id(p["prompt_id"])[1:], 16)] if per_prompt else [seed, rnd, 0]
        shots = data.sample_exemplars(pool, k, "random", key)
        texts.append(templates.self_align_prompt(principles, shots, p["prompt"], p["input"]))
    return [tok(t)["input_ids"] for t in texts]


def _gen_config(rows, new_tokens):
    return sampler.SamplingConfig(max_new_tokens=new_tokens, temperature=0.7, top_p=0.95, batch_size=len(rows),
                                  stop_token_ids=NEVER)


def _timed(model, rows, new_tokens, i):
    start = time.perf_counter()
    out = sampler.generate_tokens(model, rows, _gen_config(rows, new_tokens), NEVER, rng=jax.random.key(1 + i))
    seconds = time.perf_counter() - start
    assert all(len(r) == new_tokens for r in out)
    return seconds


def exemplar_granularity(model, tok, batch, ks, new_tokens, repeats):
    """Per-batch vs per-prompt exemplar draws: both compiled first, then timed alternately (so a load
    change on a shared machine hits both), median of `repeats`."""
    print(f"\nexemplars per batch vs per prompt: {batch} shipped prompts, {new_tokens} new tokens each, "
          f"median of {repeats} (alternating)")
    for k in ks:
        cases = {name: self_align_rows(tok, batch, k, per_prompt)
                 for name, per_prompt in (("per batch", False), ("per prompt", True))}
        for rows in cases.values():
            sampler.generate_tokens(model, rows, _gen_config(rows, new_tokens), NEVER)  # compile
        times = {name: [] for name in cases}
        for i in range(repeats):
            for name, rows in cases.items():
                times[name].append(_timed(model, rows, new_tokens, i))
        speed = {}
        for name, rows in cases.items():
            shared = engine.shared_len(rows, True)
            own = [len(r) - shared for r in rows]
            speed[name] = len(rows) * new_tokens / float(np.median(times[name]))
            print(f"k={k} {name:10s} {speed[name]:8.1f} tokens/s  (runs {', '.join(f'{t:.2f}' for t in times[name])} "
                  f"s); rows {min(map(len, rows))}-{max(map(len, rows))} tokens, common prefix "
                  f"{engine.common_prefix_len(rows)}, shared prefix {shared} (prefilled as "
                  f"{engine.bucket(shared, 'prefix') if shared else 0}), own {min(own)}-{max(own)} "
                  f"(bucket {engine.bucket(max(own))})")
        print(f"k={k} ratio per prompt / per batch: {speed['per prompt'] / speed['per batch']:.2f}")


def time_hf_rows(rows, new_tokens, tok):
    """transformers `generate` on token rows (left-padded), the same sampling settings: tokens/s."""
    import torch
    import transformers

    path = smollm2_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=torch.float32).eval()
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=0.7, top_p=0.95,
              pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        hf.generate(input_ids=ids[:2], attention_mask=mask[:2], **dict(kw, max_new_tokens=4, min_new_tokens=4))
        start = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, **kw)
        seconds = time.perf_counter() - start
    assert out.shape[1] - width == new_tokens
    return len(rows) * new_tokens / seconds


def decode_windows(model, tok, batch, news, segments, repeats, skip_hf):
    """Decode reading only the cache slots written (sampling.decode_segment) against reading the whole cache
    (decode_segment 0), and int8 against the model's dtype: a round's batch of shipped self-align prompts with one
    exemplar draw (its principles + exemplars a shared prefix, each row's question its own part), every case
    compiled first, then timed alternately, median of `repeats`; transformers `generate` on the same rows once."""
    import dataclasses

    rows = self_align_rows(tok, batch, 2, per_prompt=False)
    shared = engine.shared_len(rows, True)
    own = engine.bucket(max(len(r) for r in rows) - shared)
    for new in news:
        base = _gen_config(rows, new)
        cases = {f"decode_segment={seg}, kv {kv}": dataclasses.replace(base, decode_segment=seg, kv_dtype=kv)
                 for seg in segments for kv in ("model", "int8")}
        print(f"\n{len(rows)} shipped self-align prompts, shared prefix {shared} tokens, own part bucket {own}; "
              f"{new} new tokens each; median of {repeats} (alternating)")
        for config in cases.values():
            sampler.generate_tokens(model, rows, config, NEVER)  # compile every window's program
        times = {name: [] for name in cases}
        for i in range(repeats):
            for name, config in cases.items():
                start = time.perf_counter()
                out = sampler.generate_tokens(model, rows, config, NEVER, rng=jax.random.key(1 + i))
                times[name].append(time.perf_counter() - start)
                assert all(len(r) == new for r in out)
        speed = {name: len(rows) * new / float(np.median(t)) for name, t in times.items()}
        slots = own + new
        for name, config in cases.items():
            window = engine.mean_window(own, new, slots, config.decode_segment)
            print(f"{name:32s} {speed[name]:8.1f} tokens/s  mean window {window:5.0f} of {slots} slots  "
                  f"(runs {', '.join(f'{t:.2f}' for t in times[name])} s)")
        first = next(iter(speed))
        for name in list(speed)[1:]:
            print(f"ratio {name} / {first}: {speed[name] / speed[first]:.2f}x")
        if not skip_hf:
            ref = time_hf_rows(rows, new, tok)
            print(f"transformers generate            {ref:8.1f} tokens/s; ratio each / transformers: "
                  + ", ".join(f"{speed[n] / ref:.2f}x" for n in speed))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--exemplars", action="store_true", help="also time per-batch vs per-prompt exemplars")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, nargs="*", default=None, metavar="NEW_TOKENS",
                        help="only time decode windows and int8 at these new-token counts (e.g. 256 512)")
    parser.add_argument("--segments", type=int, nargs="+", default=[0, 128])
    args = parser.parse_args()
    if args.windows:
        model, tok = models.load("smollm2-135m", progress=False)
        print(f"device: {jax.devices()[0].device_kind}; float32")
        decode_windows(model, tok, args.batch, args.windows, args.segments, args.repeats, args.skip_hf)
        return

    model, tok = models.load("smollm2-135m", progress=False)
    prompts = soft_prompts(args.batch, args.prefix_tokens, tok)
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    print(f"device: {jax.devices()[0].device_kind}; {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens, "
          f"shared prefix {engine.common_prefix_len([tok(p)['input_ids'] for p in prompts])} tokens; "
          f"{args.new_tokens} new tokens each; float32")
    ours, ours_s = time_ours(model, tok, prompts, args.new_tokens, args.batch)
    print(f"soft-jax      {ours:8.1f} tokens/s  ({ours_s:.2f} s)")
    if not args.skip_hf:
        ref, ref_s = time_hf(tok, prompts, args.new_tokens)
        print(f"transformers  {ref:8.1f} tokens/s  ({ref_s:.2f} s)")
        print(f"ratio soft-jax / transformers: {ours / ref:.2f}x")
    for b in (1, args.batch):
        print(f"soft-jax decode only, batch {b:2d}: {decode_only(model, b, args.new_tokens):8.1f} tokens/s")
    if args.exemplars:
        exemplar_granularity(model, tok, args.batch, args.k, args.new_tokens, args.repeats)


if __name__ == "__main__":
    main()
