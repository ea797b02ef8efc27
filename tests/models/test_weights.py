"""Weights in and out (soft_jax.models.weights): SmolLM2's GGUF read to transformers' logits, HF directories exported
and read back by transformers, sharded bfloat16 checkpoints with an index."""

import copy
import os

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_same_logits, torch_logits

from soft_jax import models

# float32 on CPU. SmolLM2 (30 layers, logits up to ~38): observed max |diff| 1.4e-4, which is float32 noise:
# transformers' own float32 logits are 9e-5 from its float64 logits and ours 1.1e-4, so SmolLM2 is also checked
# against float64 below. (Tiny models: about 3e-7, helpers.ATOL.)
ATOL_SMOLLM2 = 2.5e-4
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain why the sky is blue in one sentence."]


@pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scanned"])
def test_export_round_trip_loads_in_transformers(tiny_hf, tmp_path, scan_layers):
    """Exported (stacked layers split back into HF's per-layer tensors), the model loads in transformers with
    our logits, and back in soft-jax, in the other layer layout, with the same tensors and logits."""
    import transformers

    from soft_jax.models import weights

    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False, scan_layers=scan_layers)
    out = str(tmp_path / "export")
    models.export_hf(model, None, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    ids = np.random.default_rng(4).integers(0, hf.config.vocab_size, size=(2, 30))
    assert_same_logits(model(jnp.asarray(ids)), torch_logits(reloaded, ids))
    hf_state = {k: v.numpy() for k, v in reloaded.state_dict().items() if "rotary" not in k}
    ours = weights.hf_tensors(model)
    assert sorted(ours) == sorted(set(hf_state) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set()))
    for name, array in ours.items():
        np.testing.assert_array_equal(array, hf_state[name], err_msg=name)
    ours_again, _ = models.load(out, progress=False, scan_layers=not scan_layers)
    for name, array in weights.hf_tensors(ours_again).items():
        np.testing.assert_array_equal(array, ours[name], err_msg=name)
    np.testing.assert_allclose(np.asarray(ours_again(jnp.asarray(ids))), np.asarray(model(jnp.asarray(ids))),
                               rtol=0, atol=1e-6)


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(smollm2, smollm2_hf):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta) == (30, 576, 9, 3, 1e5)
    assert cfg.tie_word_embeddings and tokenizer.chat_template
    hf64 = copy.deepcopy(smollm2_hf).double()
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]])
        ours, ref = np.asarray(model(jnp.asarray(ids))), torch_logits(smollm2_hf, ids)
        assert_same_logits(ours, ref, atol=ATOL_SMOLLM2)
        # About as accurate as transformers' own float32 forward, measured against float64: the RMS error over
        # all logits within 1.5x of transformers'. (The max of ~1.8M rounding errors is too noisy a statistic:
        # with transformers 5.24 / torch 2.13 ours is 1.1e-4 and theirs 6.0e-5 at the max, 1.2-1.4x in RMS.)
        exact = torch_logits(hf64, ids)
        rms = lambda x: float(np.sqrt(np.mean(np.square(x - exact))))
        assert rms(ours) <= 1.5 * rms(ref), (rms(ours), rms(ref))


@pytest.mark.slow
def test_smollm2_export_round_trip(smollm2, tmp_path):
    import transformers

    model, tokenizer = smollm2
    out = str(tmp_path / "smollm2-hf")
    models.export_hf(model, tokenizer, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = hf_tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                      add_generation_prompt=True)
    assert hf_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = np.asarray([hf_tok(text, add_special_tokens=False)["input_ids"]])
    assert_same_logits(model(jnp.asarray(ids)), torch_logits(hf, ids), atol=ATOL_SMOLLM2)


def test_sharded_bfloat16_checkpoint_with_index(tmp_path):
    """A bf16 checkpoint split into shards with model.safetensors.index.json loads as transformers reads it."""
    import torch
    import transformers
    from conftest import make_tiny_hf

    hf = make_tiny_hf("llama", str(tmp_path / "f32")).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    files = os.listdir(tmp_path / "bf16")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    model, _ = models.load(str(tmp_path / "bf16"), progress=False)  # bf16 storage upcast to float32 params
    assert model.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", attn_implementation="eager",
                                                            dtype=torch.float32).eval()
    ids = np.random.default_rng(6).integers(0, 160, size=(2, 24))
    assert_same_logits(model(jnp.asarray(ids)), torch_logits(ref, ids))
