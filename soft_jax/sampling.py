"""Batched generation on one jitted model, and the prefill / KV-cache machinery log-likelihood scoring
(soft_jax.scoring) shares.

Generation: the batch's longest common token prefix (the principles + exemplars of a SOFT round) is
prefilled once and its KV cache broadcast to every row; each row's own suffix is then prefilled
left-padded to a length bucket (BUCKETS), and a `lax.while_loop` decodes until every row has stopped.
The cache is preallocated and donated. Shapes are bucketed so a long prompt list compiles a handful
of programs. generate_continued lets rows go on after a new head in the same cache (SOFT's forced answer:
the answer marker after the thoughts), prefilling only the head's new text.
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


# Shape buckets, kind -> (minimum, base, linear_above, step): the next power of `base` >= n, at least `minimum`;
# past `linear_above`, the next multiple of `step` instead (few compiled shapes, little padding on long inputs).
BUCKETS = {
    "own": (MIN_BUCKET, 2, 256, 128),  # generation: each row's own prompt tokens (per-prompt exemplars: 300-600)
    "prefix": (64, 2, 512, 256),  # a common prefix prefilled once at batch 1
    "length": (MIN_BUCKET, 2, 512, 256),  # scoring: a chunk's group prefixes, a pass's row remainders
    "cache": (64, 4, 256, 1024),  # scoring: cache rows a chunk's prefixes are kept in (64, 256, 1024, 2048, ...)
    "rows": (1, 2, None, 0),  # scoring: rows of a forward pass
}


def bucket(n: int, kind: str = "own", multiple: int = 1) -> int:
    """n padded to its bucket of `kind` (BUCKETS), then rounded up to a multiple of `multiple`."""
    minimum, base, linear_above, step = BUCKETS[kind]
    if linear_above is not None and n > linear_above:
        size = -(-n // step) * step
    else:
        size = minimum
        while size < n:
            size *= base
    return -(-size // multiple) * multiple


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


def filter_logits(logits, temperature, top_p, top_k, *, use_top_p: bool, use_top_k: bool, ignore=None):
    """Temperature, then top-k, then nucleus (top-p) filtering; filtered entries become -inf.

    Exact, but fast: the threshold is found among the CANDIDATES largest logits (`lax.top_k`), and
    only when the top-k or the nucleus reaches past them does it fall back to sorting the vocabulary.
    ignore: [B] bool, rows whose draw is thrown away (rows that already stopped): they never send the batch
    to the sort (their filtering is then not exact; a stopped row's flat distribution would otherwise sort
    the vocabulary at every step until the batch ends).
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
        mass = jnp.sum(jnp.exp(top - log_norm), axis=-1)
        covered &= jnp.all((mass >= top_p) | (False if ignore is None else ignore))

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


