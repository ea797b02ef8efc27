"""Batched generation and log-likelihood scoring on one jitted model.

Generation: the batch's longest common token prefix (the principles + exemplars of a SOFT round) is
prefilled once and its KV cache broadcast to every row; each row's own suffix is then prefilled
left-padded to a power-of-two bucket, and a `lax.while_loop` decodes until every row has stopped.
The cache is preallocated and donated. Shapes are bucketed so a long prompt list compiles a handful
of programs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from soft_jax.errors import UserError
from soft_jax.models.llama import KVCache, Llama

MIN_BUCKET = 16
MIN_SHARED_PREFIX = 32  # shorter common prefixes are not worth a separate prefill


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's / model's end-of-sequence ids
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    batch_size: int = 16
    reuse_prefix: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.batch_size < 1:
            raise UserError(f"invalid sampling settings: temperature {self.temperature} (>= 0), top_p {self.top_p} "
                            f"(in (0, 1]), top_k {self.top_k} (>= 0), batch_size {self.batch_size} (>= 1)")


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The next power of two >= n (at least `minimum`)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def stop_ids(tokenizer, model: Llama) -> tuple[int, ...]:
    ids = set()
    eos = model.config.eos_token_id
    ids.update(eos if isinstance(eos, tuple) else () if eos is None else (eos,))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


# --- jitted pieces ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(5,))
def _prefill(graphdef, state, ids, positions, segment_ids, cache):
    """Writes `ids` into the cache; returns the last column's logits and the cache."""
    logits, cache = nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=segment_ids, cache=cache,
                                               last_only=True)
    return logits[:, -1], cache


def filter_logits(logits, temperature, top_p, top_k, *, use_top_p: bool, use_top_k: bool):
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries become -inf."""
    logits = logits / jnp.maximum(temperature, 1e-6)
    if not (use_top_p or use_top_k):
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    threshold = jnp.full(logits.shape[:1] + (1,), -jnp.inf)
    if use_top_k:
        k = jnp.clip(top_k, 1, logits.shape[-1])
        threshold = jnp.maximum(threshold, jax.lax.dynamic_slice_in_dim(sorted_logits, k - 1, 1, axis=-1))
        sorted_logits = jnp.where(sorted_logits >= threshold, sorted_logits, -jnp.inf)
    if use_top_p:
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix of the sorted tokens whose mass reaches top_p (always the top one).
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(before < top_p, sorted_logits, jnp.inf)
        threshold = jnp.maximum(threshold, jnp.min(kept, axis=-1, keepdims=True))
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9))
def _decode(graphdef, state, cache, first_logits, positions, rng, params, max_new_tokens, use_top_p, use_top_k):
    """Samples up to max_new_tokens per row; stops early once every row produced a stop token.

    params: (temperature, top_p, top_k, stop_ids [n]) as arrays, so changing them does not recompile.
    Returns tokens [B, max_new_tokens] (stop token included, then padding) and the number of steps.
    """
    temperature, top_p, top_k, stops = params
    batch = first_logits.shape[0]

    def choose(logits, key):
        greedy = jnp.argmax(logits, axis=-1)
        filtered = filter_logits(logits, temperature, top_p, top_k, use_top_p=use_top_p, use_top_k=use_top_k)
        sampled = jax.random.categorical(key, filtered, axis=-1)
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    def cond(carry):
        step, done = carry[0], carry[4]
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, out, done, rng = carry
        rng, key = jax.random.split(rng)
        token = choose(logits, key)
        token = jnp.where(done, stops[0], token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stops)
        logits, cache = nnx.merge(graphdef, state)(
            token[:, None], positions=(positions + step)[:, None], segment_ids=jnp.ones((batch, 1), jnp.int32),
            cache=cache)
        return step + 1, cache, logits[:, -1], out, done, rng

    out = jnp.full((batch, max_new_tokens), stops[0], jnp.int32)
    carry = (jnp.int32(0), cache, first_logits, out, jnp.zeros((batch,), bool), rng)
    step, _, _, out, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, step


# --- host side ----------------------------------------------------------------------------------


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


def _left_pad(rows, length, pad_id):
    ids = np.full((len(rows), length), pad_id, np.int32)
    seg = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if r:
            ids[i, length - len(r):] = r
            seg[i, length - len(r):] = 1
    return ids, seg


def generate_tokens(model: Llama, token_rows: Sequence[Sequence[int]], config: SamplingConfig, stops,
                    rng=None) -> tuple[list[list[int]], int]:
    """Generates for one batch of token lists; returns each row's new tokens (stop token removed)."""
    cfg = model.config
    graphdef, state = nnx.split(model)
    n = len(token_rows)
    rows = list(token_rows) + [token_rows[0]] * (config.batch_size - n) if n < config.batch_size else list(token_rows)
    b = len(rows)
    shared = _common_prefix(rows) if (config.reuse_prefix and b > 1) else 0
    shared = min(shared, min(len(r) for r in rows) - 1)  # every row keeps >= 1 own token
    shared = shared if shared >= MIN_SHARED_PREFIX else 0
    prefix_len = bucket(shared) if shared else 0
    suffix_len = bucket(max(len(r) - shared for r in rows))
    total = prefix_len + suffix_len + config.max_new_tokens
    cache = KVCache.init(cfg, b, total)
    if shared:
        # Prefill the shared prefix once (batch 1, right-padded), then give every row a copy.
        ids = np.zeros((1, prefix_len), np.int32)
        seg = np.zeros((1, prefix_len), np.int32)
        ids[0, :shared], seg[0, :shared] = rows[0][:shared], 1
        one = KVCache.init(cfg, 1, total)
        _, one = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(np.arange(prefix_len)[None]),
                          jnp.asarray(seg), one)
        cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (b,) + x.shape[1:]) if x.ndim else x, one)
    ids, seg = _left_pad([r[shared:] for r in rows], suffix_len, 0)
    positions = np.maximum(np.cumsum(seg, 1) - 1, 0) + shared
    last, cache = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(seg), cache)
    rng = jax.random.key(config.seed) if rng is None else rng
    params = (jnp.float32(config.temperature), jnp.float32(config.top_p), jnp.int32(config.top_k),
              jnp.asarray(stops, jnp.int32))
    next_pos = jnp.asarray([len(r) for r in rows], jnp.int32)
    out, steps = _decode(graphdef, state, cache, last, next_pos, rng, params, config.max_new_tokens,
                         config.top_p < 1.0, config.top_k > 0)
    out = np.asarray(out)[:n, :int(steps)]
    results = []
    for row in out:
        hits = np.flatnonzero(np.isin(row, stops))
        results.append(row[:hits[0]].tolist() if hits.size else row.tolist())
    return results, int(steps)


