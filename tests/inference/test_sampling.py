"""Generation and scoring: equal to transformers, cache/prefix/batch invariances, sampling statistics."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_cli, torch_logits

from soft_jax import models
from soft_jax.inference import engine, sampler, scorer
from soft_jax.inference.sampler import SamplingConfig

EOS = 2


def prompts_with_shared_prefix(vocab, n=3, prefix=40, seed=0):
    """Rows sharing a 40-token prefix (long enough to be prefilled once) with own suffixes of varied length."""
    rng = np.random.default_rng(seed)
    head = rng.integers(3, vocab, size=prefix).tolist()
    return [head + rng.integers(3, vocab, size=int(k)).tolist() for k in rng.integers(1, 12, size=n)]


def hf_greedy(hf, row, max_new_tokens):
    import torch

    with torch.no_grad():
        out = hf.generate(torch.as_tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    new = out[0, len(row):].tolist()
    return new[:new.index(EOS)] if EOS in new else new


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scanned"])
def test_greedy_matches_transformers_generate(tiny_hf, scan_layers):
    """Greedy tokens equal transformers', with the layers as a loop or as one scan over stacked weights and a
    stacked KV cache (the shared prefix's too)."""
    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False, scan_layers=scan_layers)
    rows = prompts_with_shared_prefix(hf.config.vocab_size) + [[5, 6, 7]]
    ours = sampler.generate_tokens(model, rows, SamplingConfig(max_new_tokens=24, batch_size=4), (EOS,))
    for row, got in zip(rows, ours):
        assert got == hf_greedy(hf, row, 24)


@pytest.mark.parametrize("batch_size", [3, 2])  # 2: the prompts decode as two groups, the second padded
def test_continuing_rows_in_their_kv_cache_equals_sampling_after_their_new_heads(tiny_chat, batch_size):
    """Sampler(...)(prompts, continue_with=...) (SOFT's forced answer): a row whose completion gets a new head
    samples on in the same KV cache, keeping the sampled tokens that begin the head. Greedy, it gives what sampling
    afresh after the prompt, those kept tokens and the rest of the head gives. The heads drop the second half of
    the completion (those slots must leave the row's attention); the row not continued keeps its completion."""
    import dataclasses

    model, tok = models.load(tiny_chat, progress=False)
    stops = engine.stop_ids(tok, model)
    prompts = ["The cat sat on", "Write three words about the sea and the", "Hello"]
    config = SamplingConfig(max_new_tokens=12, batch_size=batch_size, temperature=0.0)
    first = sampler.generate(model, tok, prompts, config, progress=False)
    tokens = sampler.generate_tokens(model, [tok(p)["input_ids"] for p in prompts], config, stops, tokenizer=tok)
    assert len(set(first)) == 3, first  # the heads below tell the rows apart by their text

    def head(text):
        return None if text == first[2] else text[:len(text) // 2] + " Answer:"

    out = sampler.Sampler(model, tok, config)(prompts, continue_with=head, continue_seed=0)
    got, why = out.texts, out.finish
    assert out.continued == [True, True, False] and got[2] == first[2] and out.tokens == tokens
    dropped = 0
    for i in (0, 1):
        k, rest = sampler.kept_tokens(tok, tokens[i], head(first[i]))
        dropped += len(tokens[i]) - k
        row = tok(prompts[i])["input_ids"] + tokens[i][:k] + tok(rest, add_special_tokens=False)["input_ids"]
        again = sampler.generate_tokens(model, [row], dataclasses.replace(config, batch_size=1), stops)[0]
        assert got[i] == head(first[i]) + tok.decode(again, skip_special_tokens=True), i
        assert why[i] == ("eos" if len(again) < config.max_new_tokens else "length")
    assert dropped >= 4  # the continued rows' caches held sampled tokens their heads dropped


def test_prefix_reuse_and_batch_do_not_change_greedy_outputs(tiny_hf):
    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False)
    rows = prompts_with_shared_prefix(hf.config.vocab_size, n=4, seed=1)
    config = SamplingConfig(max_new_tokens=16, batch_size=4)
    reused = sampler.generate_tokens(model, rows, config, (EOS,))
    plain = sampler.generate_tokens(model, rows, SamplingConfig(max_new_tokens=16, batch_size=4,
                                                                reuse_prefix=False), (EOS,))
    alone = [sampler.generate_tokens(model, [r], SamplingConfig(max_new_tokens=16, batch_size=1), (EOS,))[0]
             for r in rows]
    assert reused == plain == alone


