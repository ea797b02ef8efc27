"""Pairs to training rows: rendering in the engraving format, packing examples into fixed-length rows (segment
ids and per-example positions, so attention never crosses examples), the loss rows, and each epoch's order and
batches."""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from soft_jax.core.errors import UserError
from soft_jax.data.templates import engraving_parts
from soft_jax.training.settings import TrainConfig


@dataclasses.dataclass
class Example:
    """One tokenized example: ids and, per token, whether it is a response (loss-bearing) token."""

    ids: list[int]
    is_response: list[bool]




# --- rendering ----------------------------------------------------------------------------------


def render(tokenizer, prompt: str, response: str, config: TrainConfig, finished: bool = True
           ) -> tuple[Example, bool, bool]:
    """(example, prompt truncated?, response truncated?): prompt cut on the left, response on the right.

    Args:
        tokenizer: A transformers tokenizer; its chat template, when it has one, gives the format.
        prompt: The prompt text.
        response: The response text.
        config: The training settings; max_prompt_len and max_response_len are the token limits.
        finished: False when the response was cut short: then it gets no end-of-turn token(s).

    Returns:
        A tuple (example, prompt_truncated, response_truncated): the Example (prompt tokens, then response
        tokens, with `is_response` True on the response tokens), and whether the prompt and the response were cut.
    """
    head, tail, templated = engraving_parts(tokenizer, prompt, response, finished)
    p = tokenizer(head, add_special_tokens=not templated)["input_ids"]
    r = tokenizer(tail, add_special_tokens=False)["input_ids"]
    cut_p, cut_r = len(p) > config.max_prompt_len, len(r) > config.max_response_len
    p, r = p[-config.max_prompt_len:], r[:config.max_response_len]
    return Example(p + r, [False] * len(p) + [True] * len(r)), cut_p, cut_r


def check_overhead(tokenizer, config: TrainConfig) -> None:
    """Refuses maxima that cannot hold the format's own tokens plus one token of content.

    Args:
        tokenizer: A transformers tokenizer, as `render` takes it.
        config: The training settings; max_prompt_len and max_response_len are checked.

    Raises:
        UserError: When a maximum is not above the number of tokens the format takes on its own.
    """
    head, tail, templated = engraving_parts(tokenizer, "", "")
    p = len(tokenizer(head, add_special_tokens=not templated)["input_ids"])
    r = len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    if config.max_prompt_len <= p or config.max_response_len <= r:
        raise UserError(f"max_prompt_len {config.max_prompt_len} / max_response_len {config.max_response_len} leave "
                        f"no room for content: the engraving format alone takes {p} prompt and {r} response tokens; "
                        f"raise them above {p} and {r}")


# --- packing ------------------------------------------------------------------------------------


