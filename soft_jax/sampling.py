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
from flax import struct
from tqdm.auto import tqdm

from soft_jax import sharding as shd
from soft_jax.errors import UserError
from soft_jax.distributed import to_host
from soft_jax.models.llama import KVCache, Llama, SharedPrefix
from soft_jax.settings import SamplingConfig  # noqa: F401 - soft_jax.sampling.SamplingConfig is the API
from jax.sharding import NamedSharding, PartitionSpec

MIN_BUCKET = 16
MIN_SHARED_PREFIX = 32  # shorter common prefixes are not worth a separate prefill
STOP_STRING_CHUNK = 32  # decode steps between host checks for stop strings
CANDIDATES = 256  # top-k / top-p thresholds are searched among this many largest logits first


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


# The jitted programs take the mesh as a static argument and trace under its activation sharding: batch rows
# over data x fsdp, heads / vocab over tensor (soft_jax.sharding); mesh None = one device.


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(6,))
def _prefill(graphdef, mesh, state, ids, positions, segment_ids, cache):
    """Writes `ids` into the cache; returns the last column's logits and the cache."""
    with shd.activation_sharding(mesh):
        logits, cache = nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=segment_ids, cache=cache,
                                                   last_only=True)
        return shd.constrain(logits[:, -1], ("batch", "vocab")), cache


def _threshold(sorted_desc, log_norm, top_p, top_k, use_top_p: bool, use_top_k: bool):
    """The smallest kept logit per row, from the row's largest logits in descending order.

    log_norm: the log-partition of the distribution top-p mass is measured on (top-k applied)."""
    threshold = jnp.full(sorted_desc.shape[:1] + (1,), -jnp.inf)
    if use_top_k:
        k = jnp.clip(top_k, 1, sorted_desc.shape[-1])
        threshold = jax.lax.dynamic_slice_in_dim(sorted_desc, k - 1, 1, axis=-1)
        sorted_desc = jnp.where(sorted_desc >= threshold, sorted_desc, -jnp.inf)
    if use_top_p:
        probs = jnp.exp(sorted_desc - log_norm)
        # Keep the smallest prefix of the sorted tokens whose mass reaches top_p (always the top one).
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(before < top_p, sorted_desc, jnp.inf)
        threshold = jnp.maximum(threshold, jnp.min(kept, axis=-1, keepdims=True))
    return threshold


def filter_logits(logits, temperature, top_p, top_k, *, use_top_p: bool, use_top_k: bool):
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries become -inf.

    Exact, but fast: the threshold is found among the CANDIDATES largest logits (`lax.top_k`), and
    only when the top-k or the nucleus reaches past them does it fall back to sorting the vocabulary.
    """
    logits = logits / jnp.maximum(temperature, 1e-6)
    if not (use_top_p or use_top_k):
        return logits
    vocab = logits.shape[-1]
    top = jax.lax.top_k(logits, min(CANDIDATES, vocab))[0]
    if use_top_k:
        masked = jnp.where(top >= jax.lax.dynamic_slice_in_dim(top, jnp.clip(top_k, 1, top.shape[-1]) - 1, 1, -1),
                           top, -jnp.inf)
        log_norm = jax.nn.logsumexp(masked, axis=-1, keepdims=True)
    else:
        log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    covered = jnp.bool_(True)
    if use_top_k:
        covered &= top_k <= top.shape[-1]
    if use_top_p:
        covered &= jnp.all(jnp.sum(jnp.exp(top - log_norm), axis=-1) >= top_p)

    def full_sort():
        ranked = jnp.sort(logits, axis=-1)[:, ::-1]
        norm = log_norm
        if use_top_k:
            kth = jax.lax.dynamic_slice_in_dim(ranked, jnp.clip(top_k, 1, vocab) - 1, 1, axis=-1)
            norm = jax.nn.logsumexp(jnp.where(ranked >= kth, ranked, -jnp.inf), axis=-1, keepdims=True)
        return _threshold(ranked, norm, top_p, top_k, use_top_p, use_top_k)

    threshold = jax.lax.cond(covered, lambda: _threshold(top, log_norm, top_p, top_k, use_top_p, use_top_k),
                             full_sort)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_token(logits, key, temperature, top_p, top_k, *, use_top_p: bool, use_top_k: bool):
    """One token per row: argmax when temperature is 0, else a draw from the filtered distribution."""
    greedy = jnp.argmax(logits, axis=-1)
    filtered = filter_logits(logits, temperature, top_p, top_k, use_top_p=use_top_p, use_top_k=use_top_k)
    sampled = jax.random.categorical(key, filtered, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@struct.dataclass
class DecodeState:
    """The decode loop's carry: it leaves the device only between chunks (to check stop strings)."""

    step: jax.Array  # tokens generated so far (the same for every row)
    cache: KVCache
    logits: jax.Array  # [B, vocab] next-token logits
    out: jax.Array  # [B, max_new_tokens] tokens, stop id after a row is done
    done: jax.Array  # [B] bool
    rng: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 1, 7, 8), donate_argnums=(3,))