def test_groups_with_their_own_prefixes_decode_together_as_each_row_alone(tiny_hf):
    """A device batch of several groups (a SOFT round's batches, each with its own exemplars): each group's common
    prefix is prefilled once and only its own rows attend to it. Greedy, every row gives what it gives alone."""
    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False)
    vocab = hf.config.vocab_size
    groups = [prompts_with_shared_prefix(vocab, n=3, prefix=40, seed=1),
              prompts_with_shared_prefix(vocab, n=3, prefix=70, seed=2),
              prompts_with_shared_prefix(vocab, n=1, prefix=5, seed=3)]  # short: padded, nothing shared
    rows = [r for g in groups for r in g]
    config = SamplingConfig(max_new_tokens=16, batch_size=3)
    batch = sampler.start(model, rows, config, (EOS,))
    shared = np.asarray(batch.ds.cache.prefix.segment_ids).sum(axis=1)
    assert shared.tolist() == [40, 70, 0] and batch.index == [0, 1, 2, 3, 4, 5, 6]
    together = sampler.generate_tokens(model, rows, config, (EOS,))
    alone = [sampler.generate_tokens(model, [r], SamplingConfig(max_new_tokens=16, batch_size=1), (EOS,))[0]
             for r in rows]
    assert together == alone


@pytest.mark.parametrize("on_mesh", [False, True])
def test_decoding_in_chunks_compiles_the_decode_loop_once(tiny_chat, caplog, on_mesh):
    """Stop strings decode in chunks of STOP_STRING_CHUNK steps, each chunk a call with the last one's state:
    the decode loop compiles for the first and never again (inputs placed uncommitted once made the second
    chunk compile it a second time: seconds of every cold round), without a mesh and on one."""
    from soft_jax.parallel import sharding

    mesh = sharding.make_mesh((1, 1, -1)) if on_mesh else None
    model, tok = models.load(tiny_chat, mesh=mesh, progress=False)
    rows = prompts_with_shared_prefix(len(tok), n=2, seed=3)
    # 3 chunks, and a shape no other test compiles (a cached program would not be compiled either way)
    config = SamplingConfig(max_new_tokens=3 * sampler.STOP_STRING_CHUNK + 2 * on_mesh, batch_size=2,
                            temperature=0.7, stop_strings=("never in the text \u2603",))
    with caplog.at_level("WARNING"), jax.log_compiles():
        out = sampler.generate_tokens(model, rows, config, (-1,), tokenizer=tok, mesh=mesh)
    assert [len(o) for o in out] == [config.max_new_tokens] * 2  # every chunk ran
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(decode)")]
    assert len(compiles) == 1, [c[:200] for c in compiles]


def test_cached_decoding_equals_full_forward(tiny_hf):
    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, hf.config.vocab_size, size=(2, 20)))
    full = np.asarray(model(ids))
    cache = models.KVCache.init(model.config, 2, 32)
    logits, cache = model(ids[:, :12], cache=cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :12], atol=1e-5)
    for t in range(12, 20):
        logits, cache = model(ids[:, t:t + 1], cache=cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("vocab, scale", [(50, 3.0), (3000, 6.0), (3000, 0.05)])  # nucleus within / beyond candidates
def test_top_k_and_top_p_keep_exactly_the_right_tokens(vocab, scale):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(64, vocab)).astype(np.float32) * scale
    for k in (5, engine.CANDIDATES + 100):
        kept_k = np.isfinite(np.asarray(engine.filter_logits(jnp.asarray(logits), 1.0, 1.0, k, use_top_p=False,
                                                             use_top_k=True)))
        np.testing.assert_array_equal(kept_k, logits >= np.sort(logits, axis=-1)[:, -min(k, vocab)][:, None])
    for top_p in (0.3, 0.8, 0.95):
        kept = np.isfinite(np.asarray(engine.filter_logits(jnp.asarray(logits), 0.7, top_p, 0, use_top_p=True,
                                                           use_top_k=False)))
        scaled = logits / 0.7
        probs = np.exp(scaled - scaled.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1)
        for row in range(len(logits)):
            mass = np.cumsum(probs[row, order[row]])
            n = int(np.searchsorted(mass, top_p) + 1)  # smallest prefix whose mass reaches top_p
            assert set(np.flatnonzero(kept[row])) == set(order[row, :n].tolist())


def test_rows_that_stopped_do_not_send_the_batch_to_the_sort():
    """A stopped row's draw is thrown away: its flat distribution (a nucleus far past the CANDIDATES largest
    logits) must not make the live rows' filtering sort the vocabulary, and the live rows stay exact."""
    vocab = 3000
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(4, vocab)).astype(np.float32) * 6.0
    logits[2] = rng.normal(size=vocab) * 0.01  # near flat: the 0.9 nucleus holds about 2,700 tokens
    exact = np.isfinite(np.asarray(engine.filter_logits(jnp.asarray(logits), 0.7, 0.9, 0, use_top_p=True,
                                                        use_top_k=False)))
    assert exact[2].sum() > 2000  # the sort ran: row 2 exact too
    ignore = jnp.asarray([False, False, True, False])
    fast = np.isfinite(np.asarray(engine.filter_logits(jnp.asarray(logits), 0.7, 0.9, 0, use_top_p=True,
                                                       use_top_k=False, ignore=ignore)))
    np.testing.assert_array_equal(fast[[0, 1, 3]], exact[[0, 1, 3]])
    assert fast[2].sum() <= engine.CANDIDATES  # no sort: the stopped row's threshold came from the candidates


