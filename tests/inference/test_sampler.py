"""The Sampler and Scorer objects: the model split once per object, one result type per call whatever it asks
for, and the free functions equal to them (the numbers themselves: tests/inference/test_sampling.py)."""

import numpy as np
from flax import nnx

from soft_jax import models
from soft_jax.inference import sampler, scorer
from soft_jax.inference.sampler import SamplingConfig

PROMPTS = ["The cat sat on", "Write three words about the sea and the", "Hello", "One, two,"]


def count_splits(monkeypatch, module) -> list:
    """Every nnx.split call made through `module` from now on."""
    calls = []
    real = nnx.split
    monkeypatch.setattr(module.nnx, "split", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def test_a_sampler_splits_its_model_once_and_returns_one_shape(tiny_chat, monkeypatch):
    """Four prompts in batches of two, then a continued call and a token-id call: no split after the Sampler's
    own; every call gives a SampleOutput with one entry per prompt; `generate` and `generate_tokens` give its
    texts and tokens."""
    model, tok = models.load(tiny_chat, progress=False)
    config = SamplingConfig(max_new_tokens=8, batch_size=2, temperature=0.0)
    sample = sampler.Sampler(model, tok, config)
    calls = count_splits(monkeypatch, sampler)
    plain = sample(PROMPTS)
    forced = sample(PROMPTS, continue_with=lambda text: text[:3] + " so", continue_seed=1)
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    by_ids = sample.sample_tokens(rows)
    assert calls == []
    for out in (plain, forced, by_ids):
        assert isinstance(out, sampler.SampleOutput)
        assert len(out.texts) == len(out.tokens) == len(out.finish) == len(out.continued) == len(PROMPTS)
        assert set(out.finish) <= set(sampler.FINISH_REASONS)
    assert plain.continued == [False] * 4 and forced.continued == [True] * 4
    assert all(t.startswith(p[:3] + " so") for t, p in zip(forced.texts, plain.texts))
    assert plain.texts == [tok.decode(t, skip_special_tokens=True) for t in plain.tokens]
    assert sampler.generate(model, tok, PROMPTS, config, progress=False) == plain.texts
    monkeypatch.undo()
    stops = sampler.stop_ids(tok, model)
    assert sampler.generate_tokens(model, rows, config, stops) == by_ids.tokens
    assert by_ids.tokens[:2] == plain.tokens[:2]  # greedy: the first group draws alike either way


def test_a_sampler_without_a_tokenizer_takes_token_ids(tiny_chat):
    model, tok = models.load(tiny_chat, progress=False)
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    config = SamplingConfig(max_new_tokens=6, batch_size=4, temperature=0.0, stop_token_ids=(2,))
    out = sampler.Sampler(model, None, config)(rows)
    assert out.texts == [""] * 4 and len(out.tokens) == 4 and set(out.finish) <= {"eos", "length"}
    assert out.tokens == sampler.Sampler(model, tok, config)(rows).tokens


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
