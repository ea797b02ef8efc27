"""A Flax NNX decoder for the Llama family: Llama 2/3, Mistral, Qwen2.

One model serves packed training and padded, KV-cached sampling. Each token carries a position (for
RoPE) and a segment id (0 = padding); a query attends to a key when both share a non-zero segment and
the key's position is not after the query's (and, for Mistral, within the sliding window). Packed rows
use one segment per example; padded rows use segment 1 for real tokens and 0 for padding.

Parameters carry logical axis names in their `axes` metadata; `soft_jax.parallel.sharding` maps them to a mesh.

With `ModelConfig.scan_layers` the decoder layers are stored stacked: `model.layers` is one DecoderLayer whose
every parameter has a leading "layers" axis, and every call (training, prefill, decode, scoring) runs them as one
`lax.scan`, with a stacked KV cache the scan writes in place. XLA then compiles one layer instead of all of them,
and no call stacks the weights. Checkpoints in HF layout convert at the edge (soft_jax.models.weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from soft_jax.models.config import ModelConfig, rope_inv_freq
from soft_jax.models.quant import Quantized, QuantizedKernel, array_axes, dequantize, supported
from soft_jax.parallel.sharding import constrain

# Logical axis names used by parameters and activations (see soft_jax.parallel.sharding for the rules).
VOCAB, EMBED, HEADS, KV_HEADS, MLP_AXIS, NORM = "vocab", "embed", "heads", "kv_heads", "mlp", "norm"
BATCH, LENGTH, LAYERS = "batch", "length", "layers"
LORA_RANK = "lora_rank"  # an adapter's rank axis: over fsdp, so that under FSDP no adapter array is whole everywhere
ROWS = (BATCH, LENGTH, EMBED)  # the residual stream [B, T, hidden]


class Adapter(nnx.Module):
    """A LoRA adapter beside a frozen kernel: x @ a @ b * scale, a [in, rank] and b [rank, out] (nnx.LoRAParam; with
    stacked layers each has the leading "layers" axis). `a` splits like the kernel's input axis, `b` like its
    output axis, and the rank axis over fsdp where that axis is still free (b; a of down_proj, whose input is mlp).
    A @ B is never formed: two thin matmuls cost rank x (in + out) per token."""

    # LoRA dropout, switched on for one training forward by soft_jax.models.lora.set_dropout: the rate, and
    # DropoutKeys of per-row key data [rows, 2]. Off (rate 0, no keys) everywhere else: generation, scoring, export.
    dropout: float = 0.0
    keys = None

    def __init__(self, a: nnx.LoRAParam, b: nnx.LoRAParam, scale: float):
        self.a, self.b, self.scale = a, b, scale

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    def __call__(self, x):
        """x: [tokens, in], the rows' tokens flattened (as Linear passes them)."""
        if self.dropout and self.keys is not None:  # as PEFT: only the adapter's input is dropped, not the kernel's
            keys = self.keys[...]
            rows = x.reshape(keys.shape[0], -1, x.shape[-1])
            keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.wrap_key_data(k), 1.0 - self.dropout,
                                                           rows.shape[1:]))(keys)
            x = jnp.where(keep, rows / jnp.asarray(1.0 - self.dropout, x.dtype), 0).reshape(x.shape).astype(x.dtype)
        return jnp.dot(jnp.dot(x, self.a[...].astype(x.dtype)), self.b[...].astype(x.dtype)) * jnp.asarray(
            self.scale, x.dtype)