def test_sampling_frequencies_match_the_renormalised_distribution():
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    temperature, top_p, top_k = 0.7, 0.9, 6
    keys = jax.random.split(jax.random.key(0), 40000)
    draw = jax.jit(jax.vmap(lambda k: engine.sample_token(logits, k, temperature, top_p, top_k, use_top_p=True,
                                                          use_top_k=True)[0]))
    samples = np.asarray(draw(keys))
    # Expected: temperature, keep the top 6, then the nucleus of mass 0.9, renormalise.
    p = np.exp(np.asarray(logits[0]) / temperature)
    p[np.argsort(-p)[top_k:]] = 0
    p /= p.sum()
    order = np.argsort(-p)
    n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)
    expected = np.zeros_like(p)
    expected[order[:n]] = p[order[:n]] / p[order[:n]].sum()
    counts = np.bincount(samples, minlength=len(p))
    assert counts[expected == 0].sum() == 0  # never a token outside the nucleus
    freq = counts / counts.sum()
    # 40k draws: the standard error of each frequency is below 0.0025; allow 4 of them.
    assert np.abs(freq - expected).max() < 0.01, (freq, expected)
    greedy = engine.sample_token(logits, keys[0], 0.0, 1.0, 0, use_top_p=False, use_top_k=False)
    assert int(greedy[0]) == 0


def test_argmax_and_draws_equal_jax_argmax_and_categorical():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(16, 3000)).astype(np.float32)
    logits[3, [7, 900, 2999]] = 50.0  # ties: the first index wins, as in jnp.argmax
    logits[4, :] = -np.inf
    logits[4, 1234] = 0.0  # one finite entry (what top-k 1 leaves)
    np.testing.assert_array_equal(np.asarray(engine.argmax(jnp.asarray(logits))), np.argmax(logits, axis=-1))
    assert int(engine.argmax(jnp.asarray(logits))[3]) == 7
    for seed in range(3):  # the same tokens as jax.random.categorical for the same key
        key = jax.random.key(seed)
        ours = engine.sample_token(jnp.asarray(logits), key, 1.0, 1.0, 0, use_top_p=False, use_top_k=False)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.categorical(key, logits, axis=-1)))


def test_seeded_sampling_is_reproducible(tiny_hf):
    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False)
    rows = prompts_with_shared_prefix(hf.config.vocab_size, n=2, seed=4)
    config = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.95, batch_size=2, seed=7)
    a = sampler.generate_tokens(model, rows, config, (EOS,), rng=jax.random.key(7))
    b = sampler.generate_tokens(model, rows, config, (EOS,), rng=jax.random.key(7))
    c = sampler.generate_tokens(model, rows, config, (EOS,), rng=jax.random.key(8))
    assert a == b and a != c


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scanned"])
def test_scores_match_transformers_log_probabilities(tiny_hf, scan_layers):
    import torch

    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False, scan_layers=scan_layers)
    rng = np.random.default_rng(5)
    question = rng.integers(3, hf.config.vocab_size, size=45).tolist()
    contexts = [question, question, question, rng.integers(3, hf.config.vocab_size, size=7).tolist()]
    continuations = [rng.integers(3, hf.config.vocab_size, size=int(k)).tolist() for k in (1, 5, 9, 3)]
    ours = scorer.score_tokens(model, contexts, continuations, batch_size=4)
    for ctx, cont, got in zip(contexts, continuations, ours):
        logp = torch.log_softmax(torch.as_tensor(torch_logits(hf, [ctx + cont])[0]), -1).numpy()
        ref = [logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)]
        np.testing.assert_allclose(got, ref, atol=1e-4)


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


MESH_SCRIPT = r"""
import json, sys
import jax
from soft_jax import models
from soft_jax.parallel import sharding
from soft_jax.inference import engine, sampler, scorer
rows = json.loads(sys.argv[2])
mesh = sharding.make_mesh((2, 2, 2)) if sys.argv[3] == "mesh" else None
model, _ = models.load(sys.argv[1], mesh=mesh, progress=False)
config = sampler.SamplingConfig(max_new_tokens=12, batch_size=4)
out = sampler.generate_tokens(model, rows, config, (2,), mesh=mesh)
# several continuations per context (groups of rows sharing a cached context), one-token ones too
contexts = [r for r in rows for _ in range(3)]
continuations = [[5, 6, 7], [8, 9], [10]] * len(rows)
scores = scorer.score_tokens(model, contexts, continuations, batch_size=4, mesh=mesh)
print(json.dumps({"devices": len(jax.devices()), "tokens": out, "scores": [s.tolist() for s in scores]}))
"""