def argmax(x):
    """jnp.argmax over the last axis (the first index of the maximum) as a max and a min over indices: XLA:CPU
    runs the two plain reductions faster than argmax's (value, index) one, and every decode step draws over the
    whole vocabulary (benchmarks/RESULTS.md, "Each program compiled once, and a cheaper draw")."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


def sample_token(logits, key, temperature, top_p, top_k, *, use_top_p: bool, use_top_k: bool, ignore=None):
    """One token per row: argmax when temperature is 0, else a draw from the filtered distribution (the
    Gumbel-max draw of jax.random.categorical: the same tokens for the same key)."""
    greedy = argmax(logits)
    filtered = filter_logits(logits, temperature, top_p, top_k, use_top_p=use_top_p, use_top_k=use_top_k,
                             ignore=ignore)
    sampled = argmax(filtered + jax.random.gumbel(key, filtered.shape, filtered.dtype))
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
        token = sample_token(ds.logits, key, temperature, top_p, top_k, use_top_p=use_top_p, use_top_k=use_top_k,
                             ignore=ds.done)
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
    """How many leading tokens all `rows` share."""
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
    (a shared prefix, scalars) replicated; without a mesh, on the default device. batch_size None: every
    array replicated."""

    def __init__(self, mesh, batch_size: int | None):
        self.mesh, self.batch_size = mesh, batch_size
        if mesh is not None and batch_size is not None:
            shd.check_rows(batch_size, mesh, "the batch size")

    def put(self, tree):
        """Committed to their devices, as a program's outputs are: jit keys its programs on that, so a decode
        state that mixed uncommitted inputs with a chunk's outputs would compile the decode loop twice."""
        if self.mesh is None:
            return jax.device_put(tree, jax.devices()[0])
        split = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda x: jax.device_put(
            x, split if np.ndim(x) and np.shape(x)[0] == self.batch_size else replicated), tree)

    def put_key(self, key):
        """A PRNG key committed as the decode loop's outputs are: on the default device, or replicated over the
        mesh (a jit places it: jax.device_put cannot put an array on other processes' devices)."""
        if self.mesh is None:
            return jax.device_put(key, jax.devices()[0])
        return jax.jit(lambda k: k, out_shardings=NamedSharding(self.mesh, PartitionSpec()))(key)

    def put_cache(self, cache: KVCache) -> KVCache:
        """A cache on its sharding: rows over data x fsdp, KV heads over tensor (a batch-1 shared prefix: rows
        replicated)."""
        if self.mesh is None:
            return cache
        return jax.tree.map(lambda x: jax.device_put(x, shd.cache_sharding(np.shape(x), self.mesh)), cache)


def _shared_len(rows, reuse: bool, cap: int | None = None) -> int:
    """How many leading tokens all rows share and will take from one prefill (0: not worth it).

    Each row keeps at least one own token (or `cap` limits the prefix further)."""
    if not reuse or len(rows) < 2:
        return 0
    n = min(_common_prefix(rows), min(len(r) for r in rows) - 1 if cap is None else cap)
    return n if n >= MIN_SHARED_PREFIX else 0


def _shared_prefix(graphdef, state, model, prefixes: Sequence[Sequence[int]], mesh) -> SharedPrefix | None:
    """Each group's prefix (one may be empty) prefilled once, as one row of a batch of them (None when all are
    empty)."""
    longest = max(map(len, prefixes))
    if not longest:
        return None
    padded = bucket(longest, "prefix")
    ids = np.zeros((len(prefixes), padded), np.int32)
    seg = np.zeros((len(prefixes), padded), np.int32)
    for i, p in enumerate(prefixes):
        ids[i, :len(p)], seg[i, :len(p)] = p, 1
    positions = np.broadcast_to(np.arange(padded, dtype=np.int32), ids.shape)
    rows = _Batcher(mesh, None)  # the ids on every device; the cache's rows split as cache rows are
    cache = rows.put_cache(KVCache.init(model.config, len(prefixes), padded))
    _, cache = _prefill(graphdef, mesh, state, *rows.put((ids, positions, seg)), cache)
    return cache.as_prefix()


def generate_tokens(model: Llama, token_rows: Sequence[Sequence[int]], config: SamplingConfig, stops,
                    rng=None, mesh=None, tokenizer=None) -> list[list[int]]:
    """New tokens (stop token removed) for prompts given as token lists, sampled as one device batch: in groups of
    config.batch_size, each group's common prefix prefilled once (_start).

    With config.stop_strings and a tokenizer, rows stop early once their text contains a stop string
    (checked every STOP_STRING_CHUNK tokens; the caller cuts the text at the stop string)."""
    return _generate_batch(model, token_rows, config, stops, rng, mesh, tokenizer)[0]


def _generate_batch(model: Llama, token_rows, config: SamplingConfig, stops, rng=None, mesh=None, tokenizer=None
                    ) -> tuple[list[list[int]], list[bool]]:
    """generate_tokens' rows, and for each whether it ended with a stop token."""
    batch = _start(model, token_rows, config, stops, rng, mesh)
    _sample(batch, config, tokenizer)
    return _rows(batch, stops)


