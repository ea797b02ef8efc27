"""A Flax NNX decoder for the Llama family: Llama 2/3, Mistral, Qwen2.

One model serves packed training and padded, KV-cached sampling. Each token carries a position (for
RoPE) and a segment id (0 = padding); a query attends to a key when both share a non-zero segment and
the key's position is not after the query's (and, for Mistral, within the sliding window). Packed rows
use one segment per example; padded rows use segment 1 for real tokens and 0 for padding.

Parameters carry logical axis names in their `axes` metadata; `soft_jax.sharding` maps them to a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from soft_jax.models.config import ModelConfig, rope_inv_freq
from soft_jax.sharding import constrain

# Logical axis names used by parameters and activations (see soft_jax.sharding for the rules).
VOCAB, EMBED, HEADS, KV_HEADS, MLP_AXIS, NORM = "vocab", "embed", "heads", "kv_heads", "mlp", "norm"
BATCH, LENGTH = "batch", "length"
ROWS = (BATCH, LENGTH, EMBED)  # the residual stream [B, T, hidden]


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel stored [in, out] with logical axes."""

    def __init__(self, d_in, d_out, axes, *, bias, cfg: ModelConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), jnp.dtype(cfg.param_dtype)), axes=axes)
        self.bias = nnx.Param(jnp.zeros((d_out,), cfg.param_dtype), axes=axes[1:]) if bias else None
        self.dtype = jnp.dtype(cfg.dtype)
        self.out_axis = axes[1]

    def __call__(self, x):
        # One 2-D matmul over the flattened tokens: its weight gradient is then a plain transposed-operand
        # matmul. With [B, T] kept as two free dims, XLA CPU transposed [B*T, out]-sized gradients (fused
        # into their elementwise producers) in the backward pass, a large part of a layer's fwd + bwd time
        # (benchmarks/RESULTS.md, "SFT train step").
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return constrain(y.reshape(*x.shape[:-1], y.shape[-1]), (BATCH, LENGTH, self.out_axis))


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

    k, v: per layer [G, P, KV_HEADS, D]; positions, segment_ids: [G, P] (segment 0 = padding). G groups of
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

    k, v: per layer [B, S, KV_HEADS, D]; positions, segment_ids: [B, S] (segment 0 = empty slot);
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
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
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
        self.q_proj = Linear(e, cfg.num_heads * d, (EMBED, HEADS), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.k_proj = Linear(e, cfg.num_kv_heads * d, (EMBED, KV_HEADS), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.v_proj = Linear(e, cfg.num_kv_heads * d, (EMBED, KV_HEADS), bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * d, e, (HEADS, EMBED), bias=cfg.o_bias, cfg=cfg, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d

    def __call__(self, x, rope, mask, kv=None, prefix=None):
        """rope: (cos, sin); mask: [B, T, S] over the keys (this call's tokens, or the whole cache);
        kv: None, or (k_cache, v_cache, index) of this layer's cache, written at index;
        prefix: None, or (k, v, mask [B, T, P]) of this layer's shared prefix, a row per group of rows."""
        b, t, _ = x.shape
        g = self.num_heads // self.num_kv_heads
        heads = lambda y, n, axis: constrain(y.reshape(b, t, n, self.head_dim), (BATCH, LENGTH, axis, None))
        q = apply_rope(heads(self.q_proj(x), self.num_heads, HEADS), rope)
        k = apply_rope(heads(self.k_proj(x), self.num_kv_heads, KV_HEADS), rope)
        v = heads(self.v_proj(x), self.num_kv_heads, KV_HEADS)
        if kv is None:
            keys, values = k, v
        else:
            k_cache, v_cache, index = kv
            keys = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            values = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            keys, values = (constrain(c, (BATCH, LENGTH, KV_HEADS, None)) for c in (keys, values))
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
        return self.o_proj(out), (keys, values)

    def _masked(self, scores, mask):
        """Float32 attention scores [B, KV_HEADS, G, T, S] scaled, -inf-like where `mask` [B, T, S] is False."""
        scores = constrain(scores * (self.head_dim ** -0.5), (BATCH, KV_HEADS, None, LENGTH, None))
        return jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(e, f, (EMBED, MLP_AXIS), bias=False, cfg=cfg, rngs=rngs)
        self.up_proj = Linear(e, f, (EMBED, MLP_AXIS), bias=False, cfg=cfg, rngs=rngs)
        self.down_proj = Linear(f, e, (MLP_AXIS, EMBED), bias=False, cfg=cfg, rngs=rngs)

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
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg=cfg)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, (EMBED, VOCAB), bias=False, cfg=cfg, rngs=rngs)

    def __call__(self, input_ids, positions=None, segment_ids=None, attention_mask=None, cache=None,
                 last_only=False, remat=False, scan=False, at=None):
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
        scan: run the layers as one `lax.scan` (without a cache): XLA compiles one layer instead of all of
          them, so a deep model compiles far faster (benchmarks/RESULTS.md, `soft-jax plan`). Same outputs as
          the python loop.
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
        new_k, new_v = [], []
        if cache is None:
            k_pos, k_seg = positions, segment_ids
        else:
            k_pos = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache.index))
            k_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                 (0, cache.index))
        mask = constrain(make_mask(positions, segment_ids, k_pos, k_seg, window), (BATCH, LENGTH, None))
        shared = None if cache is None else cache.prefix
        if shared is not None:
            p_mask = make_mask(positions, segment_ids, shared.per_row(shared.positions, b),
                               shared.per_row(shared.segment_ids, b), window)
        if scan and cache is None:
            x = self._scanned_layers(x, rope, mask, remat)
        for i, layer in enumerate(() if scan and cache is None else self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i], cache.index)
            prefix = None if shared is None else (shared.k[i], shared.v[i], p_mask)
            if remat and cache is None:
                x, (k, v) = nnx.remat(lambda lyr, h, r, m: lyr(h, r, m))(layer, x, rope, mask)
            else:
                x, (k, v) = layer(x, rope, mask, kv, prefix)
            new_k.append(k)
            new_v.append(v)
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
        return logits, KVCache(k=tuple(new_k), v=tuple(new_v), positions=k_pos, segment_ids=k_seg,
                               index=cache.index + t, prefix=cache.prefix)

    def _scanned_layers(self, x, rope, mask, remat):
        """The decoder layers as one scan over their parameters, stacked in the compute dtype (what every
        layer casts its weights to anyway): one more copy of the layers' weights per device, in exchange for
        one compiled layer."""
        graphdef = nnx.graphdef(self.layers[0])
        dtype = jnp.dtype(self.config.dtype)
        stacked = jax.tree.map(lambda *xs: jnp.stack([v.astype(dtype) for v in xs]),
                               *[nnx.state(layer) for layer in self.layers])

        def body(h, state):
            return nnx.merge(graphdef, state)(h, rope, mask)[0], None

        x, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x, stacked)
        return x


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

