"""Batched generation on the inference engine: a `Sampler` holds the split model, its tokenizer, mesh and
SamplingConfig; a call returns a `SampleOutput` (texts, token ids, finish reasons, which rows were continued).
Rows can go on after a new head in the same KV cache (`continue_with`: SOFT's forced answer, the answer marker
after the thoughts, prefilling only the head's new text). `generate` and `generate_tokens` are one-line
conveniences over it.

Rows are sampled in groups of `SamplingConfig.batch_size`, each group's common prefix prefilled once
(`engine.prefill_shared_prefix`); stop strings are checked on the host every STOP_STRING_CHUNK steps.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from soft_jax.core.errors import UserError, check_fields
from soft_jax.inference.engine import (
    Batcher,
    DecodeState,
    bucket,
    check_lengths,
    decode,
    left_pad,
    prefill,
    prefill_shared_prefix,
    segment,
    shared_len,
    stop_ids,
)
from soft_jax.models.llama import KV_DTYPES, KVCache, Llama
from soft_jax.parallel.distributed import to_host

STOP_STRING_CHUNK = 32  # decode steps between host checks for stop strings


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
    # the KV cache's storage: "model" (the model's compute dtype) | "int8" (codes + a float32 scale per slot and
    # head: about half the bytes a decode step reads; the tokens may differ from "model"'s). Scoring never uses it.
    kv_dtype: str = "model"
    # decode runs in segments, each reading the cache slots written so far up to the next multiple of this
    # (engine.segment): larger, fewer compiled decode programs; smaller, fewer empty slots read. 0: one segment
    # that reads the whole cache at every step.
    decode_segment: int = 128

    RULES = [
        ("max_new_tokens", lambda v: v >= 1, ">= 1"),
        ("temperature", lambda v: v >= 0, ">= 0 (0 = greedy)"),
        ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
        ("top_k", lambda v: v >= 0, ">= 0 (0 = off)"),
        ("batch_size", lambda v: v >= 1, ">= 1"),
        ("kv_dtype", lambda v: v in KV_DTYPES, f"one of {', '.join(KV_DTYPES)}"),
        ("decode_segment", lambda v: v >= 0, ">= 0 (0 = the whole cache at every step)"),
    ]

    def __post_init__(self):
        check_fields(self, self.RULES)


@dataclasses.dataclass
class Batch:
    """A batch being sampled, its KV cache on the device: rows can go on sampling in it (_continue).

    Attributes:
      graphdef, state: `nnx.split(model)`.
      mesh: the mesh the batch is on, or None (one device).
      batcher: places the batch's arrays (its batch size: all B rows, padding rows included).
      params: decode's (temperature, top_p, top_k, stop ids) as device arrays.
      ds: the DecodeState of the last pass (cache, logits, tokens, done rows).
      next_pos: [B] int32 on the device, the position of each row's first token of this pass.
      first_pos: [B] int32 on the host, the same.
      own_len: the cache slots of each row's own (left-padded, bucketed) prompt, before the first sampled token.
      index: for each prompt, in order, its batch row.
    """

    graphdef: object
    state: object
    mesh: object
    batcher: Batcher
    params: tuple  # decode's (temperature, top_p, top_k, stop ids)
    ds: DecodeState
    next_pos: object  # [B] on device: the position of each row's first token of this pass
    first_pos: np.ndarray  # [B] on host: the same
    own_len: int  # cache slots before the first sampled token
    index: list  # the batch row of each prompt (groups are padded to the batch size)


def start(model: Llama, token_rows, config: SamplingConfig, stops, rng=None, mesh=None, extra_slots: int = 0,
          split: tuple | None = None) -> Batch:
    """The batch's prompts prefilled; room for max_new_tokens + extra_slots more tokens.

    Rows come in groups of config.batch_size (the last may be shorter): each group is padded to batch_size
    with copies of its first row (fixed shapes), and its common prefix is prefilled once and shared by its rows.

    Args:
      model: the Llama to sample from.
      token_rows: the prompts' token ids (non-empty; check_lengths is the caller's).
      config: the SamplingConfig (batch_size, reuse_prefix, max_new_tokens, temperature, top_p, top_k; seed
        when rng is None).
      stops: the stop token ids, at least one; the first fills `out` before a row's tokens are sampled.
      rng: the PRNG key of the draw; None: jax.random.key(config.seed).
      mesh: the mesh the model is on, or None (one device).
      extra_slots: cache slots beyond the prompts' and max_new_tokens (for rows that go on: _continue).
      split: `nnx.split(model)` when the caller holds it (a Sampler); None: split here.

    Returns:
      The Batch, its decode state at step 0: every row's next-token logits, no row done.

    Raises:
      UserError: with a mesh, a batch (config.batch_size rows per group) that its data x fsdp does not divide.
    """
    graphdef, state = split or nnx.split(model)
    size = config.batch_size
    groups = [[list(r) for r in token_rows[lo:lo + size]] for lo in range(0, len(token_rows), size)]
    groups = [g + [g[0]] * (size - len(g)) for g in groups]
    rows = [r for g in groups for r in g]
    batcher = Batcher(mesh, len(rows))
    shared = [shared_len(g, config.reuse_prefix) for g in groups]
    own = [r[shared[i // size]:] for i, r in enumerate(rows)]
    own_len = bucket(max(map(len, own)))
    prefix = prefill_shared_prefix(graphdef, state, model, [g[0][:n] for g, n in zip(groups, shared)], mesh)
    cache = batcher.put_cache(KVCache.init(model.config, len(rows), own_len + config.max_new_tokens + extra_slots,
                                           config.kv_dtype, prefix=prefix))
    ids, seg, positions = left_pad(own, own_len)
    ids, seg, positions = batcher.put((ids, seg, positions + np.repeat(shared, size)[:, None]))
    last, cache = prefill(graphdef, mesh, state, ids, positions, seg, cache, own_len if config.decode_segment else None)
    params = (jnp.float32(config.temperature), jnp.float32(config.top_p), jnp.int32(config.top_k),
              jnp.asarray(stops, jnp.int32))
    first_pos = np.asarray([len(r) for r in rows], np.int32)
    rng = jax.random.key(config.seed) if rng is None else rng
    b = len(rows)
    step, done, out = batcher.put((np.int32(0), np.zeros(b, bool), np.full((b, config.max_new_tokens), stops[0],
                                                                         np.int32)))
    ds = DecodeState(step=step, cache=cache, logits=last, done=done, out=out, rng=batcher.put_key(rng))
    index = [g * size + i for g in range(len(groups)) for i in range(min(size, len(token_rows) - g * size))]
    return Batch(graphdef, state, mesh, batcher, params, ds, batcher.put(first_pos), first_pos, own_len, index)


def _sample(b: Batch, config: SamplingConfig, tokenizer=None) -> None:
    """Decodes until every row stopped (b.ds updated), in segments (engine.segment): each decode call reads the
    cache up to the next window bound, and stops where its writes reach it. With stop strings, the host checks
    the rows every STOP_STRING_CHUNK steps and stops those that produced one."""
    chunk = STOP_STRING_CHUNK if (config.stop_strings and tokenizer is not None) else config.max_new_tokens
    ds = b.ds
    slots, start, step = ds.cache.segment_ids.shape[1], int(ds.cache.index), int(ds.step)
    while True:
        window = segment(start + step, slots, config.decode_segment) if config.decode_segment else None
        until = min(-(-(step + 1) // chunk) * chunk, config.max_new_tokens,
                    window - start if window else config.max_new_tokens)
        ds = decode(b.graphdef, b.mesh, b.state, ds, b.next_pos, b.params, jnp.int32(until), config.top_p < 1.0,
                    config.top_k > 0, window)
        step, done = int(ds.step), to_host(ds.done).copy()
        if step >= config.max_new_tokens or done.all():
            break
        if step % chunk:  # a segment's end between two checks
            continue
        out = to_host(ds.out)
        for i in np.flatnonzero(~done):
            text = tokenizer.decode(out[i, :step], skip_special_tokens=True)
            done[i] = any(stop in text for stop in config.stop_strings)
        ds = ds.replace(done=b.batcher.put(done))
    b.ds = ds


def _rows(b: Batch, stops) -> tuple[list[list[int]], list[bool]]:
    """Each prompt's new tokens of the last pass (stop token removed), and whether each ended on one."""
    results, ended = [], []
    for row in to_host(b.ds.out)[b.index, :int(b.ds.step)]:
        hits = np.flatnonzero(np.isin(row, stops))
        results.append(row[:hits[0]].tolist() if hits.size else row.tolist())
        ended.append(bool(hits.size))
    return results, ended