@pytest.mark.e2e  # a CLI process, or several CPU devices in a process of their own
def test_mesh_of_8_cpu_devices_gives_the_same_greedy_outputs(tiny_hf):
    kind, path, hf = tiny_hf
    rows = prompts_with_shared_prefix(hf.config.vocab_size, n=4, seed=6)
    results = {}
    for mode in ("single", "mesh"):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, path, json.dumps(rows), mode], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results["mesh"]["devices"] == 8
    assert results["mesh"]["tokens"] == results["single"]["tokens"]
    assert len(results["mesh"]["scores"]) == len(results["single"]["scores"]) == 12
    for a, b in zip(results["mesh"]["scores"], results["single"]["scores"]):
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_mesh_and_batch_that_do_not_divide_are_refused(tiny_llama):
    import types

    from soft_jax.core.errors import UserError
    from soft_jax.parallel import sharding

    model, _ = models.load(tiny_llama, progress=False)
    mesh = sharding.make_mesh((1, 1, -1))
    config = SamplingConfig(max_new_tokens=4, batch_size=1)  # greedy: the one-device mesh gives the plain result
    on_mesh = sampler.generate_tokens(model, [[5, 6]], config, (-1,), mesh=mesh)
    assert on_mesh == sampler.generate_tokens(model, [[5, 6]], config, (-1,)) and len(on_mesh[0]) == 4
    with pytest.raises(UserError, match="does not divide the 1 devices"):
        sharding.make_mesh((2, 1, 1))
    with pytest.raises(UserError, match="the batch size = 3 is not divisible by the mesh.s data x fsdp"):
        engine.Batcher(types.SimpleNamespace(shape={"data": 2, "fsdp": 1, "tensor": 1}), 3)


# --- SmolLM2 and the command line -----------------------------------------------------------------

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain why the sky is blue in one sentence.", "List three prime numbers.",
             "How do I reverse a list in Python?"]


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(smollm2, smollm2_hf):
    import torch

    model, tok = smollm2
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    ours = sampler.generate(model, tok, prompts, max_new_tokens=48, batch_size=8, add_special_tokens=False,
                            progress=False)
    for prompt, got in zip(prompts, ours):
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = smollm2_hf.generate(**ids, max_new_tokens=48, do_sample=False)
        assert got == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_stop_strings_cut_the_text_and_stop_early(smollm2):
    model, tok = smollm2
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("Write a short poem about rain.", "List five fruits, one per line.")]
    full = sampler.generate(model, tok, prompts, max_new_tokens=96, add_special_tokens=False, progress=False)
    assert all("\n" in text for text in full)
    cut = sampler.generate(model, tok, prompts, max_new_tokens=96, add_special_tokens=False, progress=False,
                           stop_strings=("\n",))
    assert cut == [text[:text.index("\n")] for text in full]
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    config = SamplingConfig(max_new_tokens=96, batch_size=2, stop_strings=("\n",))
    early = sampler.generate_tokens(model, rows, config, engine.stop_ids(tok, model), tokenizer=tok)
    assert max(map(len, early)) <= sampler.STOP_STRING_CHUNK * 2 < 96  # stopped at a chunk boundary


@pytest.mark.slow
@pytest.mark.e2e  # a CLI process, or several CPU devices in a process of their own
def test_generate_cli_writes_jsonl(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q}) + "\n" for i, q in enumerate(QUESTIONS[:2])))
    out = tmp_path / "out.jsonl"
    proc = run_cli("generate", "--model", "smollm2-135m", "--prompts", str(prompts), "--out", str(out),
                   "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1"] and "Paris" in rows[0]["completion"]


@pytest.mark.slow
@pytest.mark.e2e  # a CLI process, or several CPU devices in a process of their own
def test_generate_cli_prompt_longer_than_context(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "word " * 9000}) + "\n")
    proc = run_cli("generate", "--model", "smollm2-135m", "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                   "--no-chat")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "prompt 1 has" in proc.stderr and "more than the model's context of 8192" in proc.stderr
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("content, needle", [("", "has no rows"),
                                             ('{"prompt": "a"}\n{"prompt": \n', ":2: malformed JSON"),
                                             ('{"text": "a"}\n', ":1: missing key(s) prompt")])
@pytest.mark.e2e  # a CLI process, or several CPU devices in a process of their own
def test_generate_cli_bad_prompt_files(tmp_path, content, needle):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    proc = run_cli("generate", "--model", "smollm2-135m", "--prompts", str(prompts), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
