"""Degeneracy signals of open-ended answers: hand-computed values, loops, corpus distinct-n, truncation."""

import pytest

from soft_jax.evaluation import signals

NORMAL = ("Bread goes stale because its starch slowly recrystallises and pushes water out, so a loaf kept "
          "in the fridge actually dries faster than one kept in a bread box at room temperature.")
LOOP = 'The answer is: "' * 12


def test_hand_computed_values():
    s = signals.per_answer("a b a b")
    assert s == {"distinct_1": 0.5, "distinct_2": pytest.approx(2 / 3), "repeated_ngram_rate": 0.0,
                 "length": 4.0, "truncated": 0.0}
    # 4-grams: (the cat the cat) (cat the cat the) (the cat the cat): the third repeats the first
    s = signals.per_answer("The cat, the CAT; the cat!")
    assert s["distinct_1"] == pytest.approx(2 / 6) and s["distinct_2"] == pytest.approx(2 / 5)
    assert s["repeated_ngram_rate"] == pytest.approx(1 / 3) and s["length"] == 6.0
    assert signals.per_answer("one two three four five") == {
        "distinct_1": 1.0, "distinct_2": 1.0, "repeated_ngram_rate": 0.0, "length": 5.0, "truncated": 0.0}


def test_answers_without_ngrams_score_zero():
    assert signals.per_answer("") == {"distinct_1": 0.0, "distinct_2": 0.0, "repeated_ngram_rate": 0.0,
                                      "length": 0.0, "truncated": 0.0}
    s = signals.per_answer("Hello!")
    assert s["distinct_1"] == 1.0 and s["distinct_2"] == 0.0 and s["length"] == 1.0


def test_a_looping_answer_looks_degenerate_next_to_a_normal_one():
    loop, normal = signals.per_answer(LOOP), signals.per_answer(NORMAL)
    assert loop["repeated_ngram_rate"] > 0.8 and normal["repeated_ngram_rate"] == 0.0
    assert loop["distinct_2"] < 0.1 < 0.9 < normal["distinct_2"]
    assert loop["distinct_1"] < normal["distinct_1"]


def test_corpus_distinct_is_not_the_mean_of_per_answer_distinct():
    texts = ["good morning", "good morning", "good night"]
    per = [signals.per_answer(t) for t in texts]
    assert all(p["distinct_2"] == 1.0 for p in per)  # each answer alone repeats nothing
    s = signals.summary(texts, ["eos"] * 3)
    assert s["distinct_2"] == pytest.approx(2 / 3)  # bigrams never cross answers: 3 in all, 2 unique
    assert s["distinct_1"] == pytest.approx(3 / 6)
    assert s["n"] == 3 and s["length"] == 2.0 and s["repeated_ngram_rate"] == 0.0


def test_summary_means_and_truncation_from_finish():
    texts = ["a b c d a b c d", "one two", "x y z"]
    s = signals.summary(texts, ["eos", "length", "stop"])
    assert s["truncation_rate"] == pytest.approx(1 / 3)
    assert s["length"] == pytest.approx((8 + 2 + 3) / 3)
    assert s["repeated_ngram_rate"] == pytest.approx((1 / 5) / 3)  # 5 4-grams in the first, one repeats
    assert signals.per_answer("a cut-off answer", "length")["truncated"] == 1.0
    assert signals.per_answer("a stopped answer", "stop")["truncated"] == 0.0
    with pytest.raises(ValueError):
        signals.per_answer("typo in the reason", "lenght")
    with pytest.raises(ValueError):
        signals.summary(["a"], [])
    with pytest.raises(ValueError):
        signals.summary([], [])


def test_guard_signals_name_per_answer_keys_and_directions():
    keys = signals.per_answer("x")
    assert all(key in keys for key, _ in signals.SIGNALS.values())
    assert signals.SIGNALS["distinct_2"] == ("distinct_2", True)
    assert signals.SIGNALS["repeated_ngram_rate"] == ("repeated_ngram_rate", False)
    assert signals.SIGNALS["truncation_rate"] == ("truncated", False)
    from soft_jax.inference.sampler import FINISH_REASONS
    assert signals.FINISH_REASONS == FINISH_REASONS