class DropoutKeys(nnx.Variable):
    """PRNG key data (uint32 [rows, 2]; stacked layers: [layers, rows, 2]) of a LoRA adapter's dropout in one
    training step; neither trained nor saved."""


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ a LoRA adapter's x @ a @ b * scale); kernel stored [in, out] with logical axes."""

    def __init__(self, d_in, d_out, axes, *, bias, cfg: ModelConfig, rngs: nnx.Rngs, quantizable: bool = False):
        init = nnx.initializers.normal(stddev=0.02)
        kernel = init(rngs.params(), (d_in, d_out), jnp.dtype(cfg.param_dtype))
        if quantizable and cfg.quant != "none" and supported(cfg.quant, d_in):  # a frozen base: QLoRA
            self.kernel = QuantizedKernel(cfg.quant, kernel, tuple(axes))
        else:
            self.kernel = nnx.Param(kernel, axes=axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), cfg.param_dtype), axes=axes[1:]) if bias else None
        self.dtype = jnp.dtype(cfg.dtype)
        self.axes = tuple(axes)
        self.out_axis = axes[1]
        self.lora: Adapter | None = nnx.data(None)  # soft_jax.models.lora.add_adapters

    def __call__(self, x):
        # One 2-D matmul over the flattened tokens: its weight gradient is then a plain transposed-operand
        # matmul. With [B, T] kept as two free dims, XLA CPU transposed [B*T, out]-sized gradients (fused
        # into their elementwise producers) in the backward pass, a large part of a layer's fwd + bwd time
        # (benchmarks/RESULTS.md, "SFT train step").
        flat = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = jnp.dot(flat, self.weight(self.dtype))
        if self.lora is not None:
            y = y + self.lora(flat)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return constrain(y.reshape(*x.shape[:-1], y.shape[-1]), (BATCH, LENGTH, self.out_axis))


    @property
    def quantized(self) -> bool:
        return isinstance(self.kernel, QuantizedKernel)

    def weight(self, dtype) -> jax.Array:
        """The kernel in `dtype` (dequantized inside the matmul's program when stored quantized)."""
        if not self.quantized:
            return self.kernel[...].astype(dtype)
        # Gather the quantized arrays over fsdp (their activation layout: embed whole, heads / mlp over tensor)
        # before dequantizing: left to itself, XLA dequantizes each shard and all-gathers the float kernel, 4-8x the
        # bytes of the codes and scales.
        axes = array_axes(self.kernel.kind, self.axes)
        return dequantize(self.kernel.kind, {name: constrain(value, axes[name])
                                             for name, value in self.kernel.arrays().items()}, dtype)

    @property
    def kernel_var(self) -> nnx.Variable:
        """The variable that holds (the bulk of) the kernel: its shape's leading axes and its sharding."""
        return self.kernel.main if self.quantized else self.kernel


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, *, cfg: ModelConfig):
        self.scale = nnx.Param(jnp.ones((dim,), cfg.param_dtype), axes=(NORM,))
        self.eps = eps

    def __call__(self, x):
        # As transformers: normalise in float32, cast back, then scale.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


def rope_tables(positions, inv_freq, dtype):
    """cos and sin [B, T, 1, D] for the HF (rotate-half) rotary layout; computed once per forward."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x, rope):
    """x: [B, T, H, D]; rope: (cos, sin) from rope_tables."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


@struct.dataclass
class SharedPrefix:
    """Keys and values of a prefix rows share (the principles + exemplars), stored once per group of rows.

    k, v: as KVCache's, with G rows; positions, segment_ids: [G, P] (segment 0 = padding). G groups of
    consecutive rows (B / G each; G = 1: the whole batch): every row attends to its group's prefix as if it were
    its own first P tokens, without P x rows copies in memory.
    """

    k: tuple
    v: tuple
    positions: jax.Array
    segment_ids: jax.Array

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    @property
    def groups(self) -> int:
        return self.positions.shape[0]

    def per_row(self, x, rows: int):
        """A per-group array [G, ...] repeated for each of `rows` rows [rows, ...]."""
        return jnp.repeat(x, rows // self.groups, axis=0)


KV_DTYPES = ("model", "int8")  # a sampling cache's storage: the model's compute dtype, or int8 codes + scales


@struct.dataclass
class KVCache:
    """Preallocated keys and values for every layer, plus each slot's position and segment.

    k, v: a tuple of per-layer [B, S, KV_HEADS, D] arrays, or one stacked [layers, B, S, KV_HEADS, D] array when
    the model's layers are scanned (ModelConfig.scan_layers); positions, segment_ids: [B, S] (segment 0 = empty slot);
    index: the next slot to write (a scalar, the same for every row); prefix: an optional SharedPrefix
    that precedes every row's own slots. k_scale, v_scale: None, or for an int8 cache (k, v int8 codes) the float32
    scale of each slot's head, shaped as k with D = 1: a key is k * k_scale (`quantize_kv`).
    """

    k: tuple
    v: tuple
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    prefix: SharedPrefix | None = None
    k_scale: tuple | None = None
    v_scale: tuple | None = None

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=None, prefix: SharedPrefix | None = None):
        """An empty cache of `length` slots per row. dtype: None or "model" (the model's compute dtype), "int8"
        (codes and per-slot, per-head scales), or any other dtype to store in."""
        quantized = dtype == "int8"
        dtype = jnp.dtype(cfg.dtype if dtype in (None, "model") else dtype)
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)

        def arrays(shape, dtype):
            if cfg.scan_layers:
                return jnp.zeros((cfg.num_layers, *shape), dtype)
            return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))

        k, v = arrays(shape, dtype), arrays(shape, dtype)
        scales = (arrays(shape[:-1] + (1,), jnp.float32), arrays(shape[:-1] + (1,), jnp.float32)) if quantized \
            else (None, None)
        return cls(k=k, v=v,
                   positions=jnp.zeros((batch, length), jnp.int32),
                   segment_ids=jnp.zeros((batch, length), jnp.int32), index=jnp.zeros((), jnp.int32),
                   prefix=prefix, k_scale=scales[0], v_scale=scales[1])

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def as_prefix(self) -> SharedPrefix:
        """This cache's filled slots as a SharedPrefix (a row per group)."""
        return SharedPrefix(k=self.k, v=self.v, positions=self.positions, segment_ids=self.segment_ids)


