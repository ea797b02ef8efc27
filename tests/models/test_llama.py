"""The decoder (soft_jax.models.llama) against transformers (PyTorch) on the same float32 weights: logits, long
positions, left padding, packed segments."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_same_logits, torch_logits

from soft_jax import models


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scanned"])
def test_logits_match_transformers(tiny_hf, scan_layers):
    kind, path, hf = tiny_hf
    model, tokenizer = models.load(path, progress=False, scan_layers=scan_layers)
    assert isinstance(model.layers, nnx.List) != scan_layers
    assert tokenizer is None and model.config.model_type == {"llama3": "llama"}.get(kind, kind)
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, size=(2, 40))
    assert_same_logits(model(jnp.asarray(ids)), torch_logits(hf, ids))


def test_long_positions_match_transformers(tiny_hf):
    """Positions far past the Llama-3 original context and Mistral's window exercise RoPE scaling."""
    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False)
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, size=(1, 200))
    assert_same_logits(model(jnp.asarray(ids)), torch_logits(hf, ids))


def test_left_padded_batch_matches_transformers(tiny_hf):
    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False)
    rng = np.random.default_rng(2)
    ids = rng.integers(3, hf.config.vocab_size, size=(3, 24))
    mask = np.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :15] = 0
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    ours = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    ref = torch_logits(hf, ids, attention_mask=mask, position_ids=positions)
    assert_same_logits(ours, ref, mask)
    # A padded row equals the same prompt run alone, unpadded.
    alone = model(jnp.asarray(ids[2:, 15:]))
    assert_same_logits(np.asarray(ours)[2:, 15:], alone)


def test_packed_segments_equal_separate_rows(tiny_hf):
    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False)
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, hf.config.vocab_size, size=10), rng.integers(0, hf.config.vocab_size, size=14)
    packed = np.concatenate([a, b])[None]
    segments = np.array([[1] * 10 + [2] * 14])
    positions = np.array([list(range(10)) + list(range(14))])
    out = np.asarray(model(jnp.asarray(packed), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments)))
    assert_same_logits(out[:, :10], model(jnp.asarray(a[None])))
    assert_same_logits(out[:, 10:], model(jnp.asarray(b[None])))
