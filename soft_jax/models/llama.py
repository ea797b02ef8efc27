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


@struct.dataclass
class KVCache:
    """Preallocated keys and values for every layer, plus each slot's position and segment.

    k, v: a tuple of per-layer [B, S, KV_HEADS, D] arrays, or one stacked [layers, B, S, KV_HEADS, D] array when
    the model's layers are scanned (ModelConfig.scan_layers); positions, segment_ids: [B, S] (segment 0 = empty slot);
    index: the next slot to write (a scalar, the same for every row); prefix: an optional SharedPrefix
    that precedes every row's own slots.
    """

    k: tuple
    v: tuple
    positions: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    prefix: SharedPrefix | None = None

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=None, prefix: SharedPrefix | None = None):
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
        if cfg.scan_layers:
            k, v = (jnp.zeros((cfg.num_layers, *shape), dtype) for _ in range(2))
        else:
            k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)) for _ in range(2))
        return cls(k=k, v=v,
                   positions=jnp.zeros((batch, length), jnp.int32),
                   segment_ids=jnp.zeros((batch, length), jnp.int32), index=jnp.zeros((), jnp.int32),
                   prefix=prefix)

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
        """rope: (cos, sin); mask: [B, T, S] over the keys (this call's tokens, or the whole cache);
        kv: None, or (k_cache, v_cache, index, layer): this layer's cache [B, S, KV_HEADS, D] (layer None), or the
          stacked cache [layers, B, S, KV_HEADS, D] of which this is layer `layer` (a traced index); the new keys
          and values are written at slot `index`, in place, and the updated caches returned;
        prefix: None, or (k, v, mask [B, T, P]) of this layer's shared prefix, a row per group of rows."""
        b, t, _ = x.shape
        g = self.num_heads // self.num_kv_heads
        heads = lambda y, n, axis: constrain(y.reshape(b, t, n, self.head_dim), (BATCH, LENGTH, axis, None))
        q = apply_rope(heads(self.q_proj(x), self.num_heads, HEADS), rope)
        k = apply_rope(heads(self.k_proj(x), self.num_kv_heads, KV_HEADS), rope)
        v = heads(self.v_proj(x), self.num_kv_heads, KV_HEADS)
        if kv is None:
            keys, values = stored = k, v
        else:
            k_cache, v_cache, index, layer = kv
            (k_cache, keys), (v_cache, values) = (write_cache(c, new, index, layer)
                                                  for c, new in ((k_cache, k), (v_cache, v)))
            stored = k_cache, v_cache
        q = constrain(q.reshape(b, t, self.num_kv_heads, g, self.head_dim), (BATCH, LENGTH, KV_HEADS, None, None))
        scores = self._masked(jnp.einsum("btkgd,bskd->bkgts", q, keys.astype(q.dtype),
                                         preferred_element_type=jnp.float32), mask)
        if prefix is not None:  # one copy of a group's prefix keys serves each of its rows
            pk, pv, p_mask = prefix
            groups, n = pk.shape[:2]
            grouped = lambda y: y.reshape(groups, b // groups, *y.shape[1:])
            p_scores = jnp.einsum("grtkhd,gskd->grkhts", grouped(q), pk.astype(q.dtype),
                                  preferred_element_type=jnp.float32)
            scores = jnp.concatenate([self._masked(p_scores.reshape(b, *scores.shape[1:-1], n), p_mask), scores],
                                     axis=-1)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        if prefix is not None:
            out = jnp.einsum("grkhts,gskd->grtkhd", grouped(probs[..., :n]), pv.astype(q.dtype)).reshape(
                b, t, self.num_kv_heads, g, self.head_dim)
            out += jnp.einsum("bkgts,bskd->btkgd", probs[..., n:], values.astype(q.dtype))
        else:
            out = jnp.einsum("bkgts,bskd->btkgd", probs, values.astype(q.dtype))
        out = constrain(out.reshape(b, t, self.num_heads * self.head_dim), (BATCH, LENGTH, HEADS))
        return self.o_proj(out), stored

    def _masked(self, scores, mask):
        """Float32 attention scores [B, KV_HEADS, G, T, S] scaled, -inf-like where `mask` [B, T, S] is False."""
        scores = constrain(scores * (self.head_dim ** -0.5), (BATCH, KV_HEADS, None, LENGTH, None))
        return jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)