def make_mask(q_pos, q_seg, k_pos, k_seg, window=None):
    """[B, T, S] boolean: same non-zero segment, causal by position, optional sliding window."""
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    mask &= k_pos[:, None, :] <= q_pos[:, :, None]
    if window is not None:
        mask &= q_pos[:, :, None] - k_pos[:, None, :] < window
    return mask


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, d = cfg.hidden_size, cfg.head_dim
        q = dict(cfg=cfg, rngs=rngs, quantizable=True)
        self.q_proj = Linear(e, cfg.num_heads * d, (EMBED, HEADS), bias=cfg.qkv_bias, **q)
        self.k_proj = Linear(e, cfg.num_kv_heads * d, (EMBED, KV_HEADS), bias=cfg.qkv_bias, **q)
        self.v_proj = Linear(e, cfg.num_kv_heads * d, (EMBED, KV_HEADS), bias=cfg.qkv_bias, **q)
        self.o_proj = Linear(cfg.num_heads * d, e, (HEADS, EMBED), bias=cfg.o_bias, **q)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d

    def __call__(self, x, rope, mask, kv=None, prefix=None):
        """rope: (cos, sin); mask: [B, T, W] over the keys read (this call's tokens, or the cache's first W slots);
        kv: None, or (caches, index, layer, window): caches = (k, v, k_scale, v_scale), this layer's cache
          [B, S, KV_HEADS, D] (layer None) or the stacked cache [layers, B, S, KV_HEADS, D] of which this is layer
          `layer` (a traced index), scales None or int8's (KVCache); the new keys and values are written at slot
          `index`, in place, attention reads the first `window` slots (None: all S), and the updated caches are
          returned;
        prefix: None, or (k, v, mask [B, T, P]) of this layer's shared prefix, a row per group of rows."""
        b, t, _ = x.shape
        g = self.num_heads // self.num_kv_heads
        heads = lambda y, n, axis: constrain(y.reshape(b, t, n, self.head_dim), (BATCH, LENGTH, axis, None))
        q = apply_rope(heads(self.q_proj(x), self.num_heads, HEADS), rope)
        k = apply_rope(heads(self.k_proj(x), self.num_kv_heads, KV_HEADS), rope)
        v = heads(self.v_proj(x), self.num_kv_heads, KV_HEADS)
        k_scale = v_scale = None
        if kv is None:
            keys, values = stored = k, v
        else:
            (k_cache, v_cache, ks_cache, vs_cache), index, layer, window = kv
            k_cache, ks_cache, keys, k_scale = write_cache(k_cache, ks_cache, k, index, layer, window)
            v_cache, vs_cache, values, v_scale = write_cache(v_cache, vs_cache, v, index, layer, window)
            stored = k_cache, v_cache, ks_cache, vs_cache
        q = constrain(q.reshape(b, t, self.num_kv_heads, g, self.head_dim), (BATCH, LENGTH, KV_HEADS, None, None))
        scores = jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
        if k_scale is not None:  # int8 keys: q . (codes * scale) = (q . codes) * scale, one scale per slot and head
            scores = scores * jnp.transpose(k_scale, (0, 2, 3, 1))[:, :, :, None, :]
        scores = self._masked(scores, mask)
        if prefix is not None:  # one copy of a group's prefix keys serves each of its rows
            pk, pv, p_mask = prefix
            groups, n = pk.shape[:2]
            grouped = lambda y: y.reshape(groups, b // groups, *y.shape[1:])
            p_scores = jnp.einsum("grtkhd,gskd->grkhts", grouped(q), pk.astype(q.dtype),
                                  preferred_element_type=jnp.float32)
            scores = jnp.concatenate([self._masked(p_scores.reshape(b, *scores.shape[1:-1], n), p_mask), scores],
                                     axis=-1)
        probs = jax.nn.softmax(scores, axis=-1)
        own = probs[..., n:] if prefix is not None else probs
        if v_scale is not None:  # int8 values: sum_s p_s (codes_s * scale_s) = sum_s (p_s * scale_s) codes_s
            own = own * jnp.transpose(v_scale, (0, 2, 3, 1))[:, :, :, None, :]
        out = jnp.einsum("bkgts,bskd->btkgd", own.astype(q.dtype), values.astype(q.dtype))
        if prefix is not None:
            out += jnp.einsum("grkhts,gskd->grtkhd", grouped(probs[..., :n].astype(q.dtype)),
                              pv.astype(q.dtype)).reshape(b, t, self.num_kv_heads, g, self.head_dim)
        out = constrain(out.reshape(b, t, self.num_heads * self.head_dim), (BATCH, LENGTH, HEADS))
        return self.o_proj(out), stored

    def _masked(self, scores, mask):
        """Float32 attention scores [B, KV_HEADS, G, T, S] scaled, -inf-like where `mask` [B, T, S] is False."""
        scores = constrain(scores * (self.head_dim ** -0.5), (BATCH, KV_HEADS, None, LENGTH, None))
        return jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)