TAIL_SLOTS = 16  # cache slots for a continued row's new head text (after the sampled tokens it keeps)


def _continue(b: Batch, heads: dict, config: SamplingConfig, rng, tokenizer=None) -> None:
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
    ids, seg, positions = left_pad(tails, TAIL_SLOTS)
    ids, seg, positions = b.batcher.put((ids, seg, positions + base[:, None]))
    window = segment(int(ds.cache.index) + TAIL_SLOTS - 1, slots, config.decode_segment)
    last, cache = prefill(b.graphdef, b.mesh, b.state, ids, positions, seg, cache,
                          window if config.decode_segment else None)
    first_pos = base + np.asarray([len(t) for t in tails], np.int32)
    done = np.asarray([i not in heads for i in range(rows)])
    step, done, out = b.batcher.put((np.int32(0), done, np.full(ds.out.shape, int(b.params[3][0]), np.int32)))
    b.ds = DecodeState(step=step, cache=cache, logits=last, done=done, out=out, rng=b.batcher.put_key(rng))
    b.next_pos, b.first_pos = b.batcher.put(first_pos), first_pos
    _sample(b, config, tokenizer)


def kept_tokens(tokenizer, tokens, head: str) -> tuple[int, str]:
    """(k, rest): the most leading `tokens` whose text begins `head` and leaves some of it (the next token's
    logits come from prefilling that rest), and the text of `head` after them.

    Args:
      tokenizer: decodes the tokens (special tokens skipped).
      tokens: a row's sampled token ids.
      head: the text the completion becomes.

    Returns:
      (k, rest): k in [0, len(tokens)], the largest whose decoded text is a proper prefix of `head`, and
      head[len(that text):]; (0, head) when none is.
    """
    for k in range(len(tokens), -1, -1):
        text = tokenizer.decode(tokens[:k], skip_special_tokens=True)
        if head.startswith(text) and len(text) < len(head):
            return k, head[len(text):]
    return 0, head


