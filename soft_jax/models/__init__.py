"""Llama-family models: the NNX decoder, checkpoint loading and export, tokenizers.

    model, tokenizer = soft_jax.models.load("smollm2-135m")
    logits = model(input_ids)                       # [batch, length] -> [batch, length, vocab]
    soft_jax.models.export_hf(model, tokenizer, "out_dir")
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from soft_jax.core.errors import UserError
from soft_jax.models.config import DTYPES, ModelConfig
from soft_jax.models.llama import KVCache, Llama, init_random
from soft_jax.models.quant import Quantized
from soft_jax.models.weights import SMOLLM2, build, export_hf, open_source
from soft_jax.parallel import sharding as shd


def inspect(path_or_name: str, dtype: str = "float32", param_dtype: str | None = None, scan_layers: bool = False,
            quant: str = "none"):
    """(source, config, tokenizer) without reading weights: validate inputs before the slow part.

    Args:
        path_or_name: An HF checkpoint directory, a .gguf file, or 'smollm2-135m'.
        dtype: The compute dtype name (a key of DTYPES, e.g. "float32", "bfloat16").
        param_dtype: The storage dtype name; None means `dtype`.
        scan_layers: Whether the config stores the layers stacked (ModelConfig.scan_layers).
        quant: "none", "int8" or "nf4" (ModelConfig.quant).

    Returns:
        A tuple (source, config, tokenizer): an HFSource or GGUFSource, its ModelConfig with these settings, and
        a transformers tokenizer (None when an HF directory ships no tokenizer files).

    Raises:
        UserError: For an unsupported dtype, a path that is not a model, or a tokenizer larger than the vocabulary.
    """
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype or dtype)):
        if value not in DTYPES:
            raise UserError(f"{name} {value!r} is not supported; use one of {', '.join(DTYPES)}")
    source = open_source(path_or_name)
    cfg = source.config(dtype=dtype, param_dtype=param_dtype or dtype, scan_layers=scan_layers, quant=quant)
    tokenizer = source.tokenizer()
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
        raise UserError(f"{path_or_name}: tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                        f"{cfg.vocab_size}; the tokenizer files belong to another model")
    return source, cfg, tokenizer


def load(path_or_name: str, dtype: str = "float32", mesh=None, param_dtype: str | None = None,
         rules=shd.DEFAULT_RULES, progress: bool = True, scan_layers: bool = False, quant: str = "none"):
    """(model, tokenizer) from an HF checkpoint directory, a .gguf file, 'smollm2-135m', or an HF PEFT LoRA adapter
    directory (the base it names, with the adapters); each may be local or gs://.

    dtype: compute dtype; param_dtype: storage dtype (default: dtype). With a mesh, each parameter
    is placed straight onto its sharding. scan_layers: store the layers stacked and run them as one scan
    (ModelConfig.scan_layers). quant: int8 | nf4 stores the projections quantized, a frozen base for LoRA
    (soft_jax.models.quant). tokenizer is a transformers tokenizer, or None when an HF
    directory ships no tokenizer files.

    Args:
        path_or_name: An HF checkpoint directory, a .gguf file, or 'smollm2-135m'.
        dtype: The compute dtype name.
        mesh: A jax Mesh to place the parameters on, or None for the first device.
        param_dtype: The storage dtype name; None means `dtype`.
        rules: The logical-axis sharding rules (soft_jax.parallel.sharding).
        progress: Whether to show a progress bar while the weights load.
        scan_layers: Whether to store the layers stacked.
        quant: "none", "int8" or "nf4".

    Returns:
        A tuple (model, tokenizer): the Llama with its weights, and the tokenizer or None.

    Raises:
        UserError: As `inspect` does, and when the weights do not match the config.
    """
    from soft_jax.models import lora

    if lora.is_peft_dir(path_or_name):  # the base first; the adapters copy it, then the copy is placed
        base, tokenizer = load(lora.peft_base(path_or_name), dtype, None, param_dtype, rules, progress, scan_layers,
                               quant)
        return shard_model(lora.load_peft(base, path_or_name), mesh, rules), tokenizer
    source, cfg, tokenizer = inspect(path_or_name, dtype, param_dtype, scan_layers, quant)
    return build(source, cfg, mesh=mesh, rules=rules, progress=progress), tokenizer


def shard_model(model, mesh, rules=shd.DEFAULT_RULES):
    """Moves every parameter (and quantized array) of an NNX model onto its sharding (in place); returns it.

    Args:
        model: An NNX model whose parameters carry logical "axes" metadata.
        mesh: A jax Mesh, or None for the first device.
        rules: The logical-axis sharding rules.

    Returns:
        The same model object.
    """
    for _, var in nnx.iter_graph(model):
        if isinstance(var, (nnx.Param, Quantized)):
            sharding = shd.named_sharding(var.get_metadata().get("axes", ()), var.shape, mesh, rules)
            var.set_value(jax.device_put(np.asarray(var[...]), sharding))
    return model


__all__ = ["KVCache", "Llama", "ModelConfig", "SMOLLM2", "build", "export_hf", "init_random", "inspect", "load",
           "shard_model"]