def pack(examples: Sequence[Example], row_len: int, pack_rows: bool = True,
         keep_order: bool = True) -> dict[str, np.ndarray]:
    """Rows of [n_rows, row_len]: inputs, targets, weights, segment_ids (0 = padding), positions.

    An example's token t predicts its token t + 1 (weight 1 when that token is a response token). With
    keep_order, examples fill rows in the given order (a row is closed at the first example that does not fit):
    step k trains on the k-th stretch of the sequence, as a curriculum needs. Without it, rows are filled best
    fit decreasing: longest example first, each into the fullest row it fits, which leaves a few percent of the
    slots empty where in-order filling of mixed lengths leaves a fifth (every empty slot is computed as if it
    were a token). With pack_rows=False every example gets its own row, in order.

    Args:
        examples: The tokenized examples. Each must fit a row: at most row_len + 1 tokens.
        row_len: The length of a row, in tokens.
        pack_rows: Whether several examples may share a row.
        keep_order: Whether rows hold the examples in the given order (else best fit decreasing).

    Returns:
        A dict of [n_rows, row_len] arrays: "inputs", "targets", "segment_ids" (1, 2, ... per example in the row;
        0 = padding) and "positions" (from 0 in each example) as int32; "weights" as float32 (1.0 where the
        target is a response token, else 0.0). Best fit decreasing gives the rows in the order they were opened
        (the first holds the longest example); shuffle them for training.
    """
    lengths = [len(ex.ids) - 1 for ex in examples]
    if not pack_rows:
        groups = [[i] for i in range(len(examples))]
    elif keep_order:
        groups, used = [], row_len + 1
        for i, n in enumerate(lengths):
            if used + n > row_len:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += n
    else:
        groups = best_fit_decreasing(lengths, row_len)
    rows = [[examples[i] for i in group] for group in groups]
    out = {k: np.zeros((len(rows), row_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    out["weights"] = np.zeros((len(rows), row_len), np.float32)
    for i, row in enumerate(rows):
        at = 0
        for seg, ex in enumerate(row, 1):
            n = len(ex.ids) - 1
            out["inputs"][i, at:at + n] = ex.ids[:-1]
            out["targets"][i, at:at + n] = ex.ids[1:]
            out["weights"][i, at:at + n] = ex.is_response[1:]
            out["segment_ids"][i, at:at + n] = seg
            out["positions"][i, at:at + n] = np.arange(n)
            at += n
    return out


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items taken longest first (ties in the given order), each put into the open bin
    with the least room that still holds it (the first opened among equals), else into a new bin.

    Args:
        lengths: Each item's size, at most `capacity`.
        capacity: A bin's size.

    Returns:
        The bins, in the order they were opened; each lists its items in the order they went in.
    """
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, bin), sorted: the tightest bin that fits is a bisection away
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            bins.append([i])
            left, b = capacity - lengths[i], len(bins) - 1
        else:
            left, b = room.pop(at)
            bins[b].append(i)
            left -= lengths[i]
        bisect.insort(room, (left, b))
    return bins


# --- rows for the loss -------------------------------------------------------------------------


def loss_width(epochs: list[dict[str, np.ndarray]], row_len: int) -> int:
    """How many positions per row the step computes logits at: the most loss-carrying positions of any row,
    rounded up to an eighth of the row (few distinct compiled shapes across rounds), at most the row.

    Args:
        epochs: pack()'s rows, one dict per epoch.
        row_len: The length of a row, in tokens.

    Returns:
        The most loss positions of any row (at least 1), rounded up to a multiple of max(8, row_len // 8),
        at most row_len.
    """
    most = max(int(np.count_nonzero(rows["weights"], axis=1).max(initial=0)) for rows in epochs)
    step = max(8, row_len // 8)
    return min(row_len, -(-max(most, 1) // step) * step)


def loss_rows(rows: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """pack()'s rows as the step takes them: per row the positions with non-zero loss weight (`loss_at`,
    padded with 0 to `width`), their targets and weights (0 where padded); inputs, segments, positions as is.

    Args:
        rows: pack()'s output: [n_rows, row_len] arrays.
        width: The number of loss positions per row, e.g. from `loss_width`.

    Returns:
        A dict with "inputs", "segment_ids" and "positions" ([n_rows, row_len], as given), and "loss_at",
        "loss_targets" (int32) and "loss_weights" (float32), each [n_rows, width].

    Raises:
        ValueError: When a row has more loss positions than `width`.
    """
    n = rows["inputs"].shape[0]
    out = {k: rows[k] for k in ("inputs", "segment_ids", "positions")}
    out["loss_at"], out["loss_targets"] = np.zeros((n, width), np.int32), np.zeros((n, width), np.int32)
    out["loss_weights"] = np.zeros((n, width), np.float32)
    for i in range(n):
        at = np.flatnonzero(rows["weights"][i])
        if len(at) > width:
            raise ValueError(f"row {i} has {len(at)} loss positions, more than the width {width}")
        out["loss_at"][i, :len(at)] = at
        out["loss_targets"][i, :len(at)] = rows["targets"][i, at]
        out["loss_weights"][i, :len(at)] = rows["weights"][i, at]
    return out



# --- epochs -------------------------------------------------------------------------------------


def epoch_order(n: int, config: TrainConfig, epoch: int) -> np.ndarray:
    """The order of the examples in one epoch.

    Args:
        n: The number of examples.
        config: The training settings: order ("given" or "shuffle") and seed.
        epoch: The 0-based epoch; each epoch gets its own shuffle.

    Returns:
        The example indices, [n]: 0..n-1 in order for "given", else a permutation seeded by (seed, epoch).
    """
    if config.order == "given":
        return np.arange(n)
    return np.random.default_rng([config.seed, epoch]).permutation(n)


def epoch_rows(examples: Sequence[Example], config: TrainConfig, epoch: int) -> dict[str, np.ndarray]:
    """One epoch's packed rows, in the order the steps take them.

    With order "given" the rows hold the examples in order (a curriculum's steps go easy to hard). With
    "shuffle" the examples of the epoch's shuffle are packed best fit decreasing (few empty slots) and the rows
    are then shuffled too, so that the longest examples do not all come first.

    Args:
        examples: The rendered examples, in the order of the pairs.
        config: The training settings: order, pack, row_len and seed.
        epoch: The 0-based epoch; each gets its own shuffle.

    Returns:
        pack()'s dict of [n_rows, row_len] arrays.
    """
    order = epoch_order(len(examples), config, epoch)
    shuffled = config.order != "given"
    rows = pack([examples[i] for i in order], config.row_len, config.pack, keep_order=not shuffled)
    if shuffled and config.pack:
        rows = {k: v[np.random.default_rng([config.seed, epoch, 1]).permutation(len(v))] for k, v in rows.items()}
    return rows


def prepare(tokenizer, pairs: Sequence[tuple], config: TrainConfig):
    """Rendered examples and the per-epoch packed rows (as loss_rows, one width for all); counts truncation.

    pairs: (prompt, response) or (prompt, response, finished); finished=False trains no end of turn.

    Args:
        tokenizer: A transformers tokenizer.
        pairs: The training pairs, as above.
        config: The training settings.

    Returns:
        A tuple (examples, epochs, (truncated_prompts, truncated_responses)): the rendered Examples in the
        order of `pairs`, one loss_rows() dict per epoch (`epoch_rows`, in step order), and how many prompts
        and responses were cut.

    Raises:
        UserError: When `pairs` is empty, or the maxima cannot hold the format (`check_overhead`).
    """
    if not pairs:
        raise UserError("the training set is empty (every example was filtered out); check the filters' counts "
                        "or feed more prompts")
    check_overhead(tokenizer, config)
    rendered = [render(tokenizer, p, r, config, *finished) for p, r, *finished in pairs]
    examples = [e for e, _, _ in rendered]
    stats = (sum(c for _, c, _ in rendered), sum(c for _, _, c in rendered))
    epochs = [epoch_rows(examples, config, e) for e in range(config.epochs)]
    width = loss_width(epochs, config.row_len)
    return examples, [loss_rows(rows, width) for rows in epochs], stats


def total_steps(epochs: list[dict[str, np.ndarray]], config: TrainConfig) -> int:
    """The number of optimizer steps of a run.

    Args:
        epochs: prepare()'s per-epoch rows.
        config: The training settings: batch_size, epochs and max_steps.

    Returns:
        ceil(rows of the first epoch / batch_size) x epochs, at most max_steps when it is set.
    """
    total = math.ceil(epochs[0]["inputs"].shape[0] / config.batch_size) * config.epochs
    return total if config.max_steps is None else min(total, config.max_steps)


def batches(epochs: list[dict[str, np.ndarray]], batch_size: int):
    """Every step's rows in order; the last batch of an epoch is padded with empty rows (zero weight).

    Args:
        epochs: prepare()'s per-epoch rows.
        batch_size: Rows per batch.

    Yields:
        One dict per step, with the keys of the rows and arrays of [batch_size, ...].
    """
    for rows in epochs:
        n = rows["inputs"].shape[0]
        for lo in range(0, n, batch_size):
            batch = {k: v[lo:lo + batch_size] for k, v in rows.items()}
            short = batch_size - batch["inputs"].shape[0]
            if short:
                batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            yield batch