@dataclasses.dataclass
class _Batch:
    """A batch being sampled, its KV cache on the device: rows can go on sampling in it (_continue)."""

    graphdef: object
    state: object
    mesh: object
    batcher: _Batcher
    params: tuple  # _decode's (temperature, top_p, top_k, stop ids)
    ds: DecodeState
    next_pos: object  # [B] on device: the position of each row's first token of this pass
    first_pos: np.ndarray  # [B] on host: the same
    own_len: int  # cache slots before the first sampled token
    index: list  # the batch row of each prompt (groups are padded to the batch size)


def _start(model: Llama, token_rows, config: SamplingConfig, stops, rng=None, mesh=None, extra_slots: int = 0
           ) -> _Batch:
    """The batch's prompts prefilled; room for max_new_tokens + extra_slots more tokens.

    Rows come in groups of config.batch_size (the last may be shorter): each group is padded to batch_size
    with copies of its first row (fixed shapes), and its common prefix is prefilled once and shared by its rows."""
    graphdef, state = nnx.split(model)
    size = config.batch_size
    groups = [[list(r) for r in token_rows[lo:lo + size]] for lo in range(0, len(token_rows), size)]
    groups = [g + [g[0]] * (size - len(g)) for g in groups]
    rows = [r for g in groups for r in g]
    batcher = _Batcher(mesh, len(rows))
    shared = [_shared_len(g, config.reuse_prefix) for g in groups]
    own = [r[shared[i // size]:] for i, r in enumerate(rows)]
    own_len = bucket(max(map(len, own)))
    prefix = _shared_prefix(graphdef, state, model, [g[0][:n] for g, n in zip(groups, shared)], mesh)
    cache = batcher.put_cache(KVCache.init(model.config, len(rows), own_len + config.max_new_tokens + extra_slots,
                                           prefix=prefix))
    ids, seg, positions = _left_pad(own, own_len)
    ids, seg, positions = batcher.put((ids, seg, positions + np.repeat(shared, size)[:, None]))
    last, cache = _prefill(graphdef, mesh, state, ids, positions, seg, cache)
    params = (jnp.float32(config.temperature), jnp.float32(config.top_p), jnp.int32(config.top_k),
              jnp.asarray(stops, jnp.int32))
    first_pos = np.asarray([len(r) for r in rows], np.int32)
    rng = jax.random.key(config.seed) if rng is None else rng
    b = len(rows)
    step, done, out = batcher.put((np.int32(0), np.zeros(b, bool), np.full((b, config.max_new_tokens), stops[0],
                                                                         np.int32)))
    ds = DecodeState(step=step, cache=cache, logits=last, done=done, out=out, rng=batcher.put_key(rng))
    index = [g * size + i for g in range(len(groups)) for i in range(min(size, len(token_rows) - g * size))]
    return _Batch(graphdef, state, mesh, batcher, params, ds, batcher.put(first_pos), first_pos, own_len, index)


def _sample(b: _Batch, config: SamplingConfig, tokenizer=None) -> None:
    """Decodes until every row stopped (b.ds updated). Without stop strings one call decodes everything; with
    them, chunks of STOP_STRING_CHUNK steps let the host stop rows early."""
    chunk = STOP_STRING_CHUNK if (config.stop_strings and tokenizer is not None) else config.max_new_tokens
    ds = b.ds
    while True:
        until = jnp.int32(min(int(ds.step) + chunk, config.max_new_tokens))
        ds = _decode(b.graphdef, b.mesh, b.state, ds, b.next_pos, b.params, until, config.top_p < 1.0,
                     config.top_k > 0)
        step, done = int(ds.step), to_host(ds.done).copy()
        if step >= config.max_new_tokens or done.all():
            break
        out = to_host(ds.out)
        for i in np.flatnonzero(~done):
            text = tokenizer.decode(out[i, :step], skip_special_tokens=True)
            done[i] = any(stop in text for stop in config.stop_strings)
        ds = ds.replace(done=b.batcher.put(done))
    b.ds = ds


def _rows(b: _Batch, stops) -> tuple[list[list[int]], list[bool]]:
    """Each prompt's new tokens of the last pass (stop token removed), and whether each ended on one."""
    results, ended = [], []
    for row in to_host(b.ds.out)[b.index, :int(b.ds.step)]:
        hits = np.flatnonzero(np.isin(row, stops))
        results.append(row[:hits[0]].tolist() if hits.size else row.tolist())
        ended.append(bool(hits.size))
    return results, ended


TAIL_SLOTS = 16  # cache slots for a continued row's new head text (after the sampled tokens it keeps)


def _continue(b: _Batch, heads: dict, config: SamplingConfig, rng, tokenizer=None) -> None:
    """Prompts in `heads` (prompt -> (how many of its sampled tokens it keeps, the token ids that follow them, at
    most TAIL_SLOTS)) sample max_new_tokens more after those, in the same cache; the other rows stay stopped.

    The slots after a continued row's kept tokens (its stop token, the stop ids written once it was done, tokens
    its new head drops) leave its attention; the tail is prefilled at the next slots, then decoding goes on."""
    ds, rows = b.ds, b.ds.out.shape[0]
    slots = ds.cache.segment_ids.shape[1]
    kept = np.full(rows, slots, np.int32)
    base = np.zeros(rows, np.int32)
    tails = [[] for _ in range(rows)]
    heads = {b.index[i]: head for i, head in heads.items()}  # batch row -> head
    for i, (k, tail) in heads.items():
        kept[i], base[i], tails[i] = b.own_len + k, b.first_pos[i] + k, list(tail)
    kept = b.batcher.put(kept)
    cache = ds.cache.replace(segment_ids=jnp.where(jnp.arange(slots)[None, :] < kept[:, None],
                                                   ds.cache.segment_ids, 0))
    ids, seg, positions = _left_pad(tails, TAIL_SLOTS)
    ids, seg, positions = b.batcher.put((ids, seg, positions + base[:, None]))
    last, cache = _prefill(b.graphdef, b.mesh, b.state, ids, positions, seg, cache)
    first_pos = base + np.asarray([len(t) for t in tails], np.int32)
    done = np.asarray([i not in heads for i in range(rows)])
    step, done, out = b.batcher.put((np.int32(0), done, np.full(ds.out.shape, int(b.params[3][0]), np.int32)))
    b.ds = DecodeState(step=step, cache=cache, logits=last, done=done, out=out, rng=b.batcher.put_key(rng))
    b.next_pos, b.first_pos = b.batcher.put(first_pos), first_pos
    _sample(b, config, tokenizer)


def _kept_tokens(tokenizer, tokens, head: str) -> tuple[int, str]:
    """(k, rest): the most leading `tokens` whose text begins `head` and leaves some of it (the next token's
    logits come from prefilling that rest), and the text of `head` after them."""
    for k in range(len(tokens), -1, -1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        if head.startswith(text) and len(text) < len(head):
            return k, head[len(text):]
    return 0, head


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
        texts, why = _texts(tokenizer, rows, ended, config)
        outputs += texts
        finishes += why
        new_tokens += sum(len(r) for r in rows)
        bar.update(len(rows))
        bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - start):.1f}")
    bar.close()
    return (outputs, finishes) if return_finish else outputs


def generate_continued(model: Llama, tokenizer, prompts: Sequence[str], config: SamplingConfig, continue_with,
                       continue_seed: int, mesh=None) -> tuple[list[str], list[str], list[bool]]:
    """`prompts` sampled as one device batch: in groups of config.batch_size (a SOFT round's batches, each sharing
    its principles + exemplars), each group's common prefix prefilled once; one group is sampled as generate()
    samples it. Then every row for which continue_with(completion) gives a new head (text the completion
    becomes) samples max_new_tokens more after that head, in the same KV cache: the sampled tokens the head keeps
    are not prefilled again, only the head's new text is (SOFT's forced answer: the thoughts, then the answer
    marker). continue_seed keys the second pass. Several groups in one batch decode more rows per step, which is
    faster where a step is not saturated by one group (CPU, small models).

    Returns (completions: head + continuation for continued rows, why each stopped (FINISH_REASONS; the
    continuation's for continued rows), whether each row was continued)."""
    stops = config.stop_token_ids or stop_ids(tokenizer, model)
    if not stops:
        raise UserError("no stop token: the tokenizer has no eos token; pass stop_token_ids")
    if mesh is None and len(prompts) <= config.batch_size:
        config = dataclasses.replace(config, batch_size=len(prompts))
    token_rows = [tokenizer(p)["input_ids"] for p in prompts]
    check_lengths(token_rows, 2 * config.max_new_tokens + TAIL_SLOTS, model.config.max_position_embeddings)
    _, sub = jax.random.split(jax.random.key(config.seed))  # generate()'s key for its first batch
    batch = _start(model, token_rows, config, stops, sub, mesh, extra_slots=TAIL_SLOTS + config.max_new_tokens)
    _sample(batch, config, tokenizer)
    rows, ended = _rows(batch, stops)
    completions, finishes = _texts(tokenizer, rows, ended, config)
    heads, again = {}, {}
    for i, (tokens, text) in enumerate(zip(rows, completions)):
        head = continue_with(text)
        if head is None:
            continue
        k, rest = _kept_tokens(tokenizer, tokens, head)
        tail = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
        if 0 < len(tail) <= TAIL_SLOTS:
            heads[i] = (k, tail)
        else:  # a head that rewrites more than the end of the completion: prefilled afresh below
            again[i] = head
        completions[i] = head
    if heads:
        _continue(batch, heads, config, jax.random.key(continue_seed), tokenizer)
        more, why = _texts(tokenizer, *_rows(batch, stops), config)
        for i in heads:
            completions[i], finishes[i] = completions[i] + more[i], why[i]
    if again:
        rows = sorted(again)
        more, why = generate(model, tokenizer, [prompts[i] + again[i] for i in rows], config, progress=False,
                             mesh=mesh, return_finish=True, seed=continue_seed)
        for i, m, w in zip(rows, more, why):
            completions[i], finishes[i] = completions[i] + m, w
    continued = [i in heads or i in again for i in range(len(prompts))]
    return completions, finishes, continued


def _texts(tokenizer, rows, ended, config: SamplingConfig) -> tuple[list[str], list[str]]:
    """Each row's text, cut at the first stop string, and why it stopped (FINISH_REASONS)."""
    texts, why = [], []
    for r, eos in zip(rows, ended):
        text = tokenizer.decode(r, skip_special_tokens=True)
        cut = _cut_at_stop_strings(text, config.stop_strings) if config.stop_strings else text
        texts.append(cut)
        why.append("stop" if len(cut) < len(text) else "eos" if eos else "length")
    return texts, why


# Scoring lives in soft_jax.scoring; soft_jax.sampling.score (and score_tokens, score_ids) stay as the API other
# tools call (docs/architecture.md, "Contracts"), forwarding to it.


def score_tokens(*args, **kwargs):
    """soft_jax.scoring.score_tokens."""
    from soft_jax import scoring  # on call: scoring imports sampling

    return scoring.score_tokens(*args, **kwargs)


def score_ids(*args, **kwargs):
    """soft_jax.scoring.score_ids."""
    from soft_jax import scoring  # on call: scoring imports sampling

    return scoring.score_ids(*args, **kwargs)


def score(*args, **kwargs):
    """soft_jax.scoring.score: summed log-probability of each continuation given its context."""
    from soft_jax import scoring  # on call: scoring imports sampling

    return scoring.score(*args, **kwargs)
