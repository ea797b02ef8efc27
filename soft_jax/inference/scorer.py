"""Log-likelihood scoring on one jitted model, on the inference engine's prefill and KV-cache machinery.

Requests become unique rows: a context + its continuation less the last token, read at every continuation token;
requests whose rows are equal (one context's single-token answers, or answers differing only in their last
token, as lm-evaluation-harness's HFLM groups them) share it and read their own last tokens. Rows are sorted
so that rows sharing a prefix are neighbours, and split into groups. Stage 1 runs each group's common
prefix once (one cache row per group; what all groups of a chunk share runs once, at batch 1). Stage 2
runs each row's remainder on a copy of its group's cache row, rows of similar length together. Lengths
and row counts are bucketed, so a long request list compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from soft_jax.core.errors import UserError
from soft_jax.inference.engine import (
    MIN_SHARED_PREFIX,
    Batcher,
    bucket,
    check_lengths,
    common_prefix_len,
    left_pad,
    prefill,
    prefill_shared_prefix,
    shared_len,
)
from soft_jax.models.llama import KVCache, Llama
from soft_jax.parallel import sharding as shd
from soft_jax.parallel.distributed import to_host

GROUP_OVERHEAD = 16  # tokens a group costs beyond its prefix (padding, its cache row): the grouping's cost model
GROUP_WINDOW = 8  # rows on each side whose common prefix a group's chunk is expected to run once for all
MAX_GROUP = 64  # rows per group, and groups per chunk, at most
PASS_TOKENS = 8192  # rows x (cached + new) length of one forward pass at most (bounds the KV rows it holds)
ROW_TOKENS = 128  # a pass holds batch_size rows of this many tokens (more shorter rows, fewer longer ones)


def _group(seqs, bounds) -> list[tuple[int, list[int]]]:
    """Splits sorted rows into runs [(prefix length, row indices)] that minimise the tokens run.

    A group runs its common prefix (at most each row's bound) once, less what its neighbourhood shares
    (its chunk runs that once), and each row its remainder; dynamic programming over the split points."""
    n = len(seqs)
    lcp = [0] + [common_prefix_len((seqs[i - 1], seqs[i])) for i in range(1, n)]
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
    order = sorted(groups, key=lambda g: bucket(g[0], "cache"))  # stable: neighbours stay together
    heads = [seqs[rs[0]][:p] for p, rs in order]
    lcp = [common_prefix_len(heads[i:i + 2]) for i in range(len(order) - 1)]
    near = [min(lcp[max(0, i - GROUP_WINDOW):i + GROUP_WINDOW], default=0) for i in range(len(order))]
    chunks, shared = [[order[0]]] if order else [], 0
    for i in range(1, len(order)):
        run = chunks[-1]
        shared = lcp[i - 1] if len(run) == 1 else min(shared, lcp[i - 1])
        unshared = max(p for p, _ in run + [order[i]]) - (shared if shared >= MIN_SHARED_PREFIX else 0)
        if (bucket(order[i][0], "cache") == bucket(run[0][0], "cache")
                and lcp[i - 1] >= max(near[i - 1], near[i]) - GROUP_OVERHEAD
                and len(run) < min(MAX_GROUP, PASS_TOKENS // bucket(unshared, "cache"))):
            run.append(order[i])
        else:
            chunks.append([order[i]])
    return chunks


@dataclasses.dataclass
class _Chunk:
    """Stage 1: group prefixes (`shared` leading tokens common to all, the rest padded to `length`) in cache
    rows of `cache` slots; stage 2: passes (padded length, [(row, group, prefix length)])."""

    heads: list
    shared: int
    length: int
    cache: int
    passes: list


def _plan(seqs, bounds, batch_size: int, multiple: int) -> list[_Chunk]:
    plan = []
    for chunk in _chunks(_group(seqs, bounds), seqs):
        heads = [seqs[rs[0]][:p] for p, rs in chunk]
        shared = shared_len(heads, True, cap=min(map(len, heads)))
        length = bucket(max(map(len, heads)) - shared, "length")
        cache = bucket(length, "cache")
        todo = sorted((len(seqs[r]) - p, r, g, p) for g, (p, rs) in enumerate(chunk) for r in rs)
        passes = []
        while todo:  # from the longest remainder down, as many rows as the pass's length allows
            tail = bucket(todo[-1][0], "tail")
            most = min(batch_size * ROW_TOKENS // tail, PASS_TOKENS // (cache + tail))
            most = max(multiple, 1 << (max(1, most).bit_length() - 1))  # a power of two
            batch, todo = todo[-most:], todo[:-most]
            passes.append((tail, [t[1:] for t in batch]))
        plan.append(_Chunk(heads, shared, length, cache, passes))
    return plan


@functools.partial(jax.jit, static_argnums=(0, 1))
def score_rows(graphdef, mesh, state, heads, which, ids, positions, seg, picks, ends):
    """Log-probabilities read on each row's tokens; row b continues cache row `which[b]` of `heads` (the compiled
    scoring pass; `score_tokens` plans and runs it).

    Args:
      graphdef, state: `nnx.split(model)`; mesh: the mesh the arrays are on, or None (one device) (static).
      heads: a KVCache whose rows hold the group prefixes (after its optional SharedPrefix); each row taken is
        given T more slots here for the new tokens.
      which: [B] int32, the row of `heads` each row continues; None: row b continues row b.
      ids, positions, seg: [B, T] int32, each row's remainder left-padded (segment 0 = padding).
      picks: [B, W] int32, W <= T: the token read after each of the last W columns but the last (-1: not read, 0
        returned); only those columns are computed past the layers.
      ends: [B, E] int32: tokens read after the last column (several requests may end on one row: their
        continuations differ in their last token only).

    Returns:
      ((float32 log-probabilities, bool greedy) [B, W] at the columns, the same [B, E] after the last column): the
      log-probability of each pick as the token after its column, and whether it is the model's argmax there
      (lm-evaluation-harness's is_greedy; True where not read).
    """
    with shd.activation_sharding(mesh):
        return _score_body(graphdef, state, heads, which, ids, positions, seg, picks, ends)


def _score_body(graphdef, state, heads, which, ids, positions, seg, picks, ends):
    new = ids.shape[1]

    def take(x, axis=0):  # which None: row b continues cache row b (already on its device)
        rows = x if which is None else jnp.take(x, which, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis + 1] = (0, new)
        return shd.constrain(jnp.pad(rows, pad), shd.CACHE_AXES[x.ndim])

    stacked = lambda x: take(x, axis=1 if x.ndim == 5 else 0)  # stacked layers' caches: rows are axis 1
    cache = KVCache(k=jax.tree.map(stacked, heads.k), v=jax.tree.map(stacked, heads.v), positions=take(heads.positions),
                    segment_ids=take(heads.segment_ids), index=heads.index, prefix=heads.prefix)
    # only the last W columns are read (a multiple-choice continuation is a few tokens after a longer context), so
    # the final norm and the vocabulary matmul run there alone
    width = picks.shape[1]
    if width == 1:
        logits, _ = nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=seg, cache=cache, last_only=True)
    else:
        at = jnp.broadcast_to(jnp.arange(new - width, new, dtype=jnp.int32), picks.shape)
        logits, _ = nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=seg, cache=cache, at=at)
    norm = jax.nn.logsumexp(logits, axis=-1)
    top = jnp.argmax(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(picks, 0)[..., None], axis=-1)[..., 0] - norm
    columns = (jnp.where(picks >= 0, picked, 0.0), (top == picks) | (picks < 0))
    last = (jnp.take_along_axis(logits[:, -1], ends, axis=-1) - norm[:, -1:], top[:, -1:] == ends)
    return columns, last


def _score_tokens(model: Llama, split, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                  batch_size: int = 16, mesh=None, progress: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-token log-probabilities of each continuation given its context (token lists), and whether each
    continuation is the model's greedy one.

    Each distinct token sequence runs once, and a prefix several share runs once for all of them (see the
    section comment). batch_size: rows per forward pass at most (fewer for long rows; with a mesh, a
    multiple of its data axes).

    Args:
      model: the Llama to score with.
      split: `nnx.split(model)`.
      contexts: each request's context token ids.
      continuations: each request's continuation token ids (the tokens scored).
      batch_size: rows per forward pass at most, as above.
      mesh: the mesh the model is on, or None (one device).
      progress: whether to show a progress bar.

    Returns:
      (per request, in order, a float32 array [len(continuation)]: the log-probability of each continuation
      token given the context and the continuation tokens before it (empty for an empty continuation); bool
      [requests]: every continuation token is the argmax after what precedes it).

    Raises:
      UserError: an empty context, or with a mesh a batch_size its data x fsdp does not divide.
    """
    multiple = 1
    if mesh is not None:
        multiple = mesh.shape["data"] * mesh.shape["fsdp"]
        Batcher(mesh, batch_size)  # refuses a batch size the data axes do not divide
    # Unique rows: a context + its continuation less the last token -> request indices. The row runs once and is
    # read from its bound on: after each column the next token of the row, and after its last column every
    # request's last token (as lm-evaluation-harness groups them: answers " 82" and " 85" end one row " 8").
    rows: dict[tuple, list[int]] = {}
    for i, (c, k) in enumerate(zip(contexts, continuations)):
        if not len(c):
            raise UserError(f"context {i} is empty; every context needs at least one token")
        if len(k):
            rows.setdefault(tuple(c) + tuple(k[:-1]), []).append(i)
    seqs = sorted(rows)
    bounds = [min(len(contexts[i]) for i in rows[s]) - 1 for s in seqs]
    ends = [sorted({continuations[i][-1] for i in rows[s]}) for s in seqs]
    width = max(map(len, ends), default=1)
    graphdef, state = split
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(contexts)
    greedy = np.ones(len(contexts), bool)
    bar = tqdm(total=len(seqs), desc="scoring", unit="row", disable=not progress)

    def prefill_heads(chunk, shared, heads):
        """Cache rows holding `heads` (group prefixes past the chunk's shared tokens), after `shared`."""
        n = bucket(len(heads), "rows", multiple)
        batcher = Batcher(mesh, n)
        cache = batcher.put_cache(KVCache.init(model.config, n, chunk.cache, prefix=shared))
        ids, seg, positions = left_pad(list(heads) + [()] * (n - len(heads)), chunk.length)
        return prefill(graphdef, mesh, state, *batcher.put((ids, positions + chunk.shared, seg)), cache)[1]

    # With batch rows on several devices, a row reading another row's cache would gather every group's cache
    # onto every device (the whole cache, for each layer). There each pass prefills its own rows' group
    # prefixes instead, so a row's cache is on its device; the prefix all groups share still runs once.
    local = multiple > 1
    for chunk in _plan(seqs, bounds, batch_size, multiple):
        shared = prefill_shared_prefix(graphdef, state, model, [chunk.heads[0][:chunk.shared]], mesh)
        if not local:
            heads = prefill_heads(chunk, shared, [h[chunk.shared:] for h in chunk.heads])
        for tail, batch in chunk.passes:
            n = bucket(len(batch), "rows", multiple)
            if local:  # the prefill donates its cache, the shared prefix with it: take it back from its output
                heads = prefill_heads(chunk, shared, [chunk.heads[g][chunk.shared:] for _, g, _ in batch])
                shared = heads.prefix
            ids, seg, positions = left_pad([seqs[r][p:] for r, _, p in batch] + [()] * (n - len(batch)), tail)
            positions += np.asarray([p for *_, p in batch] + [0] * (n - len(batch)))[:, None]
            which = np.asarray([g for _, g, _ in batch] + [0] * (n - len(batch)), np.int32)
            # columns read: the last `cols` of the pass (each row's columns from its bound on, right-aligned); the
            # picks there are the row's own next tokens, and after the last column its requests' last tokens
            longest = max(len(seqs[r]) - bounds[r] for r, _, _ in batch)
            cols = min(tail, 1 << (longest - 1).bit_length())  # a power of two
            picks, last = np.full((n, cols), -1, np.int32), np.zeros((n, width), np.int32)
            for row, (r, _, _) in enumerate(batch):
                read = seqs[r][bounds[r] + 1:]
                picks[row, cols - 1 - len(read):cols - 1] = read
                last[row, :len(ends[r])] = ends[r]
            (logp, top), (end_logp, end_top) = jax.tree.map(to_host, score_rows(
                graphdef, mesh, state, heads, *Batcher(mesh, n).put((None if local else which, ids, positions, seg,
                                                                      picks, last))))
            for row, (r, _, _) in enumerate(batch):
                for i in rows[seqs[r]]:
                    k, e = continuations[i], ends[r].index(continuations[i][-1])
                    at = slice(cols - len(k), cols - 1)
                    out[i] = np.append(logp[row, at], end_logp[row, e])
                    greedy[i] = top[row, at].all() and end_top[row, e]
            bar.update(len(batch))
    bar.close()
    return out, greedy


def score_ids(tokenizer, contexts: Sequence[str], continuations: Sequence[str]) -> tuple[list, list]:
    """(context token lists, continuation token lists) that `score` runs: each context's trailing whitespace
    (whatever str.rstrip() removes, newlines too, as lm-evaluation-harness's _encode_pair moves) goes onto
    the front of its continuation. So "A: " + "The" is "A:" + " The", the natural boundary, not "A:", " "
    then "The". As the harness does, the continuation's tokens are those of the whole string after the
    context's (a SentencePiece tokenizer would give a continuation tokenized alone a word-start marker it
    does not have in the text); where the whole string's tokens do not start with the context's, the
    continuation is tokenized alone. No special tokens are added. A whitespace-only context keeps it.

    Args:
      tokenizer: a Hugging Face-style tokenizer (called on a string, gives "input_ids").
      contexts: the context strings.
      continuations: the continuation strings, paired with `contexts`.

    Returns:
      (context token lists, continuation token lists), one of each per pair, in order.
    """
    ctx, cont = [], []
    for c, k in zip(contexts, continuations):
        cut = len(c.rstrip()) or len(c)
        head = tokenizer(c[:cut], add_special_tokens=False)["input_ids"]
        whole = tokenizer(c + k, add_special_tokens=False)["input_ids"]
        natural = whole[:len(head)] == head and len(whole) > len(head)
        ctx.append(head)
        cont.append(whole[len(head):] if natural else tokenizer(c[cut:] + k, add_special_tokens=False)["input_ids"])
    return ctx, cont


@dataclasses.dataclass(frozen=True)
class ScoreOutput:
    """What one Scorer call gives, one entry per (context, continuation) request, in order.

    Attributes:
      logprobs: float32 [requests]: each continuation's summed log-probability given its context.
      per_token: per request, float32 [continuation tokens]: each token's log-probability given the context and
        the continuation tokens before it.
      greedy: bool [requests]: every continuation token is the model's argmax after what precedes it (greedy
        decoding would produce the continuation; lm-evaluation-harness's is_greedy).
    """

    logprobs: np.ndarray
    per_token: list[np.ndarray]
    greedy: np.ndarray


class Scorer:
    """Log-likelihoods of continuations under one model: the model split once and held with its tokenizer, mesh
    and batch size; the jitted prefill and scoring programs are compiled once per shape and reused.

    Args:
      model: the Llama to score with.
      tokenizer: a Hugging Face-style tokenizer for string requests (see `score_ids`); None: token ids only.
      mesh: the mesh the model is on, or None (one device).
      batch_size: rows per forward pass at most (fewer for long rows; with a mesh, a multiple of its data x
        fsdp; without one, at most the number of requests).
    """

    def __init__(self, model: Llama, tokenizer=None, mesh=None, batch_size: int = 16):
        self.model, self.tokenizer, self.mesh, self.batch_size = model, tokenizer, mesh, batch_size
        self.split = nnx.split(model)

    def __call__(self, contexts: Sequence[str], continuations: Sequence[str], progress: bool = False
                 ) -> ScoreOutput:
        """Scores string requests. Tokens are those of `score_ids`: the context's trailing whitespace moves onto
        the continuation, no special tokens are added; the continuation's log-probability includes the moved
        whitespace's.

        Raises:
          UserError: contexts and continuations of different lengths; no tokenizer; a context or continuation
            with no tokens, or one (or a context + continuation) longer than the model's context; with a mesh,
            a batch_size its data x fsdp does not divide.
        """
        if len(contexts) != len(continuations):
            raise UserError(f"score: {len(contexts)} contexts but {len(continuations)} continuations")
        if self.tokenizer is None:
            raise UserError("score: string requests need a tokenizer; give the Scorer one, or score token ids")
        ctx, cont = score_ids(self.tokenizer, contexts, continuations)
        limit = self.model.config.max_position_embeddings
        check_lengths(ctx, 0, limit, "context")
        check_lengths(cont, 0, limit, "continuation")
        check_lengths([a + b for a, b in zip(ctx, cont)], 0, limit, "row")
        size = self.batch_size if self.mesh is not None else max(1, min(self.batch_size, len(ctx)))
        return _output(*_score_tokens(self.model, self.split, ctx, cont, size, self.mesh, progress))

    def tokens(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
               progress: bool = False) -> ScoreOutput:
        """Scores token-id requests (an empty continuation scores 0 with no tokens), batch_size rows at most.

        Raises:
          UserError: an empty context, or with a mesh a batch_size its data x fsdp does not divide.
        """
        return _output(*_score_tokens(self.model, self.split, contexts, continuations, self.batch_size, self.mesh,
                                      progress))


def _output(per: list[np.ndarray], greedy: np.ndarray) -> ScoreOutput:
    return ScoreOutput(np.asarray([p.sum() for p in per], np.float32), per, greedy)


def score(model: Llama, tokenizer, contexts: Sequence[str], continuations: Sequence[str], batch_size: int = 16,
          mesh=None, progress: bool = False) -> np.ndarray:
    """The summed log-probabilities of `Scorer(model, tokenizer, mesh, batch_size)(contexts, continuations)`."""
    return Scorer(model, tokenizer, mesh, batch_size)(contexts, continuations, progress).logprobs


def score_tokens(model: Llama, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                 batch_size: int = 16, mesh=None, progress: bool = False) -> list[np.ndarray]:
    """The per-token log-probabilities of `Scorer(model, None, mesh, batch_size).tokens(contexts, continuations)`."""
    return Scorer(model, None, mesh, batch_size).tokens(contexts, continuations, progress).per_token