def _cut_at_stop_strings(text: str, stop_strings) -> str:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def generate(model: Llama, tokenizer, prompts: Sequence[str], config: SamplingConfig | None = None,
             add_special_tokens: bool = True, progress: bool = True, **overrides) -> list[str]:
    """Completions (strings) for `prompts`, in order. Settings from `config`, overridden by keywords."""
    config = dataclasses.replace(config or SamplingConfig(), **overrides)
    stops = config.stop_token_ids or stop_ids(tokenizer, model)
    if not stops:
        raise UserError("no stop token: the tokenizer has no eos token; pass stop_token_ids")
    token_rows = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    for i, r in enumerate(token_rows):
        over = len(r) + config.max_new_tokens - model.config.max_position_embeddings
        if over > 0:
            raise UserError(f"prompt {i} has {len(r)} tokens; with max_new_tokens {config.max_new_tokens} it exceeds "
                            f"the model's context ({model.config.max_position_embeddings}) by {over} tokens; "
                            "shorten it or lower max_new_tokens")
        if not r:
            raise UserError(f"prompt {i} is empty; every prompt needs at least one token")
    outputs: list[str] = []
    key = jax.random.key(config.seed)
    new_tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
    for lo in range(0, len(prompts), config.batch_size):
        key, sub = jax.random.split(key)
        rows, _ = generate_tokens(model, token_rows[lo:lo + config.batch_size], config, stops, rng=sub)
        for r in rows:
            text = tokenizer.decode(r, skip_special_tokens=True)
            outputs.append(_cut_at_stop_strings(text, config.stop_strings) if config.stop_strings else text)
            new_tokens += len(r)
        bar.update(len(rows))
        bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - start):.1f}")
    bar.close()
    return outputs
