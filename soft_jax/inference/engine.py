"""The inference engine: the jitted prefill and decode programs, the decode loop's state, device placement,
shape buckets and the shared-prefix machinery that generation (`sampler`) and scoring (`scorer`) both run on.

A batch's longest common token prefix (the principles + exemplars of a SOFT round) is prefilled once
(`prefill_shared_prefix`) and kept once in the KV cache; each row's own suffix is prefilled left-padded to a
length bucket (`bucket`, `left_pad`, `prefill`); `decode` is a `lax.while_loop` that samples until every row
has stopped, run in segments (`segment`): each reads only the cache slots written so far, up to a bound a few
compiled windows share. The cache is preallocated and donated. Shapes are bucketed so that a long list of prompts
compiles a handful of programs. The programs take the mesh as a static argument and trace under its
activation sharding: batch rows over data x fsdp, heads / vocab over tensor (soft_jax.parallel.sharding); mesh None:
one device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from soft_jax.core.errors import UserError
from soft_jax.models.llama import KVCache, Llama, SharedPrefix
from soft_jax.parallel import sharding as shd

MIN_BUCKET = 16
MIN_SHARED_PREFIX = 32  # shorter common prefixes are not worth a separate prefill
CANDIDATES = 256  # top-k / top-p thresholds are searched among this many largest logits first


# Shape buckets, kind -> (minimum, base, linear_above, step): the next power of `base` >= n, at least `minimum`;
# past `linear_above`, the next multiple of `step` instead (few compiled shapes, little padding on long inputs).
BUCKETS = {
    "own": (MIN_BUCKET, 2, 256, 128),  # generation: each row's own prompt tokens (per-prompt exemplars: 300-600)
    "prefix": (64, 2, 512, 256),  # a common prefix prefilled once at batch 1
    "length": (MIN_BUCKET, 2, 512, 256),  # scoring: a chunk's group prefixes
    # scoring: a pass's row remainders after their cached prefixes; a multiple-choice answer is often 2-4 tokens, so
    # the smallest bucket is 4, not 16 (a forward pass 4x wider than its tokens)
    "tail": (4, 2, 512, 256),
    "cache": (64, 4, 256, 1024),  # scoring: cache rows a chunk's prefixes are kept in (64, 256, 1024, 2048, ...)
    "rows": (1, 2, None, 0),  # scoring: rows of a forward pass
}


def bucket(n: int, kind: str = "own", multiple: int = 1) -> int:
    """n padded to its bucket of `kind` (BUCKETS), then rounded up to a multiple of `multiple`.

    Args:
      n: the size to pad (a token count or a row count).
      kind: a key of BUCKETS ("own", "prefix", "length", "tail", "cache", "rows").
      multiple: the result is a multiple of this (e.g. the mesh's data x fsdp for a row count).

    Returns:
      The padded size, an int >= n: the smallest minimum x base**i >= n, or past `linear_above` the next
      multiple of `step`; then rounded up to a multiple of `multiple`.
    """
    minimum, base, linear_above, step = BUCKETS[kind]
    if linear_above is not None and n > linear_above:
        size = -(-n // step) * step
    else:
        size = minimum
        while size < n:
            size *= base
    return -(-size // multiple) * multiple


def stop_ids(tokenizer, model: Llama) -> tuple[int, ...]:
    """The model's end-of-sequence ids and the tokenizer's, sorted.

    Args:
      tokenizer: a tokenizer with an `eos_token_id` attribute (int or None), or None.
      model: the Llama whose `config.eos_token_id` (an int, a tuple of ints or None) is read.

    Returns:
      The distinct stop token ids in ascending order; empty when neither gives one.
    """
    ids = set()
    eos = model.config.eos_token_id
    ids.update(eos if isinstance(eos, tuple) else () if eos is None else (eos,))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


@functools.partial(jax.jit, static_argnums=(0, 1, 7), donate_argnums=(6,))
def prefill(graphdef, mesh, state, ids, positions, segment_ids, cache, window=None):
    """Writes `ids` into the cache (donated) and returns the last column's logits.

    Args:
      graphdef, state: `nnx.split(model)`; mesh: the mesh the arrays are on, or None (one device).
      ids, positions, segment_ids: [B, T] int32 (segment 0 = padding).
      cache: a KVCache with room for T more tokens at its index.
      window: attention reads the cache's first `window` slots (static; at least its index + T); None: all.

    Returns:
      (logits [B, vocab] after each row's last column, the cache with the T tokens written).
    """
    with shd.activation_sharding(mesh):
        logits, cache = nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=segment_ids, cache=cache,
                                                   last_only=True, window=window)
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

    Args:
      logits: [B, vocab] float logits.
      temperature: scalar; the logits are divided by max(temperature, 1e-6).
      top_p: scalar in (0, 1]: keep the fewest most likely tokens whose probability (after top-k) reaches it.
      top_k: int scalar: keep each row's k largest logits (clipped to [1, vocab]; ties at the k-th are kept).
      use_top_p, use_top_k: whether each filter runs (static Python bools); neither: only the temperature.
      ignore: [B] bool or None (every row's filtering exact), as above.

    Returns:
      [B, vocab] logits divided by the temperature, the entries the filters drop set to -inf.
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
    whole vocabulary (benchmarks/RESULTS.md, "Each program compiled once, and a cheaper draw").

    Args:
      x: an array of rank >= 1.

    Returns:
      int32 array of shape x.shape[:-1]: the index of the first maximum along the last axis (x.shape[-1] for
      a row holding a NaN, which equals no maximum).
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


def sample_token(logits, key, temperature, top_p, top_k, *, use_top_p: bool, use_top_k: bool, ignore=None):
    """One token per row: argmax when temperature is 0, else a draw from the filtered distribution (the
    Gumbel-max draw of jax.random.categorical: the same tokens for the same key).

    Args:
      logits: [B, vocab] float next-token logits.
      key: a PRNG key for the Gumbel noise.
      temperature, top_p, top_k: scalars as `filter_logits`'s; temperature 0 (or below): greedy.
      use_top_p, use_top_k: whether the filters run (static).
      ignore: [B] bool or None: rows whose draw is thrown away, as `filter_logits`'s.

    Returns:
      [B] int32 token ids.
    """
    greedy = argmax(logits)
    filtered = filter_logits(logits, temperature, top_p, top_k, use_top_p=use_top_p, use_top_k=use_top_k,
                             ignore=ignore)
    sampled = argmax(filtered + jax.random.gumbel(key, filtered.shape, filtered.dtype))
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@struct.dataclass
class DecodeState:
    """The decode loop's carry: it leaves the device only between chunks (to check stop strings).

    Attributes:
      step: int32 scalar, tokens generated so far (the same for every row); the column `out` is written at next.
      cache: the KVCache holding the prompts and the tokens sampled so far.
      logits: [B, vocab] float32 logits of each row's next token.
      out: [B, max_new_tokens] int32 sampled tokens; a done row gets the first stop id at every later step.
      done: [B] bool, rows that produced a stop token (or that the host marked done).
      rng: the PRNG key, split at every step.
    """

    step: jax.Array  # tokens generated so far (the same for every row)
    cache: KVCache
    logits: jax.Array  # [B, vocab] next-token logits
    out: jax.Array  # [B, max_new_tokens] tokens, stop id after a row is done
    done: jax.Array  # [B] bool
    rng: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 1, 7, 8, 9), donate_argnums=(3,))
def decode(graphdef, mesh, state, ds: DecodeState, positions, params, until, use_top_p, use_top_k, window=None):
    """Samples until step `until` or until every row produced a stop token.

    Args:
      graphdef, state: `nnx.split(model)`; mesh: as `prefill`'s.
      ds: the loop's state (donated): the cache, the next-token logits, the tokens so far, which rows are done.
      positions: [B] the position of each row's first new token.
      params: (temperature, top_p, top_k, stop_ids [n]) as arrays, so that changing them does not recompile.
      until: the step to stop at (an int32 array: a chunk's end).
      use_top_p, use_top_k: whether the filters run (static).
      window: attention reads the cache's first `window` slots (static): at least the slot the step before
        `until` writes (`segments` chooses them); None: every slot.

    Returns:
      The DecodeState after the last step.
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
                segment_ids=jnp.ones((batch, 1), jnp.int32), cache=ds.cache, window=window)
            logits = shd.constrain(logits[:, -1], ("batch", "vocab"))
        return DecodeState(step=ds.step + 1, cache=cache, logits=logits, out=ds.out.at[:, ds.step].set(token),
                           done=ds.done | jnp.isin(token, stops), rng=rng)

    return jax.lax.while_loop(cond, body, ds)


def segment(index: int, slots: int, step: int) -> int:
    """The attention window of the decode segment whose first write is at cache slot `index`: the next multiple
    of `step` past it (at most `slots`, the cache's size); step 0: `slots`. The segment decodes until its last
    write fills the window's last slot; the next one reads a window `step` slots wider. Each window is a decode
    program of its own: `step` trades compiled programs against slots read.

    Args:
      index: the cache slot the segment's first step writes (the cache's index then).
      slots: the cache's slots per row.
      step: SamplingConfig.decode_segment.

    Returns:
      The window, in (index, slots].
    """
    return slots if step <= 0 else min(slots, (index // step + 1) * step)


def mean_window(start: int, new_tokens: int, slots: int, step: int) -> float:
    """The mean attention window (cache slots read) over a decode loop of `new_tokens` steps whose first write is
    at slot `start`, with `segment`'s windows: what a decode step reads of the cache, on average."""
    total, index = 0, start
    while index < start + new_tokens:
        window = segment(index, slots, step)
        steps = min(window, start + new_tokens) - index
        total, index = total + steps * window, index + steps
    return total / max(new_tokens, 1)


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all `rows` share.

    Args:
      rows: a non-empty sequence of token sequences (lists, tuples or 1-D arrays of ids).

    Returns:
      The length of the longest prefix common to every row (at most the shortest row's length).
    """
    first, n = rows[0], min(len(r) for r in rows)
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


def left_pad(rows, length):
    """ids, segment ids (1 = token, 0 = padding), positions counting from 0 at each row's first token.

    Args:
      rows: a sequence of token sequences, each at most `length` long (an empty one is all padding).
      length: the padded length T.

    Returns:
      (ids, seg, positions), NumPy arrays of shape [len(rows), T], each row's tokens at its right end: ids and
      seg int32, positions int64 (0 on the padding).
    """
    ids = np.zeros((len(rows), length), np.int32)
    seg = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, length - len(r):] = r
            seg[i, length - len(r):] = 1
    return ids, seg, np.maximum(np.cumsum(seg, 1) - 1, 0)


class Batcher:
    """Places host arrays on devices: batch-sized arrays split over the mesh's data axes, the rest
    (a shared prefix, scalars) replicated; without a mesh, on the default device. batch_size None: every
    array replicated.

    Args:
      mesh: the (data, fsdp, tensor) Mesh to place on, or None (the default device).
      batch_size: the leading dimension of the arrays that are split over data x fsdp, or None.

    Raises:
      UserError: with a mesh, a batch_size that the mesh's data x fsdp does not divide.
    """

    def __init__(self, mesh, batch_size: int | None):
        self.mesh, self.batch_size = mesh, batch_size
        if mesh is not None and batch_size is not None:
            shd.check_rows(batch_size, mesh, "the batch size")

    def put(self, tree):
        """Committed to their devices, as a program's outputs are: jit keys its programs on that, so a decode
        state that mixed uncommitted inputs with a chunk's outputs would compile the decode loop twice.

        Args:
          tree: a pytree of host arrays and scalars.

        Returns:
          The same tree of committed jax.Arrays: on jax.devices()[0] without a mesh; with one, an array whose
          leading dimension is batch_size split along it over data x fsdp, anything else replicated.
        """
        if self.mesh is None:
            return jax.device_put(tree, jax.devices()[0])
        split = NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda x: jax.device_put(
            x, split if np.ndim(x) and np.shape(x)[0] == self.batch_size else replicated), tree)

    def put_key(self, key):
        """A PRNG key committed as the decode loop's outputs are: on the default device, or replicated over the
        mesh (a jit places it: jax.device_put cannot put an array on other processes' devices).

        Args:
          key: a PRNG key array.

        Returns:
          The same key, committed.
        """
        if self.mesh is None:
            return jax.device_put(key, jax.devices()[0])
        return jax.jit(lambda k: k, out_shardings=NamedSharding(self.mesh, PartitionSpec()))(key)

    def put_cache(self, cache: KVCache) -> KVCache:
        """A cache on its sharding: rows over data x fsdp, KV heads over tensor (a batch-1 shared prefix: rows
        replicated).

        Args:
          cache: a KVCache (on the host or on devices).

        Returns:
          The cache with every array placed by shd.cache_sharding; without a mesh, `cache` itself, unchanged.
        """
        if self.mesh is None:
            return cache
        return jax.tree.map(lambda x: jax.device_put(x, shd.cache_sharding(np.shape(x), self.mesh)), cache)


def shared_len(rows, reuse: bool, cap: int | None = None) -> int:
    """How many leading tokens all rows share and will take from one prefill (0: not worth it).

    Each row keeps at least one own token (or `cap` limits the prefix further).

    Args:
      rows: the token sequences of one group.
      reuse: whether prefixes are shared at all (SamplingConfig.reuse_prefix); False: 0.
      cap: the most tokens the prefix may take, in place of the shortest row's length - 1; None: that.

    Returns:
      The common prefix length (capped) if it is at least MIN_SHARED_PREFIX, else 0; 0 for fewer than 2 rows.
    """
    if not reuse or len(rows) < 2:
        return 0
    n = min(common_prefix_len(rows), min(len(r) for r in rows) - 1 if cap is None else cap)
    return n if n >= MIN_SHARED_PREFIX else 0


def prefill_shared_prefix(graphdef, state, model, prefixes: Sequence[Sequence[int]], mesh) -> SharedPrefix | None:
    """Each group's prefix (one may be empty) prefilled once, as one row of a batch of them (None when all are
    empty).

    Args:
      graphdef, state: `nnx.split(model)`.
      model: the Llama (its config sizes the cache).
      prefixes: G token sequences, one per group of rows.
      mesh: as `prefill`'s.

    Returns:
      A SharedPrefix of G rows, each prefix at the start of bucket(longest prefix, "prefix") slots (positions
      0, 1, ...; segment 0 after it), or None when every prefix is empty.
    """
    longest = max(map(len, prefixes))
    if not longest:
        return None
    padded = bucket(longest, "prefix")
    ids = np.zeros((len(prefixes), padded), np.int32)
    seg = np.zeros((len(prefixes), padded), np.int32)
    for i, p in enumerate(prefixes):
        ids[i, :len(p)], seg[i, :len(p)] = p, 1
    positions = np.broadcast_to(np.arange(padded, dtype=np.int32), ids.shape)
    rows = Batcher(mesh, None)  # the ids on every device; the cache's rows split as cache rows are
    cache = rows.put_cache(KVCache.init(model.config, len(prefixes), padded))
    _, cache = prefill(graphdef, mesh, state, *rows.put((ids, positions, seg)), cache)
    return cache.as_prefix()


def check_lengths(token_rows, extra: int, context: int, what: str = "prompt") -> None:
    """Refuses (UserError) an empty row, or one that with `extra` more tokens exceeds the model's `context`.

    Args:
      token_rows: the token sequences to check.
      extra: tokens each row will be given beyond its own (new tokens, cache slots); 0 for scoring.
      context: the model's context length (max_position_embeddings).
      what: what a row is called in the message ("prompt", "context", ...).

    Raises:
      UserError: the first row that is empty or whose length + extra exceeds context.
    """
    for i, r in enumerate(token_rows):
        if not len(r):
            raise UserError(f"{what} {i} is empty; every {what} needs at least one token")
        over = len(r) + extra - context
        if over > 0:
            more = f" + {extra} new tokens" if extra else ""
            raise UserError(f"{what} {i} has {len(r)} tokens{more}, {over} more than the model's context of "
                            f"{context}; shorten it" + (" or lower max_new_tokens" if extra else ""))
