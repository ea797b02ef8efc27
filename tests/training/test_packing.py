"""SFT data: rendering (no loss on prompt tokens, truncation counted), best-fit-decreasing packing, epochs in a seeded
shuffled or the given order."""

import numpy as np
from helpers import PAIRS

from soft_jax import training
from soft_jax.training import TrainConfig


def _slots(rows):
    """Each row's examples as token tuples, read back from the packed arrays by segment."""
    out = []
    for inputs, segs in zip(rows["inputs"], rows["segment_ids"]):
        out.append([tuple(inputs[segs == s]) for s in range(1, segs.max(initial=0) + 1)])
    return out


def test_prompt_tokens_carry_no_loss(smollm2_tokenizer):
    tok = smollm2_tokenizer
    config = TrainConfig(max_prompt_len=64, max_response_len=64)
    ex, cut_p, cut_r = training.render(tok, *PAIRS[0], config)
    assert not cut_p and not cut_r
    n_prompt = ex.is_response.index(True)
    assert not any(ex.is_response[:n_prompt]) and all(ex.is_response[n_prompt:])
    assert tok.decode(ex.ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ex.ids[n_prompt:]).startswith(PAIRS[0][1] + "<|im_end|>")
    rows = training.pack([ex], 128)
    # Target t is token t + 1: weights are on exactly the response tokens.
    np.testing.assert_array_equal(rows["weights"][0, :len(ex.ids) - 1], np.asarray(ex.is_response[1:], np.float32))
    assert rows["weights"].sum() == len(ex.ids) - n_prompt


def test_truncation_is_counted_and_left_right(smollm2_tokenizer):
    config = TrainConfig(max_prompt_len=40, max_response_len=20)
    ex, cut_p, cut_r = training.render(smollm2_tokenizer, "word " * 100, "answer " * 100, config)
    assert cut_p and cut_r and len(ex.ids) == 60
    assert smollm2_tokenizer.decode(ex.ids[:40]).endswith("word <|im_end|>\n<|im_start|>assistant\n")  # end kept
    assert smollm2_tokenizer.decode(ex.ids[40:]).startswith("answer answer")  # start kept


def test_given_order_is_kept_and_shuffle_is_seeded():
    config = TrainConfig(order="given")
    np.testing.assert_array_equal(training.epoch_order(10, config, 0), np.arange(10))
    shuffled = TrainConfig(order="shuffle", seed=3)
    a, b = training.epoch_order(10, shuffled, 0), training.epoch_order(10, shuffled, 0)
    np.testing.assert_array_equal(a, b)
    assert sorted(a) == list(range(10)) and list(a) != list(range(10))
    examples = [training.Example(ids=[i] * 5, is_response=[True] * 5) for i in range(1, 9)]
    rows = training.pack(examples, 12)  # 4 tokens each: three examples a row, in order
    seen = [int(t) for t, s in zip(rows["inputs"].ravel(), rows["segment_ids"].ravel()) if s]
    assert seen == [i for i in range(1, 9) for _ in range(4)]


def test_best_fit_decreasing_packs_tight_and_keeps_every_example_whole():
    """Shuffled training packs best fit decreasing: every example lands whole in one row, and 100 examples of
    mixed lengths that in-order filling spreads over 28 rows of 384 take 26 (25 at the very least: 9,295 tokens).
    The lengths are one round's 20 kept pairs in the chat format (benchmarks/training.py's), five times over."""
    lengths = [54, 63, 65, 65, 68, 71, 73, 80, 84, 92, 93, 96, 98, 102, 106, 112, 114, 114, 152, 157] * 5
    order = np.random.default_rng(0).permutation(len(lengths))
    examples = [training.Example(ids=[int(i) + 1] * (lengths[i] + 1), is_response=[True] * (lengths[i] + 1))
                for i in order]
    in_order = training.pack(examples, 384)
    tight = training.pack(examples, 384, keep_order=False)
    assert in_order["inputs"].shape[0] == 28 and tight["inputs"].shape[0] == 26
    real = tight["segment_ids"] > 0
    assert real.sum() == sum(lengths) == 9295
    assert sorted(ex for row in _slots(tight) for ex in row) == sorted(tuple(ex.ids[:-1]) for ex in examples)
    np.testing.assert_array_equal(tight["targets"][real], tight["inputs"][real])  # each example's own next token
    for row, segs in zip(tight["positions"], tight["segment_ids"]):  # positions count from 0 in each example
        for seg in range(1, segs.max() + 1):
            np.testing.assert_array_equal(row[segs == seg], np.arange(np.sum(segs == seg)))


def test_best_fit_puts_each_item_into_the_fullest_bin_it_fits():
    # 7 opens bin 0 (room 3), 6 opens bin 1 (room 4), 4 fits only bin 1, 3 fits bin 0 (room 3) before bin 1
    # (room 0); 2 opens bin 2; 1 goes to the fullest bin with room: bin 2 (room 8)
    assert training.best_fit_decreasing([3, 4, 6, 1, 7, 2], 10) == [[4, 0], [2, 1], [5, 3]]
    assert training.best_fit_decreasing([], 10) == []
    assert training.best_fit_decreasing([5, 5, 5], 5) == [[0], [1], [2]]


def test_shuffled_epochs_pack_tight_and_given_order_keeps_the_sequence(smollm2_tokenizer):
    """order=shuffle: each epoch's rows are the best-fit packing of that epoch's shuffle, rows shuffled too
    (seeded: the same twice); order=given: the examples in sequence, row after row (a curriculum)."""
    examples = [training.Example(ids=[i] * n, is_response=[True] * n)
                for i, n in enumerate([9, 3, 9, 3, 5, 7, 2, 9, 6, 4], 1)]
    shuffled = TrainConfig(max_prompt_len=8, max_response_len=8, order="shuffle", seed=1, epochs=2)
    a, b = (training.epoch_rows(examples, shuffled, 0) for _ in range(2))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["inputs"].shape[0] == 3  # 47 tokens in rows of 16: the fewest rows; in-order filling needs more
    assert training.pack(examples, 16)["inputs"].shape[0] == 4
    assert sorted(ex for row in _slots(a) for ex in row) == sorted(tuple(ex.ids[:-1]) for ex in examples)
    given = TrainConfig(max_prompt_len=8, max_response_len=8, order="given")
    rows = training.epoch_rows(examples, given, 0)
    assert [ex for row in _slots(rows) for ex in row] == [tuple(ex.ids[:-1]) for ex in examples]