CACHE_LAYER = (BATCH, LENGTH, KV_HEADS, None)


def write_cache(cache, new, index, layer=None):
    """(updated cache, this layer's keys or values [B, S, KV_HEADS, D]): `new` [B, T, KV_HEADS, D] written at slot
    `index` of a layer's cache, or of layer `layer` of a stacked cache. Only the T new slots are written: inside
    the decode loop the cache is a loop carry, updated in place."""
    new = new.astype(cache.dtype)
    if layer is None:
        cache = constrain(jax.lax.dynamic_update_slice(cache, new, (0, index, 0, 0)), CACHE_LAYER)
        return cache, cache
    cache = constrain(jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, index, 0, 0)), (LAYERS, *CACHE_LAYER))
    return cache, constrain(jax.lax.dynamic_index_in_dim(cache, layer, keepdims=False), CACHE_LAYER)


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
                 last_only=False, remat=False, at=None):
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
        window = cfg.sliding_window
        if cache is None:
            k_pos, k_seg = positions, segment_ids
        else:
            k_pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache.index))
            k_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                 (0, cache.index))
        mask = constrain(make_mask(positions, segment_ids, k_pos, k_seg, window), (BATCH, LENGTH, None))
        shared = None if cache is None else cache.prefix
        p_mask = None if shared is None else make_mask(positions, segment_ids, shared.per_row(shared.positions, b),
                                                       shared.per_row(shared.segment_ids, b), window)
        run = self._scanned_layers if cfg.scan_layers else self._layer_loop
        x, new_k, new_v = run(x, rope, mask, cache, p_mask, remat)
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
        return logits, KVCache(k=new_k, v=new_v, positions=k_pos, segment_ids=k_seg,
                               index=cache.index + t, prefix=cache.prefix)

    def _layer_loop(self, x, rope, mask, cache, p_mask, remat):
        """The layers one after another: (x, the caches' new keys, values: per-layer tuples, or None)."""
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            if cache is None:
                run = nnx.remat(lambda lyr, h, r, m: lyr(h, r, m)) if remat else lambda lyr, h, r, m: lyr(h, r, m)
                x, _ = run(layer, x, rope, mask)
                continue
            shared = cache.prefix
            prefix = None if shared is None else (shared.k[i], shared.v[i], p_mask)
            x, (k, v) = layer(x, rope, mask, (cache.k[i], cache.v[i], cache.index, None), prefix)
            new_k.append(k)
            new_v.append(v)
        return x, tuple(new_k), tuple(new_v)

    def _scanned_layers(self, x, rope, mask, cache, p_mask, remat):
        """The stacked layers as one `lax.scan` over their parameters: (x, the stacked caches' new keys, values,
        or None). The caches ride in the scan's carry, so each layer writes only its new slots, in place; a
        shared prefix's stacked keys and values are scanned over with the parameters."""
        graphdef, state = nnx.split(self.layers)
        if cache is None:
            def body(h, params):
                return nnx.merge(graphdef, params)(h, rope, mask)[0], None

            x, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x, state)
            return x, None, None
        shared = cache.prefix
        prefixes = None if shared is None else (shared.k, shared.v)

        def body(carry, xs):
            h, k_all, v_all = carry
            params, layer, prefix_kv = xs
            prefix = None if prefix_kv is None else (*prefix_kv, p_mask)
            h, (k_all, v_all) = nnx.merge(graphdef, params)(h, rope, mask, (k_all, v_all, cache.index, layer), prefix)
            return (h, k_all, v_all), None

        layers = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), (state, layers, prefixes))
        return x, k, v


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

