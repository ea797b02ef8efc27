"""ModelConfig: one description of a Llama-family decoder, read from and written to HF config.json."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from soft_jax.core.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")  # parameter and compute dtypes of a model (run configs check them too)
# model_type -> (HF architecture class name, q/k/v bias, output-projection bias)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama 2/3, Mistral, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or a dict with "rope_type" in ROPE_TYPES and that type's keys (HF layout).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # Storage dtype of parameters and dtype of activations/matmuls.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # How soft-jax stores and runs the layers, not part of the checkpoint: stacked [layers, ...] parameters run as
    # one lax.scan (soft_jax.models.llama). HF config.json never carries it.
    scan_layers: bool = False
    # The frozen base's projections stored quantized (soft_jax.models.quant: none | int8 | nf4), for LoRA on top.
    quant: str = "none"

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise UserError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_kv_heads}); fix the checkpoint's config.json")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(f"unsupported {name} {getattr(self, name)!r}; use one of {', '.join(DTYPES)}")
        from soft_jax.models.quant import KINDS

        if self.quant not in KINDS:
            raise UserError(f"unsupported model.quant {self.quant!r}; use one of {', '.join(KINDS)}")
        rope_type = self.rope_dict.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise UserError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")

    @property
    def rope_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def num_params(self) -> int:
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = e * q + 2 * e * kv + q * e + (q + 2 * kv) * self.qkv_bias + e * self.o_bias
        layer = attn + 3 * e * f + 2 * e
        embed = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + e

    # --- HF config.json -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any], where: str = "config.json", **overrides) -> ModelConfig:
        """Reads both config.json layouts: top-level rope_theta/rope_scaling and transformers-5 rope_parameters."""
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise UserError(
                f"{where}: unsupported architecture model_type={model_type!r} "
                f"(architectures={hf.get('architectures')}); supported: {', '.join(ARCHITECTURES)} "
                "(Llama 2/3, Mistral, Qwen2)")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(missing)}; re-export the checkpoint's config.json "
                            "with transformers' save_pretrained")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"{where}: unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is supported")
        if hf.get("mlp_bias"):
            raise UserError(f"{where}: mlp_bias=true is not supported; only bias-free MLPs (Llama, Mistral, Qwen2)")
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise UserError(f"{where}: Qwen2 use_sliding_window=true is not supported; set it to false")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.pop("type", "default"))
        rope["rope_type"] = rope_type
        rope = None if rope_type == "default" else tuple(sorted(rope.items()))
        heads = hf["num_attention_heads"]
        bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            model_type=model_type,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else bias,
            o_bias=False if model_type == "qwen2" else bias,
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            param_dtype=dtype if dtype in DTYPES else "float32",
            dtype=dtype if dtype in DTYPES else "float32",
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """config.json that transformers (4.x and 5.x) loads with from_pretrained."""
        rope = {"rope_type": "default", **self.rope_dict}
        hf = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_dict),
            "rope_parameters": {**rope, "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "torch_dtype": self.param_dtype,
            "dtype": self.param_dtype,
        }
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            hf["use_sliding_window"] = False
        else:
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        return hf


def rope_inv_freq(cfg: ModelConfig):
    """Inverse rotary frequencies, with linear or Llama-3 scaling (as transformers computes them)."""
    import numpy as np

    d = cfg.head_dim
    f32 = np.float32  # transformers computes these in float32; match it to the last bit we can
    inv = f32(1.0) / (f32(cfg.rope_theta) ** (np.arange(0, d, 2).astype(f32) / f32(d)))
    rope = cfg.rope_dict
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        inv = inv / rope["factor"]
    elif kind == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = f32(2 * math.pi) / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen > old_len / lo, inv / factor, inv)
        medium = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv = np.where(medium, smoothed, inv)
    return inv.astype(np.float32)