def _cut_at_stop_strings(text: str, stop_strings) -> str:
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


FINISH_REASONS = ("eos", "stop", "length")  # a stop token, a stop string, the max_new_tokens limit


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """What one Sampler call gives, one entry per prompt, in order.

    Attributes:
      texts: the completions, special tokens skipped and cut at the first stop string; a continued row's is its
        head followed by its continuation; "" for every row when the Sampler has no tokenizer.
      tokens: the new token ids of the first pass, before the first stop token (a row stopped by a stop string
        keeps the tokens up to the check that found it).
      finish: why each completion stopped, one of FINISH_REASONS ("length": cut by max_new_tokens, not finished
        by the model); a continued row's is its continuation's.
      continued: whether `continue_with` gave the row a new head (all False without it).
    """

    texts: list[str]
    tokens: list[list[int]]
    finish: list[str]
    continued: list[bool]


class Sampler:
    """Samples completions from one model: the model split once (`nnx.split`) and held with its tokenizer, mesh
    and SamplingConfig; the jitted prefill and decode programs (soft_jax.inference.engine) are compiled once per
    shape and reused by every call.

    Args:
      model: the Llama to sample from.
      tokenizer: a Hugging Face-style tokenizer: encodes string prompts, decodes completions, gives the eos id
        when config.stop_token_ids is None. None: token-id prompts only, and `texts` are empty.
      config: the SamplingConfig; None: SamplingConfig(). A call's keywords override it.
      mesh: the mesh the model is on, or None (one device; batch_size is then at most the number of prompts).

    Raises:
      UserError: no stop token (no config.stop_token_ids and no eos id).
    """

    def __init__(self, model: Llama, tokenizer=None, config: SamplingConfig | None = None, mesh=None):
        self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
        self.config = config or SamplingConfig()
        self.split = nnx.split(model)

    def _setup(self, prompts, add_special_tokens: bool, room, overrides: dict, shrink: bool = True
               ) -> tuple[SamplingConfig, tuple, list]:
        """(the call's config, stop ids, prompt token rows); room: config -> the tokens each row needs past its
        prompt (None: max_new_tokens); shrink: without a mesh, batch_size at most the number of rows."""
        config = dataclasses.replace(self.config, **overrides)
        stops = config.stop_token_ids or (stop_ids(self.tokenizer, self.model) if self.tokenizer is not None else ())
        if not stops:
            raise UserError("no stop token: the tokenizer has no eos token; pass stop_token_ids")
        rows = [self.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] if isinstance(p, str)
                else list(p) for p in prompts]
        check_lengths(rows, room(config) if callable(room) else config.max_new_tokens,
                      self.model.config.max_position_embeddings)
        if shrink and self.mesh is None:  # no padding rows for short lists; a mesh keeps the divisible batch size
            config = dataclasses.replace(config, batch_size=max(1, min(config.batch_size, len(rows))))
        return config, tuple(stops), rows

    def __call__(self, prompts: Sequence[str] | Sequence[Sequence[int]], *, add_special_tokens: bool = True,
                 progress: bool = False, continue_with: Callable[[str], str | None] | None = None,
                 continue_seed: int = 0, **overrides) -> SampleOutput:
        """Completions for `prompts` (strings, or token id lists). Settings: the Sampler's config, overridden
        by keywords (SamplingConfig fields).

        Without `continue_with`, prompts go in batches of batch_size, each with its own key split off
        jax.random.key(seed), a batch's common token prefix prefilled once.

        With `continue_with` (completion text -> the text it becomes, or None to leave it), every prompt is
        sampled in one device batch: groups of batch_size in it (a SOFT round's batches, each sharing its
        principles + exemplars), each group's prefix prefilled once; the first group draws as it would without
        `continue_with`. Then each row given a new head samples max_new_tokens more after it in the same KV
        cache, keyed by `continue_seed`: the sampled tokens the head keeps are not prefilled again, only its
        new text is (SOFT's forced answer: the thoughts, then the answer marker). A head whose new text is
        empty or over TAIL_SLOTS tokens is sampled on from prompt + head instead. Needs a tokenizer.

        Args:
          prompts: the prompt strings (encoded with add_special_tokens) or token id lists.
          add_special_tokens: passed to the tokenizer when encoding string prompts (e.g. a BOS token).
          progress: whether to show a progress bar (per batch; not with continue_with).
          continue_with: see above; None: no second pass.
          continue_seed: the seed of the second pass's key.
          **overrides: SamplingConfig fields that replace the Sampler's.

        Returns:
          A SampleOutput.

        Raises:
          UserError: an override out of its range, no stop token, an empty prompt or one that with
            max_new_tokens (with continue_with: 2 x max_new_tokens + TAIL_SLOTS) exceeds the model's context,
            or with a mesh a batch size its data x fsdp does not divide.
        """
        if continue_with is not None:
            return self._continued(prompts, continue_with, continue_seed, add_special_tokens, overrides)
        config, stops, rows = self._setup(prompts, add_special_tokens, None, overrides)
        out = SampleOutput([], [], [], [False] * len(rows))
        key = jax.random.key(config.seed)
        new_tokens, t0 = 0, time.perf_counter()
        bar = tqdm(total=len(rows), desc="generating", unit="prompt", disable=not progress)
        for lo in range(0, len(rows), config.batch_size):
            key, sub = jax.random.split(key)
            batch = self._pass(rows[lo:lo + config.batch_size], config, stops, sub)
            tokens, ended = _rows(batch, stops)
            texts, why = self._texts(tokens, ended, config)
            out.texts.extend(texts)
            out.tokens.extend(tokens)
            out.finish.extend(why)
            new_tokens += sum(len(r) for r in tokens)
            bar.update(len(tokens))
            bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
        bar.close()
        return out

    def sample_tokens(self, token_rows: Sequence[Sequence[int]], rng=None, **overrides) -> SampleOutput:
        """`token_rows` sampled as one device batch (groups of batch_size in it, each group's common prefix
        prefilled once), with the key `rng` (None: jax.random.key(seed)). Stop strings are checked when the
        Sampler has a tokenizer. Raises as __call__."""
        config, stops, rows = self._setup(token_rows, False, None, overrides, shrink=False)
        batch = self._pass(rows, config, stops, jax.random.key(config.seed) if rng is None else rng)
        tokens, ended = _rows(batch, stops)
        texts, finish = self._texts(tokens, ended, config)
        return SampleOutput(texts, tokens, finish, [False] * len(tokens))

    def _pass(self, rows, config: SamplingConfig, stops, rng, extra_slots: int = 0) -> Batch:
        batch = start(self.model, rows, config, stops, rng, self.mesh, extra_slots=extra_slots, split=self.split)
        _sample(batch, config, self.tokenizer)
        return batch

    def _texts(self, rows, ended, config: SamplingConfig) -> tuple[list[str], list[str]]:
        if self.tokenizer is None:
            return [""] * len(rows), ["eos" if e else "length" for e in ended]
        return _texts(self.tokenizer, rows, ended, config)

    def _continued(self, prompts, continue_with, continue_seed: int, add_special_tokens: bool, overrides: dict
                   ) -> SampleOutput:
        if self.tokenizer is None:
            raise UserError("continue_with needs a tokenizer: the heads are text")
        config, stops, rows = self._setup(prompts, add_special_tokens,
                                          lambda c: 2 * c.max_new_tokens + TAIL_SLOTS, overrides)
        _, sub = jax.random.split(jax.random.key(config.seed))  # the key of __call__'s first batch
        batch = self._pass(rows, config, stops, sub, extra_slots=TAIL_SLOTS + config.max_new_tokens)
        tokens, ended = _rows(batch, stops)
        completions, finishes = _texts(self.tokenizer, tokens, ended, config)
        heads, again = {}, {}
        for i, (row, text) in enumerate(zip(tokens, completions)):
            head = continue_with(text)
            if head is None:
                continue
            k, rest = kept_tokens(self.tokenizer, row, head)
            tail = self.tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
            if 0 < len(tail) <= TAIL_SLOTS:
                heads[i] = (k, tail)
            else:  # a head that rewrites more than the end of the completion: prefilled afresh below
                again[i] = head
            completions[i] = head
        if heads:
            _continue(batch, heads, config, jax.random.key(continue_seed), self.tokenizer)
            more, why = _texts(self.tokenizer, *_rows(batch, stops), config)
            for i in heads:
                completions[i], finishes[i] = completions[i] + more[i], why[i]
        if again:
            order = sorted(again)
            if all(isinstance(p, str) for p in prompts):  # the prompt + head text, encoded as one string
                redo = [prompts[i] + again[i] for i in order]
            else:
                redo = [rows[i] + self.tokenizer(again[i], add_special_tokens=False)["input_ids"] for i in order]
            more = self(redo, add_special_tokens=add_special_tokens, **{**overrides, "seed": continue_seed})
            for i, m, w in zip(order, more.texts, more.finish):
                completions[i], finishes[i] = completions[i] + m, w
        return SampleOutput(completions, tokens, finishes, [i in heads or i in again for i in range(len(rows))])


