"""SFT ("principle engraving"): masked-loss, packed, sharded, resumable fine-tuning.

(prompt, response) pairs are rendered in the engraving format (the model's chat template, else a plain
format) and tokenized as prompt tokens + response tokens; only response tokens carry loss. Examples are
packed into fixed-length rows with per-example segment ids and positions, so attention never crosses
examples and the packed loss equals the unpacked one. The loss is the mean over every response token
of the global batch, also under gradient accumulation.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from soft_jax.core import faults, preemption
from soft_jax.core.errors import UserError
from soft_jax.core.settings import TrainConfig  # soft_jax.training.TrainConfig is the API
from soft_jax.data.templates import engraving_parts
from soft_jax.models.llama import Llama
from soft_jax.models.quant import Quantized
from soft_jax.parallel import sharding as shd

# Peak dense bf16 FLOP/s per chip, by a substring of jax's device_kind (for MFU).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
              "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


@dataclasses.dataclass
class Example:
    """One tokenized example: ids and, per token, whether it is a response (loss-bearing) token."""

    ids: list[int]
    is_response: list[bool]


@dataclasses.dataclass
class TrainResult:
    """What `train` reports about a run.

    Attributes:
        steps: The number of optimizer steps of the run (`total_steps`), resumed ones included.
        losses: The loss of each step this call ran (a resumed run lacks the steps before the checkpoint).
        examples: The number of rendered examples.
        truncated_prompts: How many prompts were cut on the left to max_prompt_len.
        truncated_responses: How many responses were cut on the right to max_response_len.
        tokens: The tokens of all examples together (prompt and response), counted once, not per epoch.
    """

    steps: int
    losses: list[float]
    examples: int
    truncated_prompts: int
    truncated_responses: int
    tokens: int


# --- rendering ----------------------------------------------------------------------------------


def render(tokenizer, prompt: str, response: str, config: TrainConfig, finished: bool = True
           ) -> tuple[Example, bool, bool]:
    """(example, prompt truncated?, response truncated?): prompt cut on the left, response on the right.

    Args:
        tokenizer: A transformers tokenizer; its chat template, when it has one, gives the format.
        prompt: The prompt text.
        response: The response text.
        config: The training settings; max_prompt_len and max_response_len are the token limits.
        finished: False when the response was cut short: then it gets no end-of-turn token(s).

    Returns:
        A tuple (example, prompt_truncated, response_truncated): the Example (prompt tokens, then response
        tokens, with `is_response` True on the response tokens), and whether the prompt and the response were cut.
    """
    head, tail, templated = engraving_parts(tokenizer, prompt, response, finished)
    p = tokenizer(head, add_special_tokens=not templated)["input_ids"]
    r = tokenizer(tail, add_special_tokens=False)["input_ids"]
    cut_p, cut_r = len(p) > config.max_prompt_len, len(r) > config.max_response_len
    p, r = p[-config.max_prompt_len:], r[:config.max_response_len]
    return Example(p + r, [False] * len(p) + [True] * len(r)), cut_p, cut_r


def check_overhead(tokenizer, config: TrainConfig) -> None:
    """Refuses maxima that cannot hold the format's own tokens plus one token of content.

    Args:
        tokenizer: A transformers tokenizer, as `render` takes it.
        config: The training settings; max_prompt_len and max_response_len are checked.

    Raises:
        UserError: When a maximum is not above the number of tokens the format takes on its own.
    """
    head, tail, templated = engraving_parts(tokenizer, "", "")
    p = len(tokenizer(head, add_special_tokens=not templated)["input_ids"])
    r = len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    if config.max_prompt_len <= p or config.max_response_len <= r:
        raise UserError(f"max_prompt_len {config.max_prompt_len} / max_response_len {config.max_response_len} leave "
                        f"no room for content: the engraving format alone takes {p} prompt and {r} response tokens; "
                        f"raise them above {p} and {r}")


# --- packing ------------------------------------------------------------------------------------


def pack(examples: Sequence[Example], row_len: int, pack_rows: bool = True,
         keep_order: bool = True) -> dict[str, np.ndarray]:
    """Rows of [n_rows, row_len]: inputs, targets, weights, segment_ids (0 = padding), positions.

    An example's token t predicts its token t + 1 (weight 1 when that token is a response token). With
    keep_order, examples fill rows in the given order (a row is closed at the first example that does not fit):
    step k trains on the k-th stretch of the sequence, as a curriculum needs. Without it, rows are filled best
    fit decreasing: longest example first, each into the fullest row it fits, which leaves a few percent of the
    slots empty where in-order filling of mixed lengths leaves a fifth (every empty slot is computed as if it
    were a token). With pack_rows=False every example gets its own row, in order.

    Args:
        examples: The tokenized examples. Each must fit a row: at most row_len + 1 tokens.
        row_len: The length of a row, in tokens.
        pack_rows: Whether several examples may share a row.
        keep_order: Whether rows hold the examples in the given order (else best fit decreasing).

    Returns:
        A dict of [n_rows, row_len] arrays: "inputs", "targets", "segment_ids" (1, 2, ... per example in the row;
        0 = padding) and "positions" (from 0 in each example) as int32; "weights" as float32 (1.0 where the
        target is a response token, else 0.0). Best fit decreasing gives the rows in the order they were opened
        (the first holds the longest example); shuffle them for training.
    """
    lengths = [len(ex.ids) - 1 for ex in examples]
    if not pack_rows:
        groups = [[i] for i in range(len(examples))]
    elif keep_order:
        groups, used = [], row_len + 1
        for i, n in enumerate(lengths):
            if used + n > row_len:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += n
    else:
        groups = best_fit_decreasing(lengths, row_len)
    rows = [[examples[i] for i in group] for group in groups]
    out = {k: np.zeros((len(rows), row_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    out["weights"] = np.zeros((len(rows), row_len), np.float32)
    for i, row in enumerate(rows):
        at = 0
        for seg, ex in enumerate(row, 1):
            n = len(ex.ids) - 1
            out["inputs"][i, at:at + n] = ex.ids[:-1]
            out["targets"][i, at:at + n] = ex.ids[1:]
            out["weights"][i, at:at + n] = ex.is_response[1:]
            out["segment_ids"][i, at:at + n] = seg
            out["positions"][i, at:at + n] = np.arange(n)
            at += n
    return out


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items taken longest first (ties in the given order), each put into the open bin
    with the least room that still holds it (the first opened among equals), else into a new bin.

    Args:
        lengths: Each item's size, at most `capacity`.
        capacity: A bin's size.

    Returns:
        The bins, in the order they were opened; each lists its items in the order they went in.
    """
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, bin), sorted: the tightest bin that fits is a bisection away
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            bins.append([i])
            left, b = capacity - lengths[i], len(bins) - 1
        else:
            left, b = room.pop(at)
            bins[b].append(i)
            left -= lengths[i]
        bisect.insort(room, (left, b))
    return bins