CACHE_LAYER = (BATCH, LENGTH, KV_HEADS, None)


def quantize_kv(x):
    """(int8 codes, float32 scales [..., 1]) of keys or values x [..., D]: symmetric, one scale per slot and head
    (its largest |x| / 127), so x ~ codes * scale."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def write_cache(cache, scale, new, index, layer=None, window=None):
    """`new` [B, T, KV_HEADS, D] written at slot `index` of a layer's cache, or of layer `layer` of a stacked cache
    (with `scale` not None, as int8 codes and their scales); returns (cache, scale, this layer's first `window`
    slots [B, W, KV_HEADS, D] and their scales or None). window None: all S slots. Only the T new slots are
    written and only the window is read: inside the decode loop the cache is a loop carry, updated in place, and
    the slots past what was written are not read."""
    new_scale = None
    if scale is not None:
        new, new_scale = quantize_kv(new)
    arrays = [(cache, new.astype(cache.dtype))] + ([] if scale is None else [(scale, new_scale)])
    out = []
    for full, part in arrays:
        if layer is None:
            full = constrain(jax.lax.dynamic_update_slice(full, part, (0, index, 0, 0)), CACHE_LAYER)
            read = full if window is None else full[:, :window]
        else:
            full = constrain(jax.lax.dynamic_update_slice(full, part[None], (layer, 0, index, 0, 0)),
                             (LAYERS, *CACHE_LAYER))
            size = (1, *full.shape[1:2], window or full.shape[2], *full.shape[3:])
            read = jax.lax.dynamic_slice(full, (layer, 0, 0, 0, 0), size)[0]
        out.append((full, constrain(read, CACHE_LAYER)))
    (cache, keys), (scale, scales) = out[0], out[1] if scale is not None else (None, None)
    return cache, scale, keys, scales


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        q = dict(cfg=cfg, rngs=rngs, quantizable=True)
        self.gate_proj = Linear(e, f, (EMBED, MLP_AXIS), bias=False, **q)
        self.up_proj = Linear(e, f, (EMBED, MLP_AXIS), bias=False, **q)
        self.down_proj = Linear(f, e, (MLP_AXIS, EMBED), bias=False, **q)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg=cfg)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg=cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, rope, mask, kv=None, prefix=None):
        h, new_kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, prefix)
        x = constrain(x + h, ROWS)
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), ROWS), new_kv


class Llama(nnx.Module):
    """The decoder. `model(input_ids)` -> float32 logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        init = nnx.initializers.normal(stddev=0.02)
        self.embed_tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size),
                                           jnp.dtype(cfg.param_dtype)),
                                      axes=(VOCAB, EMBED))
        layers = [DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        self.layers = stack_layers(layers) if cfg.scan_layers else nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg=cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, (EMBED, VOCAB), bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, input_ids, positions=None, segment_ids=None, attention_mask=None, cache=None,
                 last_only=False, remat=False, at=None, window=None):
        """Logits for `input_ids` [B, T].

        positions: [B, T] RoPE positions; default: 0.. for each row, or from `attention_mask`
          (left or right padding) as transformers does, continuing after the cache's last position.
        segment_ids: [B, T] int, 0 = padding; default: `attention_mask`, else all ones.
        cache: a KVCache; the new tokens are written at `cache.index` and (logits, new cache) is
          returned instead of logits.
        last_only: compute logits for the last column only (prefill), shape [B, 1, vocab].
        at: [B, K] int, compute logits only at these columns of each row, shape [B, K, vocab] (training: the
          positions that carry loss; the final norm and the vocabulary matmul skip the rest).
        remat: recompute each layer's activations in the backward pass instead of storing them.
        window: with a cache, attention reads only its first `window` slots (a static int; None: all of them): the
          caller's promise that no later slot holds a token, this call's included (the decode loop's segments).
        The layers run as a python loop, or, when they are stored stacked (ModelConfig.scan_layers), as one
        `lax.scan`: the same outputs, with one compiled layer instead of all of them.
        """
        b, t = input_ids.shape
        if segment_ids is None:
            segment_ids = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                           else attention_mask.astype(jnp.int32))
        if positions is None:
            positions = default_positions(segment_ids, cache)
        cfg = self.config
        # The table gathered whole along embed (as FSDP gathers every weight): its lookup's gradient is then a
        # scatter of batch-split rows, not a re-split of the batch's activations along embed.
        table = constrain(self.embed_tokens[...], (VOCAB, EMBED))
        x = constrain(jnp.take(table, input_ids, axis=0).astype(cfg.dtype), ROWS)
        rope = tuple(constrain(r, (BATCH, LENGTH, None, None))
                     for r in rope_tables(positions, rope_inv_freq(cfg), x.dtype))
        if cache is None:
            k_pos, k_seg = positions, segment_ids
        else:
            k_pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache.index))
            k_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                 (0, cache.index))
        read = slice(None, window)
        mask = constrain(make_mask(positions, segment_ids, k_pos[:, read], k_seg[:, read], cfg.sliding_window),
                         (BATCH, LENGTH, None))
        shared = None if cache is None else cache.prefix
        p_mask = None if shared is None else make_mask(positions, segment_ids, shared.per_row(shared.positions, b),
                                                       shared.per_row(shared.segment_ids, b), cfg.sliding_window)
        run = self._scanned_layers if cfg.scan_layers else self._layer_loop
        x, caches = run(x, rope, mask, cache, p_mask, remat, window)
        if last_only:
            x = x[:, -1:]
        elif at is not None:
            x = constrain(jnp.take_along_axis(x, at[..., None], axis=1), ROWS)
        x = self.norm(x)
        if self.lm_head is None:  # a 2-D matmul, as in Linear
            logits = jnp.dot(x.reshape(-1, x.shape[-1]), table.astype(cfg.dtype).T)
            logits = constrain(logits.reshape(*x.shape[:-1], -1), (BATCH, LENGTH, VOCAB))
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        k, v, k_scale, v_scale = caches
        return logits, KVCache(k=k, v=v, positions=k_pos, segment_ids=k_seg, index=cache.index + t,
                               prefix=cache.prefix, k_scale=k_scale, v_scale=v_scale)

    def _layer_loop(self, x, rope, mask, cache, p_mask, remat, window):
        """The layers one after another: (x, the caches' new (k, v, k_scale, v_scale): per-layer tuples, the
        scales None unless int8; None without a cache)."""
        if cache is None:
            for layer in self.layers:
                run = nnx.remat(lambda lyr, h, r, m: lyr(h, r, m)) if remat else lambda lyr, h, r, m: lyr(h, r, m)
                x, _ = run(layer, x, rope, mask)
            return x, None
        new = []
        for i, layer in enumerate(self.layers):
            shared = cache.prefix
            prefix = None if shared is None else (shared.k[i], shared.v[i], p_mask)
            scales = (None, None) if not cache.quantized else (cache.k_scale[i], cache.v_scale[i])
            x, stored = layer(x, rope, mask, ((cache.k[i], cache.v[i], *scales), cache.index, None, window), prefix)
            new.append(stored)
        k, v, k_scale, v_scale = (tuple(c) for c in zip(*new))
        return x, (k, v, *((k_scale, v_scale) if cache.quantized else (None, None)))

    def _scanned_layers(self, x, rope, mask, cache, p_mask, remat, window):
        """The stacked layers as one `lax.scan` over their parameters: (x, the stacked caches' new (k, v, k_scale,
        v_scale), or None). The caches ride in the scan's carry, so each layer writes only its new slots, in place;
        a shared prefix's stacked keys and values are scanned over with the parameters."""
        graphdef, state = nnx.split(self.layers)
        if cache is None:
            def body(h, params):
                return nnx.merge(graphdef, params)(h, rope, mask)[0], None

            x, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x, state)
            return x, None
        shared = cache.prefix
        prefixes = None if shared is None else (shared.k, shared.v)

        def body(carry, xs):
            h, caches = carry
            params, layer, prefix_kv = xs
            prefix = None if prefix_kv is None else (*prefix_kv, p_mask)
            h, caches = nnx.merge(graphdef, params)(h, rope, mask, (caches, cache.index, layer, window), prefix)
            return (h, caches), None

        layers = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        caches = (cache.k, cache.v, cache.k_scale, cache.v_scale)
        (x, caches), _ = jax.lax.scan(body, (x, caches), (state, layers, prefixes))
        return x, caches