def _decode(graphdef, mesh, state, ds: DecodeState, positions, params, until, use_top_p, use_top_k):
    """Samples until step `until` or until every row produced a stop token.

    params: (temperature, top_p, top_k, stop_ids [n]) as arrays, so changing them does not recompile;
    positions: [B] position of each row's first new token.
    """
    temperature, top_p, top_k, stops = params
    batch = ds.logits.shape[0]

    def cond(ds):
        return (ds.step < until) & ~jnp.all(ds.done)

    def body(ds):
        rng, key = jax.random.split(ds.rng)
        token = sample_token(ds.logits, key, temperature, top_p, top_k, use_top_p=use_top_p, use_top_k=use_top_k)
        token = jnp.where(ds.done, stops[0], token)
        with shd.activation_sharding(mesh):
            logits, cache = nnx.merge(graphdef, state)(
                token[:, None], positions=(positions + ds.step)[:, None],
                segment_ids=jnp.ones((batch, 1), jnp.int32), cache=ds.cache)
            logits = shd.constrain(logits[:, -1], ("batch", "vocab"))
        return DecodeState(step=ds.step + 1, cache=cache, logits=logits, out=ds.out.at[:, ds.step].set(token),
                           done=ds.done | jnp.isin(token, stops), rng=rng)

    return jax.lax.while_loop(cond, body, ds)


# --- host side ----------------------------------------------------------------------------------


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


def _left_pad(rows, length):
    """ids, segment ids (1 = token, 0 = padding), positions counting from 0 at each row's first token."""
    ids = np.zeros((len(rows), length), np.int32)
    seg = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, length - len(r):] = r
            seg[i, length - len(r):] = 1
    return ids, seg, np.maximum(np.cumsum(seg, 1) - 1, 0)


class _Batcher:
    """Places host arrays on devices: batch-sized arrays split over the mesh's data axes, the rest
    (a shared prefix, scalars) replicated; without a mesh, on the default device."""

    def __init__(self, mesh, batch_size: int):
        self.mesh, self.batch_size = mesh, batch_size
        if mesh is not None:
            shd.check_rows(batch_size, mesh, "the batch size")

    def put(self, tree):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        split = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda x: jax.device_put(
            x, split if np.ndim(x) and np.shape(x)[0] == self.batch_size else replicated), tree)

    def put_cache(self, cache: KVCache) -> KVCache:
        """A cache on its sharding: rows over data x fsdp, KV heads over tensor (a batch-1 shared prefix: rows
        replicated)."""
        if self.mesh is None:
            return cache
        return jax.tree.map(lambda x: jax.device_put(x, cache_sharding(x, self.mesh)), cache)


def cache_sharding(x, mesh):
    """A KV-cache array's sharding: [B, S, KV_HEADS, D] keys and values, [B, S] positions, scalar index."""
    name = "k" if np.ndim(x) == 4 else "positions" if np.ndim(x) == 2 else None
    return NamedSharding(mesh, PartitionSpec()) if name is None else shd.cache_sharding(name, np.shape(x), mesh)


def _shared_len(rows, reuse: bool, cap: int | None = None) -> int:
    """How many leading tokens all rows share and will take from one prefill (0: not worth it).

    Each row keeps at least one own token (or `cap` limits the prefix further)."""
    if not reuse or len(rows) < 2:
        return 0
    n = min(_common_prefix(rows), min(len(r) for r in rows) - 1 if cap is None else cap)
    return n if n >= MIN_SHARED_PREFIX else 0