# --- the step -----------------------------------------------------------------------------------


def loss_width(epochs: list[dict[str, np.ndarray]], row_len: int) -> int:
    """How many positions per row the step computes logits at: the most loss-carrying positions of any row,
    rounded up to an eighth of the row (few distinct compiled shapes across rounds), at most the row.

    Args:
        epochs: pack()'s rows, one dict per epoch.
        row_len: The length of a row, in tokens.

    Returns:
        The most loss positions of any row (at least 1), rounded up to a multiple of max(8, row_len // 8),
        at most row_len.
    """
    most = max(int(np.count_nonzero(rows["weights"], axis=1).max(initial=0)) for rows in epochs)
    step = max(8, row_len // 8)
    return min(row_len, -(-max(most, 1) // step) * step)


def loss_rows(rows: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """pack()'s rows as the step takes them: per row the positions with non-zero loss weight (`loss_at`,
    padded with 0 to `width`), their targets and weights (0 where padded); inputs, segments, positions as is.

    Args:
        rows: pack()'s output: [n_rows, row_len] arrays.
        width: The number of loss positions per row, e.g. from `loss_width`.

    Returns:
        A dict with "inputs", "segment_ids" and "positions" ([n_rows, row_len], as given), and "loss_at",
        "loss_targets" (int32) and "loss_weights" (float32), each [n_rows, width].

    Raises:
        ValueError: When a row has more loss positions than `width`.
    """
    n = rows["inputs"].shape[0]
    out = {k: rows[k] for k in ("inputs", "segment_ids", "positions")}
    out["loss_at"], out["loss_targets"] = np.zeros((n, width), np.int32), np.zeros((n, width), np.int32)
    out["loss_weights"] = np.zeros((n, width), np.float32)
    for i in range(n):
        at = np.flatnonzero(rows["weights"][i])
        if len(at) > width:
            raise ValueError(f"row {i} has {len(at)} loss positions, more than the width {width}")
        out["loss_at"][i, :len(at)] = at
        out["loss_targets"][i, :len(at)] = rows["targets"][i, at]
        out["loss_weights"][i, :len(at)] = rows["weights"][i, at]
    return out


def loss_sums(model: Llama, batch, remat: bool = False) -> tuple[jax.Array, jax.Array]:
    """(sum of response-token NLL, number of response tokens) for one batch of loss_rows().

    The final norm, the vocabulary matmul and the cross-entropy run only at the `loss_at` positions.

    Args:
        model: The Llama to score with.
        batch: One batch of loss_rows(): "inputs", "positions", "segment_ids" [rows, row_len] and "loss_at",
            "loss_targets", "loss_weights" [rows, width].
        remat: Whether the model recomputes each layer's activations in the backward pass (saves memory).

    Returns:
        A tuple of two scalar arrays: the summed negative log-likelihood (in nats) of the targets, weighted by
        "loss_weights", and the sum of "loss_weights" (the number of response tokens).
    """
    logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"], remat=remat,
                   at=batch["loss_at"])
    # logsumexp - target logit: the same NLL as log_softmax, without a second vocabulary-sized tensor.
    target = jnp.take_along_axis(logits, batch["loss_targets"][..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    return jnp.sum(nll * batch["loss_weights"]), jnp.sum(batch["loss_weights"])


def make_schedule(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step (0-based): linear warmup from 0, then cosine decay.

    Args:
        config: The training settings: learning_rate (the peak), warmup_steps or else warmup_ratio of the
            steps, and end_lr_ratio (the final rate as a fraction of the peak).
        total_steps: The number of optimizer steps the schedule spans.

    Returns:
        An optax schedule: step index -> learning rate.

    Raises:
        UserError: When the warmup does not fit in `total_steps`.
    """
    warmup = config.warmup_steps if config.warmup_steps is not None else math.ceil(config.warmup_ratio * total_steps)
    if warmup > total_steps or (warmup == total_steps and total_steps > 0 and config.warmup_steps is not None):
        raise UserError(f"the learning-rate schedule has {total_steps} steps but warmup_steps is {warmup}; "
                        "lower warmup_steps, or train on more data / epochs")
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(total_steps, warmup + 1),
                                              config.learning_rate * config.end_lr_ratio)


@functools.cache
def _direction(max_grad_norm: float, b1: float, b2: float, eps: float, weight_decay: float):
    """AdamW without its learning rate (clip, Adam moments, decoupled decay). The learning rate is an
    argument of the step, so one compiled step serves every schedule (every round of a run)."""
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.add_decayed_weights(weight_decay))


def make_optimizer(config: TrainConfig):
    """The AdamW update direction without its learning rate; the step multiplies it by the schedule's rate.

    Args:
        config: The training settings: max_grad_norm, b1, b2, eps and weight_decay.

    Returns:
        An optax GradientTransformation (global-norm clipping, Adam moments, decoupled weight decay). The same
        settings give the same object, so compiled steps are shared.
    """
    return _direction(config.max_grad_norm, config.b1, config.b2, config.eps, config.weight_decay)


# XLA CPU options for the train step: XNNPACK instead of the default YNNPACK for its GEMMs, which makes the
# whole step faster on CPU (benchmarks/RESULTS.md, "SFT train step"). Other backends compile with their defaults.
CPU_TRAIN_COMPILER_OPTIONS = {"xla_cpu_use_xnnpack": True, "xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(platform: str) -> dict | None:
    """The XLA options the train step compiles with on `platform` ("cpu", "gpu", "tpu").

    Args:
        platform: The jax platform name of the devices.

    Returns:
        The compiler options dict for "cpu"; None (the defaults) for any other platform.
    """
    return CPU_TRAIN_COMPILER_OPTIONS if platform == "cpu" else None


BATCH_SPEC = PartitionSpec(None, ("data", "fsdp"))  # [grad_accum, micro-batch rows, length]
_steps: dict = {}


def compiled_step(graphdef, tx, remat: bool, platform: str, mesh=None, state=None, lora_dropout: float = 0.0):
    """The jitted train step (params, opt_state, batch, lr) -> (params, opt_state, metrics).

    On a mesh, parameters and Adam moments go in and come out on their logical shardings, the batch's rows
    over data x fsdp, and every activation is constrained (soft_jax.parallel.sharding). `state`: (params, opt_state,
    frozen) or their abstract shapes, for the shardings; they depend only on the graph and the mesh, so one
    compiled step serves every Trainer (every round of a run) with the same key. `frozen`: what the step reads
    but does not train (a LoRA model's base weights; empty in full fine-tuning), neither donated nor returned.

    Args:
        graphdef: The nnx graph definition of the model (nnx.split's first result).
        tx: The optimizer, from `make_optimizer`.
        remat: Whether the layers recompute their activations in the backward pass.
        platform: The jax platform name ("cpu", "gpu", "tpu"), for `compiler_options`.
        mesh: A jax Mesh, or None for one device.
        state: (params, opt_state, frozen), arrays or abstract shapes; needed with a mesh.
        lora_dropout: The LoRA dropout rate (models.lora.set_dropout); with it, batch also holds "noise": uint32
            key data [grad_accum, micro-batch rows, 2], one key per row (`Trainer.step` draws them).

    Returns:
        The jitted function (params, opt_state, batch, lr, frozen) -> (params, opt_state, metrics). params and
        opt_state are donated. batch holds loss_rows() arrays shaped [grad_accum, micro-batch rows, ...]; lr is a
        float32 scalar. metrics holds scalar arrays: "loss" (mean NLL per response token), "grad_norm" (global
        norm of the gradients, before clipping) and "tokens" (response tokens in the batch, at least 1).
    """
    key = (graphdef, tx, remat, platform, mesh, lora_dropout)
    if key not in _steps:
        shardings = {}
        if mesh is not None:
            params_sh, opt_sh, frozen_sh = shd.tree_shardings(state, mesh)
            replicated = NamedSharding(mesh, PartitionSpec())
            shardings = dict(in_shardings=(params_sh, opt_sh, NamedSharding(mesh, BATCH_SPEC), replicated, frozen_sh),
                             out_shardings=(params_sh, opt_sh, replicated))
        _steps[key] = jax.jit(functools.partial(_train_step, graphdef, tx, remat, lora_dropout, mesh),
                              donate_argnums=(0, 1),
                              compiler_options=compiler_options(platform), **shardings)
    return _steps[key]


class Trainer:
    """Owns the jitted, sharded train step for one model and optimizer.

    A model with LoRA adapters trains the adapters only: gradients and Adam moments exist for them alone, and
    the base weights go into the step as frozen inputs, never changed.

    Args:
        model: The Llama to train. It is not changed: the trainer copies its trained parameters.
        config: The training settings.
        total_steps: The number of optimizer steps, for the learning-rate schedule.
        mesh: A jax Mesh to shard parameters, optimizer state and batches over, or None for one device.

    Raises:
        UserError: When the warmup does not fit in `total_steps`, or the mesh's data axes do not divide the
            micro-batch (batch_size / grad_accum).
    """

    def __init__(self, model: Llama, config: TrainConfig, total_steps: int, mesh=None):
        from soft_jax.models import lora

        self.config, self.mesh = config, mesh
        self.schedule = make_schedule(config, total_steps)
        self.tx = make_optimizer(config)
        trainable = nnx.LoRAParam if lora.has_adapters(model) else nnx.Param
        self.graphdef, params, self.frozen = nnx.split(model, trainable, ...)
        self.params = jax.tree.map(lambda x: x.copy(), params)  # steps donate these; the caller keeps `model`
        # each moment on its parameter's sharding; scalars (Adam's count) replicated, so a restored state matches
        init = jax.jit(self.tx.init)
        if mesh is not None:
            init = jax.jit(self.tx.init, out_shardings=shd.tree_shardings(jax.eval_shape(self.tx.init, self.params),
                                                                          mesh))
        self.opt_state = init(self.params)
        if mesh is None:  # committed, as a step's outputs are: jit keys its programs on that, so uncommitted
            # inputs would compile the step a second time at step 2
            self.params, self.opt_state = jax.device_put((self.params, self.opt_state), jax.devices()[0])
        else:
            shd.check_rows(config.batch_size // config.grad_accum, mesh, "the micro-batch (batch_size / grad_accum)")
        platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        if config.lora_dropout and not lora.has_adapters(model):
            raise UserError(f"train.lora_dropout = {config.lora_dropout}: dropout applies to LoRA adapters, and the "
                            "model has none; set train.lora_rank (e.g. 64) or lora_dropout=0")
        self._step = compiled_step(self.graphdef, self.tx, config.remat, platform, mesh,
                                   (self.params, self.opt_state, self.frozen), config.lora_dropout)

    def put_batch(self, batch: dict[str, np.ndarray]):
        """[batch, len] host arrays -> [grad_accum, micro, len] device arrays, micro split over data axes.

        Args:
            batch: One batch of loss_rows() arrays, [batch_size, row_len] or [batch_size, width].

        Returns:
            The same keys as jax arrays of shape [grad_accum, batch_size / grad_accum, ...].
        """
        accum = self.config.grad_accum
        batch = {k: v.reshape((accum, v.shape[0] // accum) + v.shape[1:]) for k, v in batch.items()}
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        sharding = NamedSharding(self.mesh, BATCH_SPEC)
        return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)

    def step(self, batch: dict[str, np.ndarray], index: int = 0) -> dict[str, float]:
        """Optimizer step number `index` (0-based; it picks the learning rate): loss, grad_norm and lr.

        Args:
            batch: One batch of loss_rows() arrays with config.batch_size rows (see `batches`).
            index: The 0-based optimizer step, for the learning rate.

        Returns:
            Scalar arrays: "loss" (mean NLL per response token, in nats), "grad_norm" (global norm of the
            gradients, before clipping), "tokens" (response tokens in the batch, at least 1) and "lr" (the
            learning rate of this step).
        """
        lr = jnp.float32(self.schedule(index))
        if self.config.lora_dropout:  # a key per row, from the seed and the row's place in the run: a resumed run
            # draws the same masks
            rows = batch["inputs"].shape[0]
            batch = {**batch, "noise": np.stack([np.full(rows, self.config.seed % 2 ** 32, np.uint32),
                                                 np.arange(index * rows, (index + 1) * rows, dtype=np.uint32)], 1)}
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, self.put_batch(batch), lr,
                                                          self.frozen)
        return {**metrics, "lr": lr}

    def model(self) -> Llama:
        """The model with the current trained parameters (and the frozen ones); it shares their arrays."""
        return nnx.merge(self.graphdef, self.params, self.frozen)


def _train_step(graphdef, tx, remat, lora_dropout, mesh, params, opt_state, batch, lr, frozen):
    """One optimizer step over grad_accum micro-batches; the loss is the mean over all response tokens."""
    with shd.activation_sharding(mesh):
        return _step_body(graphdef, tx, remat, lora_dropout, params, opt_state, batch, lr, frozen)


def _step_body(graphdef, tx, remat, lora_dropout, params, opt_state, batch, lr, frozen):
    from soft_jax.models import lora

    total = jnp.maximum(jnp.sum(batch["loss_weights"]), 1.0)

    def micro_loss(p, mb):
        model = nnx.merge(graphdef, p, frozen)
        if lora_dropout:
            lora.set_dropout(model, lora_dropout, mb["noise"])
        nll, count = loss_sums(model, mb, remat)
        return nll / total, count

    def accumulate(grads, mb):
        (loss, _), g = jax.value_and_grad(micro_loss, has_aux=True)(params, mb)
        return jax.tree.map(jnp.add, grads, g), loss

    if batch["inputs"].shape[0] == 1:  # no accumulation: a scan would only cost copies
        (loss, _), grads = jax.value_and_grad(micro_loss, has_aux=True)(params, jax.tree.map(lambda x: x[0], batch))
        losses = loss[None]
    else:
        grads, losses = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
    return params, opt_state, {"loss": jnp.sum(losses), "grad_norm": optax.tree.norm(grads), "tokens": total}


# --- the loop -----------------------------------------------------------------------------------


def flops_per_token(model: Llama, row_len: int) -> float:
    """Training FLOPs per token: 6 x parameters in matmuls + attention scores and values (forward + backward).

    Args:
        model: The Llama; only its config is read.
        row_len: The length of a packed row, in tokens (the attention span counted).

    Returns:
        The FLOPs per token of one training step, forward and backward.
    """
    cfg = model.config
    matmul_params = cfg.num_params - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * row_len
    return 6 * matmul_params + attention


def peak_flops() -> float | None:
    """Peak dense bf16 FLOP/s of one of this host's chips (from PEAK_FLOPS), or None for an unknown chip."""
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def epoch_order(n: int, config: TrainConfig, epoch: int) -> np.ndarray:
    """The order of the examples in one epoch.

    Args:
        n: The number of examples.
        config: The training settings: order ("given" or "shuffle") and seed.
        epoch: The 0-based epoch; each epoch gets its own shuffle.

    Returns:
        The example indices, [n]: 0..n-1 in order for "given", else a permutation seeded by (seed, epoch).
    """
    if config.order == "given":
        return np.arange(n)
    return np.random.default_rng([config.seed, epoch]).permutation(n)


def epoch_rows(examples: Sequence[Example], config: TrainConfig, epoch: int) -> dict[str, np.ndarray]:
    """One epoch's packed rows, in the order the steps take them.

    With order "given" the rows hold the examples in order (a curriculum's steps go easy to hard). With
    "shuffle" the examples of the epoch's shuffle are packed best fit decreasing (few empty slots) and the rows
    are then shuffled too, so that the longest examples do not all come first.

    Args:
        examples: The rendered examples, in the order of the pairs.
        config: The training settings: order, pack, row_len and seed.
        epoch: The 0-based epoch; each gets its own shuffle.

    Returns:
        pack()'s dict of [n_rows, row_len] arrays.
    """
    order = epoch_order(len(examples), config, epoch)
    shuffled = config.order != "given"
    rows = pack([examples[i] for i in order], config.row_len, config.pack, keep_order=not shuffled)
    if shuffled and config.pack:
        rows = {k: v[np.random.default_rng([config.seed, epoch, 1]).permutation(len(v))] for k, v in rows.items()}
    return rows


def prepare(tokenizer, pairs: Sequence[tuple], config: TrainConfig):
    """Rendered examples and the per-epoch packed rows (as loss_rows, one width for all); counts truncation.

    pairs: (prompt, response) or (prompt, response, finished); finished=False trains no end of turn.

    Args:
        tokenizer: A transformers tokenizer.
        pairs: The training pairs, as above.
        config: The training settings.

    Returns:
        A tuple (examples, epochs, (truncated_prompts, truncated_responses)): the rendered Examples in the
        order of `pairs`, one loss_rows() dict per epoch (`epoch_rows`, in step order), and how many prompts
        and responses were cut.

    Raises:
        UserError: When `pairs` is empty, or the maxima cannot hold the format (`check_overhead`).
    """
    if not pairs:
        raise UserError("the training set is empty (every example was filtered out); check the filters' counts "
                        "or feed more prompts")
    check_overhead(tokenizer, config)
    rendered = [render(tokenizer, p, r, config, *finished) for p, r, *finished in pairs]
    examples = [e for e, _, _ in rendered]
    stats = (sum(c for _, c, _ in rendered), sum(c for _, _, c in rendered))
    epochs = [epoch_rows(examples, config, e) for e in range(config.epochs)]
    width = loss_width(epochs, config.row_len)
    return examples, [loss_rows(rows, width) for rows in epochs], stats


def total_steps(epochs: list[dict[str, np.ndarray]], config: TrainConfig) -> int:
    """The number of optimizer steps of a run.

    Args:
        epochs: prepare()'s per-epoch rows.
        config: The training settings: batch_size, epochs and max_steps.

    Returns:
        ceil(rows of the first epoch / batch_size) x epochs, at most max_steps when it is set.
    """
    total = math.ceil(epochs[0]["inputs"].shape[0] / config.batch_size) * config.epochs
    return total if config.max_steps is None else min(total, config.max_steps)


def batches(epochs: list[dict[str, np.ndarray]], batch_size: int):
    """Every step's rows in order; the last batch of an epoch is padded with empty rows (zero weight).

    Args:
        epochs: prepare()'s per-epoch rows.
        batch_size: Rows per batch.

    Yields:
        One dict per step, with the keys of the rows and arrays of [batch_size, ...].
    """
    for rows in epochs:
        n = rows["inputs"].shape[0]
        for lo in range(0, n, batch_size):
            batch = {k: v[lo:lo + batch_size] for k, v in rows.items()}
            short = batch_size - batch["inputs"].shape[0]
            if short:
                batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            yield batch


def fingerprint(pairs, config: TrainConfig, model: Llama) -> str:
    """A short hash of what a run trains on, so a checkpoint is resumed only by the same run.

    Args:
        pairs: The (prompt, response[, finished]) training pairs.
        config: The training settings.
        model: The model; its config is hashed, not its weights.

    Returns:
        16 hex characters of a SHA-256 over the settings, the model config and the pairs.
    """
    h = hashlib.sha256(json.dumps([dataclasses.asdict(config), dataclasses.asdict(model.config)],
                                  sort_keys=True, default=str).encode())
    for p, r, *finished in pairs:
        h.update(p.encode() + b"\x00" + r.encode() + (b"\x02" if finished == [False] else b"\x01"))
    return h.hexdigest()[:16]


def train(model: Llama, tokenizer, pairs: Sequence[tuple], config: TrainConfig, mesh=None,
          checkpoint_dir: str | None = None, progress: bool = True,
          log: Callable[[dict], None] | None = None, prepared=None) -> tuple[Llama, TrainResult]:
    """Fine-tunes on (prompt, response[, finished]) pairs (see prepare); resumes from checkpoint_dir's latest step
    checkpoint.

    prepared: prepare()'s result for these pairs, when the caller already has it.
    With config.lora_rank, a model without adapters gets fresh ones (soft_jax.models.lora, seeded by
    config.seed) and only they train; a model that has adapters trains them on. The returned model carries them
    (lora.merged folds them into the kernels, export_hf does so).
    `log` receives one dict per step: step, loss, grad_norm, lr (the learning rate of the step), throughput
    (tokens/s, TFLOP/s, MFU).

    Args:
        model: The Llama to fine-tune; it is not changed.
        tokenizer: A transformers tokenizer.
        pairs: The (prompt, response[, finished]) training pairs.
        config: The training settings.
        mesh: A jax Mesh to train on, or None for one device.
        checkpoint_dir: Where step checkpoints are saved and resumed from; None saves none.
        progress: Whether to show a progress bar.
        log: Called with each step's record, as above.
        prepared: prepare()'s result for these pairs, or None to compute it.

    Returns:
        A tuple (model, result): the trained model (with its adapters, under LoRA) and a TrainResult.

    Raises:
        UserError: For a quantized model without LoRA, an empty training set, limits that cannot hold the
            format, a warmup longer than the run, or a checkpoint written by other settings or data.
        soft_jax.core.preemption.Preempted: When a stop was asked for; the step is checkpointed first.
    """
    from soft_jax.models import lora

    examples, epochs, (cut_p, cut_r) = prepared or prepare(tokenizer, pairs, config)
    total = total_steps(epochs, config)
    if not config.lora_rank and not lora.has_adapters(model) and nnx.state(model, Quantized):
        raise UserError("the base model is stored quantized (model.quant): it cannot be fully fine-tuned; train LoRA "
                        "adapters on it (train.lora_rank, e.g. 64) or load it unquantized")
    if config.lora_rank and not lora.has_adapters(model):  # a model that has adapters trains them on
        model = lora.add_adapters(model, config.lora_rank, config.lora_alpha, config.lora_targets, config.seed)
    trainer = Trainer(model, config, total, mesh)
    ckpt, start, print_ = None, 0, fingerprint(pairs, config, model)
    if checkpoint_dir:  # every `checkpoint_every` steps (0: none), at the end, and when a stop is asked for
        from soft_jax.training.checkpoints import StepCheckpointer

        ckpt = StepCheckpointer(checkpoint_dir, config.checkpoint_every)
        found = ckpt.restore_latest((trainer.params, trainer.opt_state), print_)
        if found:
            start, (trainer.params, trainer.opt_state), _ = found
    fpt, peak = flops_per_token(model, config.row_len), peak_flops()
    losses: list[float] = []
    bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=not progress)
    stream = batches(epochs, config.batch_size)
    for _ in range(start):  # the data position is the step: skip what the checkpoint has seen
        next(stream)
    try:  # a stop or an error closes the bar first, so the message after it starts on its own line
        for step in range(start + 1, total + 1):
            batch = next(stream)
            t0 = time.perf_counter()
            metrics = jax.device_get(trainer.step(batch, step - 1))
            seconds = time.perf_counter() - t0
            tokens = int(np.sum(batch["segment_ids"] > 0))
            record = {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                      "lr": float(metrics["lr"]), "tokens_per_s": tokens / seconds,
                      "tflops": tokens * fpt / seconds / 1e12}
            if peak:
                record["mfu"] = record["tflops"] * 1e12 / (peak * jax.device_count())
            losses.append(record["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if log:
                log(record)
            saved = bool(ckpt) and (ckpt.due(step) or step == total)
            if saved:
                ckpt.save(step, (trainer.params, trainer.opt_state), {"step": step, "fingerprint": print_})
            faults.point(f"train_step_{step}")
            if ckpt and preemption.requested() and step < total:  # stop now; this step is kept
                if not saved:
                    ckpt.save(step, (trainer.params, trainer.opt_state), {"step": step, "fingerprint": print_})
                preemption.raise_if_stopped(f"training step {step}")
    finally:
        bar.close()
        if ckpt:
            ckpt.close()
    result = TrainResult(steps=total, losses=losses, examples=len(examples), truncated_prompts=cut_p,
                         truncated_responses=cut_r, tokens=sum(len(e.ids) for e in examples))
    return trainer.model(), result
