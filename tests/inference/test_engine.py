"""The inference engine: cached decoding equal to a full forward pass, the sampling rules (top-k, top-p, draws)
against their definitions, one compiled decode loop, batches placed on a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soft_jax import models
from soft_jax.inference import engine, sampler
from soft_jax.inference.sampler import SamplingConfig


def prompts_with_shared_prefix(vocab, n=3, prefix=40, seed=0):
    """Rows sharing a 40-token prefix (long enough to be prefilled once) with own suffixes of varied length."""
    rng = np.random.default_rng(seed)
    head = rng.integers(3, vocab, size=prefix).tolist()
    return [head + rng.integers(3, vocab, size=int(k)).tolist() for k in rng.integers(1, 12, size=n)]


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


def test_int8_codes_are_within_half_a_step_of_the_keys_and_the_largest_is_127():
    from soft_jax.models.llama import quantize_kv

    x = jax.random.normal(jax.random.key(0), (3, 5, 2, 16)) * jnp.array([0.01, 1.0, 30.0])[:, None, None, None]
    x = x.at[0, 0, 0].set(0.0)  # an all-zero head: scale 1, codes 0
    codes, scale = quantize_kv(x)
    assert codes.dtype == jnp.int8 and scale.shape == (3, 5, 2, 1)
    err = np.abs(np.asarray(codes, np.float32) * np.asarray(scale) - np.asarray(x))
    assert (err <= np.asarray(scale) / 2 * (1 + 1e-6)).all()
    assert (np.abs(np.asarray(codes)).max(-1)[1:] == 127).all() and (np.asarray(codes)[0, 0, 0] == 0).all()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scanned"])
def test_attention_over_an_int8_cache_equals_attention_over_its_dequantized_keys_and_values(tiny_llama,
                                                                                           scan_layers):
    """A decode step over an int8 cache (scales applied to the scores and the probabilities) gives the logits of
    the same step over a float cache holding codes x scales. The float step's own key, written unquantized one
    slot further, is left out of its window: both read the same quantized slots, the step's own included."""
    model, _ = models.load(tiny_llama, progress=False, scan_layers=scan_layers)
    ids = jnp.asarray([[5, 9, 17, 33, 4, 8], [7, 7, 21, 40, 11, 3]])
    cache = models.KVCache.init(model.config, 2, 8, "int8")
    _, cache = model(ids, cache=cache)
    step, position = jnp.asarray([[12], [13]]), jnp.asarray([[6], [6]])
    got, after = model(step, positions=position, cache=cache)
    assert after.k[0].dtype == jnp.int8 and int(after.index) == 7
    deq = lambda codes, scales: jax.tree.map(lambda c, s: c.astype(jnp.float32) * s, codes, scales)
    plain = after.replace(k=deq(after.k, after.k_scale), v=deq(after.v, after.v_scale), k_scale=None, v_scale=None)
    want, _ = model(step, positions=position, cache=plain, window=7)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_the_sampler_decodes_over_an_int8_cache_with_kv_dtype_int8(tiny_llama, monkeypatch):
    model, _ = models.load(tiny_llama, progress=False)
    rows = [[5, 9, 17, 33], [7, 21, 40]]
    seen, decode = [], sampler.decode

    def spy(*args):
        seen.append(jax.tree.leaves(args[3].cache.k)[0].dtype)
        return decode(*args)

    monkeypatch.setattr(sampler, "decode", spy)
    for kv in ("model", "int8"):
        out = sampler.generate_tokens(model, rows, SamplingConfig(max_new_tokens=20, kv_dtype=kv, decode_segment=8),
                                      (-1,))
        assert [len(r) for r in out] == [20, 20]
    assert seen == [jnp.float32] * 3 + [jnp.int8] * 3  # windows of 24, 32, 40 slots after a 16-slot bucket
    from soft_jax.core.errors import UserError

    with pytest.raises(UserError, match="kv_dtype"):
        SamplingConfig(kv_dtype="fp8")
