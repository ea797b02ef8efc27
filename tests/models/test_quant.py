"""The quantized frozen base (soft_jax.models.quant): NF4 with double-quantized scales and int8 against a numpy
implementation of the published scheme written here; a quantized model computes what its dequantized kernels
compute; LoRA on it trains the adapters and leaves every quantized array as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import PAIRS

from soft_jax import models, training
from soft_jax.models import quant
from soft_jax.models.llama import Linear
from soft_jax.training import TrainConfig

# QLoRA's NormalFloat4 values (Dettmers et al. 2023, appendix E), typed in again here from the paper.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def reference_nf4(w, block=64, block2=256):
    """numpy, the slow way: per block of 64 inputs of each output column, absmax and the nearest code by argmin;
    the absmaxes less their mean, int8 absmax per block of `block2` along the output axis."""
    w = np.asarray(w, np.float64)
    d_in, d_out = w.shape
    codebook = np.asarray(PUBLISHED_NF4)
    codes = np.zeros((d_in, d_out), np.int64)
    absmax = np.zeros((d_in // block, d_out))
    for j in range(d_out):
        for b in range(d_in // block):
            x = w[b * block:(b + 1) * block, j]
            absmax[b, j] = np.abs(x).max()
            codes[b * block:(b + 1) * block, j] = np.argmin(np.abs(x[:, None] / absmax[b, j] - codebook), axis=1)
    mean = absmax.mean()
    b2 = block2 if d_out % block2 == 0 else d_out
    rebuilt = np.zeros_like(absmax)
    for i in range(absmax.shape[0]):
        for k in range(d_out // b2):
            c = absmax[i, k * b2:(k + 1) * b2] - mean
            s = np.abs(c).max()
            rebuilt[i, k * b2:(k + 1) * b2] = np.round(c / s * 127) * s / 127 + mean
    values = codebook[codes] * np.repeat(rebuilt, block, axis=0)
    return codes, values


@pytest.mark.parametrize("shape", [(128, 512), (192, 96)])  # 96 outputs: one block of scales per row
def test_nf4_equals_the_published_scheme(shape):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w[5, 3] = 0.3  # an outlier: its block's other weights use a coarse scale
    codes, values = reference_nf4(w)
    got = quant.quantize("nf4", w)
    unpacked = np.stack([np.asarray(got["codes"]) >> 4, np.asarray(got["codes"]) & 15], axis=1).reshape(shape)
    np.testing.assert_array_equal(unpacked, codes)
    np.testing.assert_allclose(np.asarray(quant.dequantize("nf4", got, jnp.float32)), values, rtol=1e-5, atol=1e-7)
    assert np.asarray(got["codes"]).nbytes * 2 == w.size  # 4 bits a weight


def test_int8_is_absmax_per_output_channel():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 48)) * 0.02).astype(np.float32)
    scale = np.abs(w).max(axis=0)
    want = np.round(w / scale * 127) * scale / 127
    got = quant.quantize("int8", w)
    assert got["q"].dtype == jnp.int8
    np.testing.assert_allclose(np.asarray(quant.dequantize("int8", got, jnp.float32)), want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scanned"])
def test_a_quantized_model_computes_what_its_dequantized_kernels_compute(tiny_hf, kind, scan_layers):
    """Loaded with model.quant, every projection is stored quantized (its kernel gone) and the model's logits
    equal those of the same model whose kernels are the dequantized ones; lm_head and the embeddings stay."""
    _, path, hf = tiny_hf
    q, _ = models.load(path, progress=False, quant=kind, scan_layers=scan_layers)
    full, _ = models.load(path, progress=False, scan_layers=scan_layers)
    projections = [(p, m) for p, m in nnx.iter_graph(q) if isinstance(m, Linear) and p[0] != "lm_head"]
    # nf4 needs whole blocks of 64 inputs: a projection with another input width stays unquantized
    want = [m.kernel.shape[-2] % quant.BLOCK == 0 or kind == "int8" for _, m in projections]
    assert [m.quantized for _, m in projections] == want and sum(want) >= 5 * (1 if scan_layers else 2)
    for (_, a), (_, b) in zip(((p, m) for p, m in nnx.iter_graph(q) if isinstance(m, Linear)),
                              ((p, m) for p, m in nnx.iter_graph(full) if isinstance(m, Linear))):
        if a.quantized:
            b.kernel.set_value(a.weight(jnp.float32))
    ids = jnp.asarray(np.random.default_rng(2).integers(3, hf.config.vocab_size, size=(2, 24)))
    np.testing.assert_allclose(np.asarray(q(ids)), np.asarray(full(ids)), rtol=0, atol=2e-6)


def test_qlora_trains_the_adapters_and_leaves_the_quantized_base_as_it_was(tiny_chat):
    base, tok = models.load(tiny_chat, progress=False, quant="nf4")
    frozen = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
              jax.tree_util.tree_leaves_with_path(nnx.state(base, quant.Quantized))}
    assert frozen and all(v.dtype in (np.uint8, np.int8, np.float32) for v in frozen.values())
    config = TrainConfig(max_prompt_len=64, max_response_len=64, batch_size=2, epochs=1, learning_rate=1e-2,
                         warmup_steps=0, order="given", pack=False, lora_rank=4, lora_alpha=8)
    tuned, result = training.train(base, tok, PAIRS, config, progress=False)
    after = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
             jax.tree_util.tree_leaves_with_path(nnx.state(tuned, quant.Quantized))}
    assert sorted(after) == sorted(frozen)
    for name in frozen:
        np.testing.assert_array_equal(after[name], frozen[name], err_msg=name)
    b = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(tuned, nnx.LoRAParam))
         if "'b'" in jax.tree_util.keystr(p)]
    assert b and all(np.abs(x).max() > 0 for x in b)  # every B moved from zero
    with pytest.raises(Exception, match="quantized"):
        training.train(base, tok, PAIRS, TrainConfig(max_prompt_len=64, max_response_len=64, batch_size=2),
                       progress=False)
