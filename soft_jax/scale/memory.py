"""Device-memory estimates for a SOFT round, before any weights are read.

A round has two phases that do not coexist: generation (params + KV cache + one prefill pass) and SFT
(params + Adam moments + gradients + one micro-batch's activations and logits). `estimate` gives the
bytes PER DEVICE of each part on a (data, fsdp, tensor) mesh, `check` refuses a run whose larger phase
cannot fit, and `preset_table` writes the estimate's side of the memory table in benchmarks/RESULTS.md.

The numbers follow what soft_jax does today, not an ideal implementation:
- Parameters, gradients and Adam moments are split over fsdp x tensor (soft_jax.parallel.sharding shards
  "embed" over fsdp and heads/mlp/vocab over tensor) and replicated over data. The moments and the
  gradients have the parameters' dtype (optax.scale_by_adam follows its input).
- training.Trainer copies the parameters it donates to its step while the caller keeps its model, so
  training holds two parameter copies; `keep_base` adds the base model that the round loop keeps alive from
  round 2 on (the current model and the base are then different arrays).
- Attention is not fused: the float32 scores [batch, heads, query, key] of a layer are materialised,
  in training and in prefill alike.
- The KV cache is split over data x fsdp by batch row and over tensor by KV head (sharding.cache_sharding);
  a shared prefix (principles + exemplars) is held once per group of rows (sampling.group_batches), the
  groups split over data x fsdp when those divide them, else replicated.
- Training activations are the residuals jax saves per layer, less the softmax intermediates XLA fuses
  away (`_layer_activations`); with remat only each layer's input is kept. XLA's CPU compiler does not
  exploit remat (its buffers hold every layer's recomputation), so on CPU the no-remat numbers apply.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from soft_jax.core.errors import UserError
from soft_jax.models.config import ModelConfig
from soft_jax.parallel.sharding import MESH_AXES

GiB = 1024 ** 3


def size_text(n: int) -> str:
    """Bytes as GiB (from a tenth of one) or MiB, for one-line messages."""
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MiB"
@dataclasses.dataclass(frozen=True)
class Shapes:
    """The sizes a round's programs are compiled at (all counts global, over every device)."""

    train_rows: int  # micro-batch rows (train.batch_size / grad_accum)
    grad_accum: int
    row_len: int
    remat: bool
    scan_layers: bool
    sample_rows: int
    prefix_len: int  # shared prefix tokens (0: none)
    own_len: int  # each row's own prompt tokens (bucketed)
    new_tokens: int
    score_rows: int
    score_context: int  # cached context tokens per scored row
    score_len: int  # tokens read per scored row
    keep_base: bool
    prefix_groups: int = 1  # shared prefixes in a sampling batch (sampling.group_batches)
    extra_slots: int = 0  # cache slots past the sampled tokens (a forced answer's marker and answer)
    kv_dtype: str = "model"  # sampling.kv_dtype: the sampling cache's storage ("model" | "int8")
    decode_segment: int = 0  # sampling.decode_segment: decode's window step (0: every step reads the whole cache)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# (data, fsdp, tensor): `config.mesh.update(memory.mesh_preset("v4-32"))` in a config file.
MESH_PRESETS: dict[str, tuple[int, int, int]] = {
    "cpu": (1, 1, 1),
    "gpu": (1, 1, 1),  # one GPU
    "gpu-8": (1, 8, 1),  # one 8-GPU node, fully sharded
    "tpu-host": (1, 8, 1),  # one TPU VM host with 8 chips (v5e-8, v6e-8)
    "v4-32": (2, 8, 1),  # 16 chips, 4 hosts
    "v5e-64": (4, 16, 1),  # 64 chips, 16 hosts
}
# Memory per device of the hardware each preset is written for (the table's "fits" column).
PRESET_DEVICE_BYTES = {"cpu": None, "gpu": 80 * GiB, "gpu-8": 80 * GiB, "tpu-host": 16 * GiB,
                       "v4-32": 32 * GiB, "v5e-64": 16 * GiB}
PRESET_HARDWARE = {"cpu": "host RAM", "gpu": "1x H100/A100 80 GB", "gpu-8": "8x H100 80 GB",
                   "tpu-host": "v5e-8 (16 GiB/chip)", "v4-32": "v4-32 (32 GiB/chip)", "v5e-64": "v5e-64 (16 GiB/chip)"}


