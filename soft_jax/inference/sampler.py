"""Batched generation on the inference engine: `generate` (strings), `generate_tokens` (token lists) and
`generate_continued` (rows go on after a new head in the same KV cache: SOFT's forced answer, the answer marker
after the thoughts, prefilling only the head's new text).

Rows are sampled in groups of `SamplingConfig.batch_size`, each group's common prefix prefilled once
(`engine.prefill_shared_prefix`); stop strings are checked on the host every STOP_STRING_CHUNK steps.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from soft_jax.core.errors import UserError
from soft_jax.core.settings import SamplingConfig
from soft_jax.inference.engine import (Batcher, DecodeState, bucket, check_lengths, decode, left_pad, prefill,
                                       prefill_shared_prefix, shared_len, stop_ids)
from soft_jax.models.llama import KVCache, Llama
from soft_jax.parallel.distributed import to_host

STOP_STRING_CHUNK = 32  # decode steps between host checks for stop strings


def generate_tokens(model: Llama, token_rows: Sequence[Sequence[int]], config: SamplingConfig, stops,
                    rng=None, mesh=None, tokenizer=None) -> list[list[int]]:
    """New tokens (stop token removed) for prompts given as token lists, sampled as one device batch: in groups of
    config.batch_size, each group's common prefix prefilled once (start).

    With config.stop_strings and a tokenizer, rows stop early once their text contains a stop string
    (checked every STOP_STRING_CHUNK tokens; the caller cuts the text at the stop string).

    Args:
      model: the Llama to sample from.
      token_rows: the prompts' token ids, each non-empty and leaving room for max_new_tokens (check_lengths).
      config: the SamplingConfig (max_new_tokens, temperature, top_p, top_k, stop_strings, batch_size,
        reuse_prefix; seed when rng is None).
      stops: the stop token ids, at least one (the first also fills a stopped row's later steps).
      rng: the PRNG key of the draw; None: jax.random.key(config.seed).
      mesh: the mesh the model is on, or None (one device).
      tokenizer: decodes the rows for config.stop_strings; None: stop strings are not checked.

    Returns:
      Per prompt, in order, its new token ids (at most max_new_tokens) before its first stop token; a row
      stopped by a stop string keeps the tokens up to the check that found it.

    Raises:
      UserError: with a mesh, a batch (config.batch_size rows per group) that its data x fsdp does not divide.
    """
    return _generate_batch(model, token_rows, config, stops, rng, mesh, tokenizer)[0]


def _generate_batch(model: Llama, token_rows, config: SamplingConfig, stops, rng=None, mesh=None, tokenizer=None
                    ) -> tuple[list[list[int]], list[bool]]:
    """generate_tokens' rows, and for each whether it ended with a stop token."""
    batch = start(model, token_rows, config, stops, rng, mesh)
    _sample(batch, config, tokenizer)
    return _rows(batch, stops)


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


def start(model: Llama, token_rows, config: SamplingConfig, stops, rng=None, mesh=None, extra_slots: int = 0
           ) -> Batch:
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

    Returns:
      The Batch, its decode state at step 0: every row's next-token logits, no row done.

    Raises:
      UserError: with a mesh, a batch (config.batch_size rows per group) that its data x fsdp does not divide.
    """
    graphdef, state = nnx.split(model)
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
                                           prefix=prefix))
    ids, seg, positions = left_pad(own, own_len)
    ids, seg, positions = batcher.put((ids, seg, positions + np.repeat(shared, size)[:, None]))
    last, cache = prefill(graphdef, mesh, state, ids, positions, seg, cache)
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
    """Decodes until every row stopped (b.ds updated). Without stop strings one call decodes everything; with
    them, chunks of STOP_STRING_CHUNK steps let the host stop rows early."""
    chunk = STOP_STRING_CHUNK if (config.stop_strings and tokenizer is not None) else config.max_new_tokens
    ds = b.ds
    while True:
        until = jnp.int32(min(int(ds.step) + chunk, config.max_new_tokens))
        ds = decode(b.graphdef, b.mesh, b.state, ds, b.next_pos, b.params, until, config.top_p < 1.0,
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
    last, cache = prefill(b.graphdef, b.mesh, b.state, ids, positions, seg, cache)
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


def generate(model: Llama, tokenizer, prompts: Sequence[str], config: SamplingConfig | None = None,
             add_special_tokens: bool = True, progress: bool = True, mesh=None, return_finish: bool = False,
             **overrides):
    """Completions (strings) for `prompts`, in order. Settings from `config`, overridden by keywords.

    Prompts are processed in batches of config.batch_size; a batch's common token prefix is prefilled once.
    With return_finish, returns (completions, why each stopped: one of FINISH_REASONS); "length" marks a
    completion cut by max_new_tokens, not finished by the model.

    Args:
      model: the Llama to sample from.
      tokenizer: a Hugging Face-style tokenizer: encodes the prompts, decodes the completions, and gives the
        eos id when config.stop_token_ids is None.
      prompts: the prompt strings.
      config: the SamplingConfig; None: SamplingConfig().
      add_special_tokens: passed to the tokenizer when encoding the prompts (e.g. a BOS token).
      progress: whether to show a progress bar.
      mesh: the mesh the model is on, or None (one device; batch_size is then at most len(prompts)).
      return_finish: whether to return why each completion stopped too.
      **overrides: SamplingConfig fields that replace config's.

    Returns:
      The completions, one string per prompt (cut at the first stop string, special tokens skipped); with
      return_finish, (completions, finish reasons: "eos", "stop" or "length" per prompt).

    Raises:
      UserError: an override out of its range, no stop token (no stop_token_ids and no eos id), an empty
        prompt or one that with max_new_tokens exceeds the model's context, or with a mesh a batch size its
        data x fsdp does not divide.
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
    continuation's for continued rows), whether each row was continued).

    Args:
      model: the Llama to sample from.
      tokenizer: a Hugging Face-style tokenizer (encodes with its special tokens, decodes without them).
      prompts: the prompt strings.
      config: the SamplingConfig of both passes (its seed keys the first).
      continue_with: completion string -> the new head string, or None to leave the row as it is.
      continue_seed: the seed of the second pass's key.
      mesh: the mesh the model is on, or None (one device).

    Returns:
      (completions, finishes, continued): one string per prompt (head + continuation for a continued row);
      its finish reason ("eos", "stop" or "length"); whether it was continued. A head whose text after the
      kept tokens is empty or over TAIL_SLOTS tokens is sampled on by `generate` from prompt + head instead.

    Raises:
      UserError: no stop token (no stop_token_ids and no eos id), an empty prompt or one that with
        2 x max_new_tokens + TAIL_SLOTS tokens exceeds the model's context, or with a mesh a batch its data x
        fsdp does not divide.
    """
    stops = config.stop_token_ids or stop_ids(tokenizer, model)
    if not stops:
        raise UserError("no stop token: the tokenizer has no eos token; pass stop_token_ids")
    if mesh is None and len(prompts) <= config.batch_size:
        config = dataclasses.replace(config, batch_size=len(prompts))
    token_rows = [tokenizer(p)["input_ids"] for p in prompts]
    check_lengths(token_rows, 2 * config.max_new_tokens + TAIL_SLOTS, model.config.max_position_embeddings)
    _, sub = jax.random.split(jax.random.key(config.seed))  # generate()'s key for its first batch
    batch = start(model, token_rows, config, stops, sub, mesh, extra_slots=TAIL_SLOTS + config.max_new_tokens)
    _sample(batch, config, tokenizer)
    rows, ended = _rows(batch, stops)
    completions, finishes = _texts(tokenizer, rows, ended, config)
    heads, again = {}, {}
    for i, (tokens, text) in enumerate(zip(rows, completions)):
        head = continue_with(text)
        if head is None:
            continue
        k, rest = kept_tokens(tokenizer, tokens, head)
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