def bucket_prefix(n: int) -> int:
    """Powers of two up to 512, then multiples of 256: few compiled shapes, little padding on long prefixes."""
    return bucket(n, 64) if n <= 512 else -(-n // 256) * 256


def _prefill_shared(graphdef, state, model, prefix, batch, length, batcher):
    """A cache of `length` own slots per row, after `prefix` (if any) prefilled once at batch 1."""
    shared = _shared_prefix(graphdef, state, model, prefix, batcher)
    return batcher.put_cache(KVCache.init(model.config, batch, length, prefix=shared))


def _shared_prefix(graphdef, state, model, prefix, batcher) -> SharedPrefix | None:
    """`prefix` prefilled once at batch 1 (None when empty)."""
    shared = None
    if len(prefix):
        padded = bucket_prefix(len(prefix))
        ids = np.zeros((1, padded), np.int32)
        seg = np.zeros((1, padded), np.int32)
        ids[0, :len(prefix)], seg[0, :len(prefix)] = prefix, 1
        one = batcher.put_cache(KVCache.init(model.config, 1, padded))
        _, one = _prefill(graphdef, batcher.mesh, state, *batcher.put(
            (ids, np.arange(padded, dtype=np.int32)[None], seg)), one)
        shared = one.as_prefix()
    return shared


def generate_tokens(model: Llama, token_rows: Sequence[Sequence[int]], config: SamplingConfig, stops,
                    rng=None, mesh=None, tokenizer=None) -> list[list[int]]:
    """New tokens (stop token removed) for one batch of prompts given as token lists.

    With config.stop_strings and a tokenizer, rows stop early once their text contains a stop string
    (checked every STOP_STRING_CHUNK tokens; the caller cuts the text at the stop string)."""
    return _generate_batch(model, token_rows, config, stops, rng, mesh, tokenizer)[0]


def _generate_batch(model: Llama, token_rows, config: SamplingConfig, stops, rng=None, mesh=None, tokenizer=None
                    ) -> tuple[list[list[int]], list[bool]]:
    """generate_tokens' rows, and for each whether it ended with a stop token."""
    graphdef, state = nnx.split(model)
    batcher = _Batcher(mesh, config.batch_size)
    n = len(token_rows)
    rows = [list(r) for r in token_rows] + [list(token_rows[0])] * (config.batch_size - n)  # fixed shapes
    shared = _shared_len(rows, config.reuse_prefix)
    own_len = bucket(max(len(r) for r in rows) - shared)
    cache = _prefill_shared(graphdef, state, model, rows[0][:shared], len(rows), own_len + config.max_new_tokens,
                            batcher)
    ids, seg, positions = _left_pad([r[shared:] for r in rows], own_len)
    ids, seg, positions = batcher.put((ids, seg, positions + shared))
    last, cache = _prefill(graphdef, mesh, state, ids, positions, seg, cache)
    params = (jnp.float32(config.temperature), jnp.float32(config.top_p), jnp.int32(config.top_k),
              jnp.asarray(stops, jnp.int32))
    next_pos = batcher.put(np.asarray([len(r) for r in rows], np.int32))
    rng = jax.random.key(config.seed) if rng is None else rng
    b = len(rows)
    ds = DecodeState(step=jnp.int32(0), cache=cache, logits=last, done=batcher.put(np.zeros(b, bool)),
                     out=batcher.put(np.full((b, config.max_new_tokens), stops[0], np.int32)), rng=rng)
    # Without stop strings one call decodes everything; with them, chunks let the host stop rows early.
    chunk = STOP_STRING_CHUNK if (config.stop_strings and tokenizer is not None) else config.max_new_tokens
    while True:
        until = jnp.int32(min(int(ds.step) + chunk, config.max_new_tokens))
        ds = _decode(graphdef, mesh, state, ds, next_pos, params, until, config.top_p < 1.0, config.top_k > 0)
        step, done = int(ds.step), to_host(ds.done).copy()
        if step >= config.max_new_tokens or done.all():
            break
        out = to_host(ds.out)
        for i in np.flatnonzero(~done):
            text = tokenizer.decode(out[i, :step], skip_special_tokens=True)
            done[i] = any(stop in text for stop in config.stop_strings)
        ds = ds.replace(done=batcher.put(done))
    results, ended = [], []
    for row in to_host(ds.out)[:n, :int(ds.step)]:
        hits = np.flatnonzero(np.isin(row, stops))
        results.append(row[:hits[0]].tolist() if hits.size else row.tolist())
        ended.append(bool(hits.size))
    return results, ended


def _cut_at_stop_strings(text: str, stop_strings) -> str:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def check_lengths(token_rows, extra: int, context: int, what: str = "prompt") -> None:
    for i, r in enumerate(token_rows):
        if not len(r):
            raise UserError(f"{what} {i} is empty; every {what} needs at least one token")
        over = len(r) + extra - context
        if over > 0:
            more = f" + {extra} new tokens" if extra else ""
            raise UserError(f"{what} {i} has {len(r)} tokens{more}, {over} more than the model's context of "
                            f"{context}; shorten it" + (" or lower max_new_tokens" if extra else ""))


FINISH_REASONS = ("eos", "stop", "length")  # a stop token, a stop string, the max_new_tokens limit


def generate(model: Llama, tokenizer, prompts: Sequence[str], config: SamplingConfig | None = None,
             add_special_tokens: bool = True, progress: bool = True, mesh=None, return_finish: bool = False,
             **overrides):
    """Completions (strings) for `prompts`, in order. Settings from `config`, overridden by keywords.

    Prompts are processed in batches of config.batch_size; a batch's common token prefix is prefilled once.
    With return_finish, returns (completions, why each stopped: one of FINISH_REASONS); "length" marks a
    completion cut by max_new_tokens, not finished by the model.
    """
    config = dataclasses.replace(config or SamplingConfig(), **overrides)
    stops = config.stop_token_ids or stop_ids(tokenizer, model)
    if not stops:
        raise UserError("no stop token: the tokenizer has no eos token; pass stop_token_ids")
    token_rows = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    check_lengths(token_rows, config.max_new_tokens, model.config.max_position_embeddings)
    if mesh is None:  # no padding rows for short lists; a mesh keeps the divisible batch size
        config = dataclasses.replace(config, batch_size=min(config.batch_size, len(token_rows)))
    outputs: list[str] = []
    finishes: list[str] = []
    key = jax.random.key(config.seed)
    new_tokens, start = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
    for lo in range(0, len(prompts), config.batch_size):
        key, sub = jax.random.split(key)
        rows, ended = _generate_batch(model, token_rows[lo:lo + config.batch_size], config, stops, rng=sub,
                                      mesh=mesh, tokenizer=tokenizer)
        for r, eos in zip(rows, ended):
            text = tokenizer.decode(r, skip_special_tokens=True)
            cut = _cut_at_stop_strings(text, config.stop_strings) if config.stop_strings else text
            outputs.append(cut)
            finishes.append("stop" if len(cut) < len(text) else "eos" if eos else "length")
            new_tokens += len(r)
        bar.update(len(rows))
        bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - start):.1f}")
    bar.close()
    return (outputs, finishes) if return_finish else outputs