def generate(model: Llama, tokenizer, prompts: Sequence[str], config: SamplingConfig | None = None,
             add_special_tokens: bool = True, progress: bool = True, mesh=None, **overrides) -> list[str]:
    """The completions of `Sampler(model, tokenizer, config, mesh)(prompts, ...)`: one string per prompt."""
    return Sampler(model, tokenizer, config, mesh)(prompts, add_special_tokens=add_special_tokens, progress=progress,
                                                   **overrides).texts


def generate_tokens(model: Llama, token_rows: Sequence[Sequence[int]], config: SamplingConfig, stops, rng=None,
                    mesh=None, tokenizer=None) -> list[list[int]]:
    """The new token ids of `Sampler(...).sample_tokens(token_rows, rng)` with stop ids `stops`: one device batch."""
    config = dataclasses.replace(config, stop_token_ids=tuple(stops))
    return Sampler(model, tokenizer, config, mesh).sample_tokens(token_rows, rng).tokens


def _texts(tokenizer, rows, ended, config: SamplingConfig) -> tuple[list[str], list[str]]:
    """Each row's text, cut at the first stop string, and why it stopped (FINISH_REASONS)."""
    texts, why = [], []
    for r, eos in zip(rows, ended):
        text = tokenizer.decode(r, skip_special_tokens=True)
        cut = _cut_at_stop_strings(text, config.stop_strings) if config.stop_strings else text
        texts.append(cut)
        why.append("stop" if len(cut) < len(text) else "eos" if eos else "length")
    return texts, why