def mesh_preset(name: str) -> dict[str, int]:
    """{"data": .., "fsdp": .., "tensor": ..} of a preset, for `config.mesh.update(...)`."""
    if name not in MESH_PRESETS:
        raise UserError(f"unknown mesh preset {name!r}; use one of {', '.join(MESH_PRESETS)}")
    return dict(zip(MESH_AXES, MESH_PRESETS[name]))


def _mesh(shape: Mapping[str, int] | Sequence[int]) -> dict[str, int]:
    sizes = dict(shape) if isinstance(shape, Mapping) else dict(zip(MESH_AXES, shape))
    if set(sizes) != set(MESH_AXES) or any(not isinstance(v, int) or v < 1 for v in sizes.values()):
        raise UserError(f"mesh {shape}: give positive sizes for exactly {', '.join(MESH_AXES)} (resolve -1 first)")
    return sizes


def resolve_mesh(shape: Mapping[str, int] | Sequence[int], devices: int) -> dict[str, int]:
    """The mesh with its -1 entry (if any) replaced by what the device count leaves, as make_mesh does."""
    sizes = dict(shape) if isinstance(shape, Mapping) else dict(zip(MESH_AXES, shape))
    known = math.prod(v for v in sizes.values() if v != -1)
    return _mesh({k: (devices // max(known, 1) if v == -1 else v) for k, v in sizes.items()})


def _bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise UserError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _div(n: int, k: int) -> int:
    return -(-n // k)


def _layer_params(cfg: ModelConfig) -> int:
    e, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    return 2 * e * q + 2 * e * kv + 3 * e * cfg.intermediate_size


def _layer_activations(cfg: ModelConfig, rows: int, q_len: int, k_len: int, tp: int, cb: int, *,
                       backward: bool, prefix: bool = False) -> int:
    """Bytes of one decoder layer: what it saves for the backward pass (jax's residuals, as
    `jax.ad_checkpoint.print_saved_residuals` lists them, less what XLA's fusion drops), or what a forward
    pass holds at once.

    rows x q_len tokens attend to k_len keys. Residuals: two RMSNorms (a float32 copy + output), the
    residual stream twice, q, k, v, the attention output, per head the float32 probabilities (+ their
    compute-dtype cast) and the mask, and six [tokens, mlp] tensors of
    SwiGLU. A forward pass holds the float32 scores and probabilities (+ the concatenation with a shared
    prefix's scores), the cast, the mask and three [tokens, mlp] tensors."""
    tokens = rows * q_len
    heads, kv_heads = _div(cfg.num_heads, tp), _div(cfg.num_kv_heads, tp)
    cast = cb if cb != 4 else 0  # a float32 model's casts are no-ops
    norm = 4 + cb + cast
    embed = tokens * cfg.hidden_size * (2 * norm + 2 * cb if backward else norm + 2 * cb)
    attn = tokens * cfg.head_dim * (2 * heads + 2 * kv_heads) * cb
    # jax saves the masked scores, their exp and the probabilities; XLA fuses the softmax and keeps only the
    # probabilities (+ cast) and the mask for the backward pass (its buffer assignment, tests/scale/test_memory.py)
    per_score = (4 + cast + 1) if backward else (2 * 4 + 4 * prefix + cast + 1)
    scores = rows * heads * q_len * k_len * per_score
    mlp = tokens * _div(cfg.intermediate_size, tp) * (6 if backward else 3) * cb
    return embed + attn + scores + mlp


def estimate(model_cfg: ModelConfig, *, mesh_shape: Mapping[str, int] | Sequence[int], train_batch: int,
             train_seq: int, grad_accum: int = 1, remat: bool = False, sample_batch: int, sample_len: int,
             sample_new: int = 0, sample_prefix: int = 0, sample_groups: int = 1, sample_extra: int = 0,
             keep_base: bool = False, optimizer_dtype: str | None = None, kv_dtype: str = "model"
             ) -> dict[str, int]:
    """Bytes per device of each part of a round, and the total of each phase.

    train_batch rows of train_seq tokens per optimizer step, in grad_accum micro-batches.
    sample_batch rows of sample_len tokens (prompt + sample_new new tokens); the rows come in sample_groups
    groups (sampling.group_batches), each group's first sample_prefix tokens shared by its rows and held once
    (sampling's prefix reuse; the groups' prefixes are prefilled as one batch); the own prompt
    (sample_len - sample_prefix - sample_new tokens; all of it when sample_new is 0) is prefilled in one pass.
    sample_extra: cache slots past the sampled tokens (a forced answer's marker and answer).
    keep_base: the base model stays in memory beside the current one (the round loop, from round 2 on).
    optimizer_dtype: dtype of Adam's moments; None = the parameters' dtype (what soft_jax.training does).
    kv_dtype: the own rows' cache storage: "model" (the compute dtype) or "int8" (a byte per value and a float32
    scale per slot and head; the shared prefixes stay in the compute dtype).

    Keys: params (one copy), optimizer, gradients, activations, logits, weights_transient, kv_cache,
    prefill, param_copies_train, param_copies_generate, train_total, generate_total, micro_rows and
    sample_rows (batch rows each device holds).
    """
    mesh = _mesh(mesh_shape)
    if train_batch < 1 or grad_accum < 1 or train_batch % grad_accum:
        raise UserError(f"train batch {train_batch} must be a positive multiple of grad_accum {grad_accum}")
    if sample_prefix + sample_new > sample_len or min(train_seq, sample_batch, sample_len, sample_groups) < 1:
        raise UserError(f"sample_len {sample_len} must hold sample_prefix {sample_prefix} + sample_new "
                        f"{sample_new}, and batch sizes, groups and lengths must be positive")
    cfg = model_cfg
    pb, cb = _bytes(cfg.param_dtype), _bytes(cfg.dtype)
    ob = _bytes(optimizer_dtype or cfg.param_dtype)
    dp, tp, shards = mesh["data"] * mesh["fsdp"], mesh["tensor"], mesh["fsdp"] * mesh["tensor"]
    n, e, layers = cfg.num_params, cfg.hidden_size, cfg.num_layers
    vocab = _div(cfg.vocab_size, tp)

    params = _div(n * pb, shards)
    optimizer = 2 * _div(n * ob, shards)
    gradients = params * (2 if grad_accum > 1 else 1)  # the scan's accumulator + one micro-batch's gradients
    # FSDP gathers a layer's weights (and a cast to the compute dtype makes a copy): two layers in flight.
    gathered = mesh["fsdp"] > 1 or pb != cb
    weights_transient = 2 * _div(_layer_params(cfg) * cb, tp) if gathered else 0

    micro_rows = _div(train_batch // grad_accum, dp)
    layer = _layer_activations(cfg, micro_rows, train_seq, train_seq, tp, cb, backward=True)
    inputs = micro_rows * train_seq * e * cb
    if remat:  # layer inputs kept; one layer recomputed, plus its backward's working set
        activations = layers * inputs + 2 * layer
    else:  # every layer's residuals, plus the backward's working set of one layer
        activations = layers * layer + layer
        if pb != cb:  # the compute-dtype casts of the weights are residuals of the matmuls
            activations += _div((n - cfg.vocab_size * e) * cb, shards)
    if pb != cb:  # the (tied or untied) output projection's cast, kept for the loss's backward
        activations += _div(cfg.vocab_size * e * cb, shards)
    # float32 logits, their exp for logsumexp's backward, and the compute-dtype matmul output
    logits = micro_rows * train_seq * vocab * (2 * 4 + (cb if cb != 4 else 0))

    sample_rows = _div(sample_batch, dp)
    own_slots = sample_len - sample_prefix + sample_extra
    per_token = 2 * layers * _div(cfg.num_kv_heads, tp) * cfg.head_dim * cb
    own_per_token = per_token if kv_dtype != "int8" else 2 * layers * _div(cfg.num_kv_heads, tp) * (cfg.head_dim + 4)
    # the groups' prefixes split over data x fsdp like rows when those divide them, else replicated
    prefix_groups = sample_groups // dp if sample_groups % dp == 0 else sample_groups
    kv_cache = sample_rows * own_slots * (own_per_token + 2 * 4) + prefix_groups * sample_prefix * (per_token + 2 * 4)
    prompt = sample_len - sample_prefix - sample_new if sample_new else own_slots
    # the own prompt attends to its cache slots and to the shared prefix
    own_pass = _layer_activations(cfg, sample_rows, max(prompt, 1), own_slots + sample_prefix, tp, cb,
                                  backward=False, prefix=sample_prefix > 0)
    prefix_pass = (_layer_activations(cfg, prefix_groups, sample_prefix, sample_prefix, tp, cb, backward=False)
                   if sample_prefix else 0)
    decode = sample_rows * vocab * 4 * 4  # logits, their sort fallback and filtering, per step
    prefill = max(own_pass, prefix_pass, decode)

    copies_train, copies_generate = 2 + int(keep_base), 1 + int(keep_base)
    train_total = (copies_train * params + optimizer + gradients + activations + logits + weights_transient)
    generate_total = copies_generate * params + kv_cache + prefill + weights_transient
    return dict(params=params, optimizer=optimizer, gradients=gradients, activations=activations, logits=logits,
                weights_transient=weights_transient, kv_cache=kv_cache, prefill=prefill,
                param_copies_train=copies_train, param_copies_generate=copies_generate, train_total=train_total,
                generate_total=generate_total, micro_rows=micro_rows, sample_rows=sample_rows)


def for_shapes(model_cfg: ModelConfig, shapes: Shapes, mesh_shape: Mapping[str, int] | Sequence[int]
               ) -> dict[str, int]:
    """estimate() at the sizes a round's programs are compiled at (for a run config:
    soft_jax.experiment.preflight.run_shapes, with sampling's padding buckets)."""
    s = shapes
    return estimate(model_cfg, mesh_shape=mesh_shape, train_batch=s.train_rows * s.grad_accum, train_seq=s.row_len,
                    grad_accum=s.grad_accum, remat=s.remat, sample_batch=s.sample_rows,
                    sample_len=s.prefix_len + s.own_len + s.new_tokens, sample_new=s.new_tokens,
                    sample_prefix=s.prefix_len, sample_groups=s.prefix_groups, sample_extra=s.extra_slots,
                    keep_base=s.keep_base, kv_dtype=s.kv_dtype)


def device_memory() -> int | None:
    """Bytes device 0 may allocate (jax's bytes_limit on GPU/TPU); None on CPU or when jax cannot tell."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not implement memory_stats
        return None
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


def gib(n: int | float) -> str:
    return f"{n / GiB:.1f}"


def refuse_if_over(estimate_dict: Mapping[str, int], available: int | None, headroom: float = 0.9) -> None:
    """Raises UserError (one line) when the larger phase exceeds headroom x the device's memory."""
    if available is None:
        return
    need, phase = max((estimate_dict["train_total"], "training"), (estimate_dict["generate_total"], "generation"))
    if need <= headroom * available:
        return
    if phase == "training":
        mend = ("raise mesh.fsdp (or mesh.tensor) to split parameters and Adam state over more devices, lower "
                "train.batch_size per grad_accum (raise train.grad_accum), set train.remat=true, or use "
                "model.param_dtype=bfloat16")
    else:
        mend = ("lower sampling.batch_size or sampling.max_new_tokens, share the prompt prefix "
                "(exemplars.granularity=batch), raise mesh.fsdp/mesh.data, or use model.dtype=bfloat16")
    raise UserError(f"{phase} needs about {gib(need)} GiB per device (estimate) but a device has "
                    f"{gib(available)} GiB ({headroom:.0%} usable); {mend}")


# SOFT at scale: 128 packed rows of 1024 tokens per step (2 rows per device per micro-batch), remat;
# 64 prompts per sampling batch: a 2048-token prompt (1792 shared principles + exemplars, 256 own) + 512 new.
TABLE_SETTINGS = dict(train_batch=128, train_seq=1024, rows_per_device=2, remat=True, sample_batch=64,
                      sample_len=2048 + 512, sample_new=512, sample_prefix=1792, keep_base=True)


def preset_estimate(cfg: ModelConfig, mesh_name: str, settings: Mapping[str, object] = TABLE_SETTINGS) -> dict:
    """estimate() on a mesh preset, with grad_accum chosen for settings["rows_per_device"] rows per micro-batch."""
    s, mesh = dict(settings), mesh_preset(mesh_name)
    accum = max(1, s["train_batch"] // (s["rows_per_device"] * mesh["data"] * mesh["fsdp"]))
    return dict(estimate(cfg, mesh_shape=mesh, train_batch=s["train_batch"], train_seq=s["train_seq"],
                         grad_accum=accum, remat=s["remat"], sample_batch=s["sample_batch"],
                         sample_len=s["sample_len"], sample_new=s["sample_new"], sample_prefix=s["sample_prefix"],
                         keep_base=s["keep_base"]), grad_accum=accum)
