"""The Scorer: log-probabilities equal to transformers', the natural token boundary, and a scored string equal to
its full forward pass (the Scorer object itself: test_a_scorer_splits_its_model_once_and_sums_its_tokens)."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import count_splits, torch_logits

from soft_jax import models
from soft_jax.inference import scorer

# Contexts ending in whitespace (BIG-bench's TruthfulQA MC1 context ends in "\nA: "), and a few that do not.
BOUNDARY_PAIRS = [("Q: What happens if you eat watermelon seeds?\nA: ", "The watermelon seeds pass through you."),
                  ("Q: What happens if you eat watermelon seeds?\nA: ", "Nothing happens"),
                  ("Q: x\nA: ", "Yes."), ("Answer: ", "two"), ("Answer: ", "yes"),
                  ("Answer:  ", "two"),  # two spaces: the whole string has a lone " " token, then " two"
                  ("Q: x\nA:\n", "The end."), ("Name:\t", "Bob"), ("Assistant:", " A"), ("no space", " here")]


def _whole_split(tok, ctx, cont):
    """An independent split: ctx + cont tokenized once, cut before the first token whose character span starts
    at or after the end of the context's text less its trailing whitespace."""
    enc = tok(ctx + cont, add_special_tokens=False, return_offsets_mapping=True)
    end = len(ctx.rstrip())
    cut = next(i for i, (start, _) in enumerate(enc["offset_mapping"]) if start >= end)
    assert enc["offset_mapping"][cut - 1][1] <= end  # no token straddles the boundary
    return enc["input_ids"][:cut], enc["input_ids"][cut:]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scanned"])
def test_scores_match_transformers_log_probabilities(tiny_hf, scan_layers):
    import torch

    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False, scan_layers=scan_layers)
    rng = np.random.default_rng(5)
    question = rng.integers(3, hf.config.vocab_size, size=45).tolist()
    contexts = [question, question, question, rng.integers(3, hf.config.vocab_size, size=7).tolist()]
    continuations = [rng.integers(3, hf.config.vocab_size, size=int(k)).tolist() for k in (1, 5, 9, 3)]
    # requests that end one row (a context + continuation less its last token): the same context with answers that
    # differ in their last token only, and a longer context that holds the first answer token (another boundary)
    five = continuations[1]
    contexts += [question, question + five[:1], question]
    continuations += [five[:4] + [(five[4] + 1) % hf.config.vocab_size], five[1:4] + [7], five[:1] + [9]]
    ours = scorer.score_tokens(model, contexts, continuations, batch_size=4)
    for ctx, cont, got in zip(contexts, continuations, ours):
        logp = torch.log_softmax(torch.as_tensor(torch_logits(hf, [ctx + cont])[0]), -1).numpy()
        ref = [logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)]
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_score_tokens_split_at_the_natural_boundary(smollm2_tokenizer):
    tok = smollm2_tokenizer
    (space,) = tok(" ", add_special_tokens=False)["input_ids"]
    ctx, cont = scorer.score_ids(tok, [c for c, _ in BOUNDARY_PAIRS], [k for _, k in BOUNDARY_PAIRS])
    for (c, k), a, b in zip(BOUNDARY_PAIRS, ctx, cont):
        assert (a, b) == _whole_split(tok, c, k), (c, k)
        if c.endswith(" ") and not c.endswith("  "):
            # tokenized alone, such a context ends in a lone " " token; scored, the answer starts " The", " two"
            assert tok(c, add_special_tokens=False)["input_ids"][-1] == space and b[0] != space, (c, k)
    assert [tok.decode(b[:1]) for b in cont[:4]] == [" The", " Nothing", " Yes", " two"]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    assert scorer.score_ids(tok, ["  "], ["x"]) == ([ids("  ")], [ids("x")])  # a context needs a token: it keeps them


def test_score_equals_a_full_forward_pass_over_the_whole_string(tiny_chat, smollm2_tokenizer):
    model, _ = models.load(tiny_chat, progress=False)
    tok = smollm2_tokenizer
    ours = scorer.score(model, tok, [c for c, _ in BOUNDARY_PAIRS], [k for _, k in BOUNDARY_PAIRS], batch_size=4)
    for (c, k), got in zip(BOUNDARY_PAIRS, ours):
        a, b = _whole_split(tok, c, k)
        logits = np.asarray(model(jnp.asarray([a + b]))[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        ref = sum(logp[len(a) - 1 + i, t] for i, t in enumerate(b))
        assert got == pytest.approx(ref, abs=1e-4), (c, k)


def test_a_scorer_splits_its_model_once_and_sums_its_tokens(tiny_chat, monkeypatch):
    model, tok = models.load(tiny_chat, progress=False)
    contexts, continuations = ["Q: 2+2?\nA:", "The sea is", "The sea is"], [" 4", " blue", " wide and deep"]
    score = scorer.Scorer(model, tok, batch_size=2)
    calls = count_splits(monkeypatch, scorer)
    out = score(contexts, continuations)
    again = score(contexts[:1], continuations[:1])
    assert calls == []
    assert isinstance(out, scorer.ScoreOutput) and out.logprobs.shape == (3,) and out.logprobs.dtype == np.float32
    np.testing.assert_allclose(out.logprobs, [p.sum() for p in out.per_token], rtol=1e-6)
    assert [len(p) for p in out.per_token] == [len(k) for k in scorer.score_ids(tok, contexts, continuations)[1]]
    np.testing.assert_allclose(again.logprobs, out.logprobs[:1], rtol=1e-6)  # another batch shape: float32 rounding
    monkeypatch.undo()
    np.testing.assert_array_equal(scorer.score(model, tok, contexts, continuations, batch_size=2), out.logprobs)
    ids = scorer.score_ids(tok, contexts, continuations)
    by_ids = score.tokens(*ids)
    for a, b in zip(by_ids.per_token, scorer.score_tokens(model, *ids, batch_size=2)):
        np.testing.assert_array_equal(a, b)


def test_greedy_says_whether_each_continuation_is_the_models_argmax(tiny_chat):
    """ScoreOutput.greedy (lm-evaluation-harness's is_greedy) against the full forward pass's argmax: for greedy
    continuations of one and several tokens (taken from the full pass itself), and for the same with one token
    changed; single-token continuations of one context share their row."""
    model, _ = models.load(tiny_chat, progress=False)
    rng = np.random.default_rng(0)
    contexts, continuations, want = [], [], []
    for n in (1, 1, 3, 5):
        ctx = rng.integers(3, model.config.vocab_size, size=int(rng.integers(4, 30))).tolist()
        cont = []
        for _ in range(n):  # the greedy continuation, one full forward pass per token
            cont.append(int(np.argmax(np.asarray(model(jnp.asarray([ctx + cont]))[0, -1]))))
        wrong = cont[:-1] + [(cont[-1] + 1) % model.config.vocab_size]
        contexts += [ctx, ctx]
        continuations += [cont, wrong]
        want += [True, False]
    out = scorer.Scorer(model, batch_size=4).tokens(contexts, continuations)
    assert out.greedy.dtype == bool and out.greedy.tolist() == want