# --- log-likelihood scoring ---------------------------------------------------------------------
#
# Requests become unique rows: a context whose next token is read at its end (single-token continuations
# of one context share it), or a context + continuation read at every continuation token. Rows are sorted
# so that rows sharing a prefix are neighbours, and split into groups. Stage 1 runs each group's common
# prefix once (one cache row per group; what all groups of a chunk share runs once, at batch 1). Stage 2
# runs each row's remainder on a copy of its group's cache row, rows of similar length together. Lengths
# and row counts are bucketed, so a long request list compiles a handful of programs.

GROUP_OVERHEAD = 16  # tokens a group costs beyond its prefix (padding, its cache row): the grouping's cost model
GROUP_WINDOW = 8  # rows on each side whose common prefix a group's chunk is expected to run once for all
MAX_GROUP = 64  # rows per group, and groups per chunk, at most
PASS_TOKENS = 8192  # rows x (cached + new) length of one forward pass at most (bounds the KV rows it holds)
ROW_TOKENS = 128  # a pass holds batch_size rows of this many tokens (more shorter rows, fewer longer ones)


def bucket_length(n: int) -> int:
    """Powers of two (at least MIN_BUCKET) up to 512, then multiples of 256."""
    return bucket(n) if n <= 512 else -(-n // 256) * 256


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pass_rows(n: int, multiple: int) -> int:
    """Rows of a pass holding n: the next power of two, rounded up to a multiple of the mesh's data axes."""
    return -(-bucket(n, 1) // multiple) * multiple


def _lcp(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _group(seqs, bounds) -> list[tuple[int, list[int]]]:
    """Splits sorted rows into runs [(prefix length, row indices)] that minimise the tokens run.

    A group runs its common prefix (at most each row's bound) once, less what its neighbourhood shares
    (its chunk runs that once), and each row its remainder; dynamic programming over the split points."""
    n = len(seqs)
    lcp = [0] + [_lcp(seqs[i - 1], seqs[i]) for i in range(1, n)]
    near = [min(lcp[max(1, i - GROUP_WINDOW + 1):i + GROUP_WINDOW + 1], default=0) for i in range(n)]
    best, start = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        p, shared, total = bounds[j - 1], near[j - 1], 0
        for i in range(j - 1, max(-1, j - 1 - MAX_GROUP), -1):
            if i < j - 1:
                p, shared = min(p, bounds[i], lcp[i + 1]), min(shared, near[i])
            total += len(seqs[i])
            cost = best[i] + max(0, p - shared) + total - (j - i) * p + GROUP_OVERHEAD
            if cost < best[j]:
                best[j], start[j] = cost, i
    groups, j = [], n
    while j:
        i = start[j]
        groups.append((min(bounds[i:j] + lcp[i + 1:j]), list(range(i, j))))
        j = i
    return groups[::-1]


def _chunks(groups, seqs):
    """Runs of groups with the same prefix-length bucket, at most MAX_GROUP and PASS_TOKENS of unshared prefix
    tokens each; a run also ends where neighbouring prefixes share much less than those around them do
    (so that a prefix many groups share, run once per chunk, is not lost to a chunk that mixes families)."""
    order = sorted(groups, key=lambda g: cache_length(g[0]))  # stable: neighbours stay together
    heads = [seqs[rs[0]][:p] for p, rs in order]
    lcp = [_lcp(heads[i], heads[i + 1]) for i in range(len(order) - 1)]
    near = [min(lcp[max(0, i - GROUP_WINDOW):i + GROUP_WINDOW], default=0) for i in range(len(order))]
    chunks, shared = [[order[0]]] if order else [], 0
    for i in range(1, len(order)):
        run = chunks[-1]
        shared = lcp[i - 1] if len(run) == 1 else min(shared, lcp[i - 1])
        unshared = max(p for p, _ in run + [order[i]]) - (shared if shared >= MIN_SHARED_PREFIX else 0)
        if (cache_length(order[i][0]) == cache_length(run[0][0])
                and lcp[i - 1] >= max(near[i - 1], near[i]) - GROUP_OVERHEAD
                and len(run) < min(MAX_GROUP, PASS_TOKENS // cache_length(unshared))):
            run.append(order[i])
        else:
            chunks.append([order[i]])
    return chunks


def cache_length(n: int) -> int:
    """Cache rows a chunk's prefixes are kept in: 64, 256, 1024, then multiples of 1024 (few stage-2 programs)."""
    return 64 if n <= 64 else 256 if n <= 256 else -(-n // 1024) * 1024


@dataclasses.dataclass
class _Chunk:
    """Stage 1: group prefixes (`shared` leading tokens common to all, the rest padded to `length`) in cache
    rows of `cache` slots; stage 2: passes (last_only, padded length, [(row, group, prefix length)])."""

    heads: list
    shared: int
    length: int
    cache: int
    passes: list


def _plan(seqs, bounds, last_only, batch_size: int, multiple: int) -> list[_Chunk]:
    plan = []
    for chunk in _chunks(_group(seqs, bounds), seqs):
        heads = [seqs[rs[0]][:p] for p, rs in chunk]
        shared = _shared_len(heads, True, cap=min(map(len, heads)))
        length = bucket_length(max(map(len, heads)) - shared)
        cache = cache_length(length)
        todo = sorted((last_only[r], len(seqs[r]) - p, r, g, p) for g, (p, rs) in enumerate(chunk) for r in rs)
        passes = []
        while todo:  # from the longest remainder down, as many rows as the pass's length allows
            last, tail = todo[-1][0], bucket_length(todo[-1][1])
            most = min(batch_size * ROW_TOKENS // tail, PASS_TOKENS // (cache + tail))
            most = max(multiple, _pow2_floor(most))
            batch = [t for t in todo[-most:] if t[0] == last]
            todo = todo[:len(todo) - len(batch)]
            passes.append((last, tail, [t[2:] for t in batch]))
        plan.append(_Chunk(heads, shared, length, cache, passes))
    return plan


@functools.partial(jax.jit, static_argnums=(0, 1, 9))
def _score_rows(graphdef, mesh, state, heads, which, ids, positions, seg, picks, last_only):
    """Log-probabilities read after each row's tokens; row b continues cache row `which[b]` of `heads`.

    last_only: picks [B, E] are tokens read as the next token after the last column; else picks [B, T]
    are the tokens read at every column (-1: not read, 0 returned)."""
    with shd.activation_sharding(mesh):
        return _score_body(graphdef, state, heads, which, ids, positions, seg, picks, last_only)


def _score_body(graphdef, state, heads, which, ids, positions, seg, picks, last_only):
    new = ids.shape[1]

    def take(x):  # which None: row b continues cache row b (already on its device)
        rows = jnp.pad(x if which is None else x[which], [(0, 0), (0, new)] + [(0, 0)] * (x.ndim - 2))
        return shd.constrain(rows, shd.CACHE_AXES["k" if x.ndim == 4 else "positions"])

    cache = KVCache(k=tuple(map(take, heads.k)), v=tuple(map(take, heads.v)), positions=take(heads.positions),
                    segment_ids=take(heads.segment_ids), index=heads.index, prefix=heads.prefix)
    logits, _ = nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=seg, cache=cache,
                                           last_only=last_only)
    norm = jax.nn.logsumexp(logits, axis=-1)
    if last_only:
        return jnp.take_along_axis(logits[:, -1], picks, axis=-1) - norm[:, -1:]
    picked = jnp.take_along_axis(logits, jnp.maximum(picks, 0)[..., None], axis=-1)[..., 0] - norm
    return jnp.where(picks >= 0, picked, 0.0)


def score_tokens(model: Llama, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                 batch_size: int = 16, mesh=None, progress: bool = False) -> list[np.ndarray]:
    """Per-token log-probabilities of each continuation given its context (token lists).

    Each distinct token sequence runs once, and a prefix several share runs once for all of them (see the
    section comment). batch_size: rows per forward pass at most (fewer for long rows; with a mesh, a
    multiple of its data axes).
    """
    multiple = 1
    if mesh is not None:
        multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        _Batcher(mesh, batch_size)  # refuses a batch size the data axes do not divide
    # Unique rows: (tokens, last_only) -> request indices. A last_only row is a context, read at its end; any
    # other is a context + continuation, run without its last token and read from its bound on.
    rows: dict[tuple, list[int]] = {}
    for i, (c, k) in enumerate(zip(contexts, continuations)):
        if not len(c):
            raise UserError(f"context {i} is empty; every context needs at least one token")
        if len(k):
            rows.setdefault((tuple(c), True) if len(k) == 1 else (tuple(c) + tuple(k), False), []).append(i)
    keys = sorted(rows)
    seqs = [s if last else s[:-1] for s, last in keys]
    bounds = [min(len(contexts[i]) for i in rows[key]) - 1 for key in keys]
    asked = {r: sorted({continuations[i][0] for i in rows[key]}) for r, key in enumerate(keys) if key[1]}
    width = max(map(len, asked.values()), default=1)
    graphdef, state = nnx.split(model)
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(contexts)
    bar = tqdm(total=len(keys), desc="scoring", unit="row", disable=not progress)

    def prefill_heads(chunk, shared, heads):
        """Cache rows holding `heads` (group prefixes past the chunk's shared tokens), after `shared`."""
        n = _pass_rows(len(heads), multiple)
        batcher = _Batcher(mesh, n)
        cache = batcher.put_cache(KVCache.init(model.config, n, chunk.cache, prefix=shared))
        ids, seg, positions = _left_pad(list(heads) + [()] * (n - len(heads)), chunk.length)
        return _prefill(graphdef, mesh, state, *batcher.put((ids, positions + chunk.shared, seg)), cache)[1]

    # With batch rows on several devices, a row reading another row's cache would gather every group's cache
    # onto every device (the whole cache, for each layer). There each pass prefills its own rows' group
    # prefixes instead, so a row's cache is on its device; the prefix all groups share still runs once.
    local = multiple > 1
    for chunk in _plan(seqs, bounds, [last for _, last in keys], batch_size, multiple):
        shared = _shared_prefix(graphdef, state, model, chunk.heads[0][:chunk.shared], _Batcher(mesh, multiple))
        if not local:
            heads = prefill_heads(chunk, shared, [h[chunk.shared:] for h in chunk.heads])
        for last_only, tail, batch in chunk.passes:
            n = _pass_rows(len(batch), multiple)
            if local:  # the prefill donates its cache, the shared prefix with it: take it back from its output
                heads = prefill_heads(chunk, shared, [chunk.heads[g][chunk.shared:] for _, g, _ in batch])
                shared = heads.prefix
            ids, seg, positions = _left_pad([seqs[r][p:] for r, _, p in batch] + [()] * (n - len(batch)), tail)
            positions += np.asarray([p for *_, p in batch] + [0] * (n - len(batch)))[:, None]
            which = np.asarray([g for _, g, _ in batch] + [0] * (n - len(batch)), np.int32)
            picks = np.zeros((n, width), np.int32) if last_only else np.full((n, tail), -1, np.int32)
            for row, (r, _, _) in enumerate(batch):
                if last_only:
                    picks[row, :len(asked[r])] = asked[r]
                else:  # every token after the bound: each request reads its own continuation's part
                    read = keys[r][0][bounds[r] + 1:]
                    picks[row, tail - len(read):] = read
            logp = to_host(_score_rows(graphdef, mesh, state, heads, *_Batcher(mesh, n).put(
                (None if local else which, ids, positions, seg, picks)), last_only))
            for row, (r, _, _) in enumerate(batch):
                for i in rows[keys[r]]:
                    k = continuations[i]
                    out[i] = logp[row, asked[r].index(k[0])][None] if last_only else logp[row, tail - len(k):]
            bar.update(len(batch))
    bar.close()
    return out


def score_ids(tokenizer, contexts: Sequence[str], continuations: Sequence[str]) -> tuple[list, list]:
    """(context token lists, continuation token lists) that `score` runs: each context's trailing whitespace
    (whatever str.rstrip() removes, newlines too, as lm-evaluation-harness's _encode_pair moves) goes onto
    the front of its continuation. So "A: " + "The" is "A:" + " The", the natural boundary, not "A:", " "
    then "The". As the harness does, the continuation's tokens are those of the whole string after the
    context's (a SentencePiece tokenizer would give a continuation tokenized alone a word-start marker it
    does not have in the text); where the whole string's tokens do not start with the context's, the
    continuation is tokenized alone. No special tokens are added. A whitespace-only context keeps it."""
    ctx, cont = [], []
    for c, k in zip(contexts, continuations):
        cut = len(c.rstrip()) or len(c)
        head = tokenizer(c[:cut], add_special_tokens=False)["input_ids"]
        whole = tokenizer(c + k, add_special_tokens=False)["input_ids"]
        natural = whole[:len(head)] == head and len(whole) > len(head)
        ctx.append(head)
        cont.append(whole[len(head):] if natural else tokenizer(c[cut:] + k, add_special_tokens=False)["input_ids"])
    return ctx, cont


def score(model: Llama, tokenizer, contexts: Sequence[str], continuations: Sequence[str], batch_size: int = 16,
          mesh=None, progress: bool = False, per_token: bool = False):
    """Summed log-probability of each continuation given its context.

    Tokens are those of `score_ids`: the context's trailing whitespace moves onto the continuation, then
    tokenizer(context) + tokenizer(continuation), no special tokens added; the continuation's log-probability
    includes the moved whitespace's. Rows sharing a context prefix reuse its KV cache. With per_token=True,
    returns the list of per-token arrays too.
    """
    if len(contexts) != len(continuations):
        raise UserError(f"score: {len(contexts)} contexts but {len(continuations)} continuations")
    ctx, cont = score_ids(tokenizer, contexts, continuations)
    check_lengths(ctx, 0, model.config.max_position_embeddings, "context")
    check_lengths(cont, 0, model.config.max_position_embeddings, "continuation")
    check_lengths([a + b for a, b in zip(ctx, cont)], 0, model.config.max_position_embeddings, "row")
    batch_size = batch_size if mesh is not None else min(batch_size, len(ctx))
    per = score_tokens(model, ctx, cont, batch_size=batch_size, mesh=mesh, progress=progress)
    sums = np.asarray([p.sum() for p in per], np.float32)
    return (sums, per) if per_token else sums