def stack_layers(layers) -> DecoderLayer:
    """One DecoderLayer holding `layers`' parameters stacked along a new leading "layers" axis (each parameter's
    logical axes gain LAYERS in front)."""
    graphdef = nnx.graphdef(layers[0])
    stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(lyr) for lyr in layers]))
    for _, var in nnx.iter_graph(stacked):
        if isinstance(var, (nnx.Param, Quantized)):
            var.set_metadata("axes", (LAYERS, *var.get_metadata().get("axes", ())))
    return stacked


def unstack_layers(stacked: DecoderLayer) -> list[DecoderLayer]:
    """The inverse of stack_layers: one DecoderLayer per index of the leading axis (copies)."""
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]
    layers = [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(n)]
    for layer in layers:
        for _, var in nnx.iter_graph(layer):
            if isinstance(var, (nnx.Param, Quantized)):
                var.set_metadata("axes", tuple(var.get_metadata().get("axes", ()))[1:])
    return layers


def default_positions(segment_ids, cache=None):
    """0-based positions counting only real (non-zero segment) tokens, after the cache's tokens."""
    real = (segment_ids != 0).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
    if cache is not None:
        positions = positions + jnp.sum(cache.segment_ids != 0, axis=1, keepdims=True)
        if cache.prefix is not None:
            prefix = cache.prefix
            positions = positions + prefix.per_row(jnp.sum(prefix.segment_ids != 0, axis=1, keepdims=True),
                                                   positions.shape[0])
    return positions


def init_random(cfg: ModelConfig, seed: int = 0) -> Llama:
    """A randomly initialised model (tests, smoke runs)."""
    return Llama(cfg, rngs=nnx.Rngs(seed))

