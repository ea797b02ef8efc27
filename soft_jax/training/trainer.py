"""The train step (jitted, donated, sharded; gradient accumulation inside it), the Trainer that holds it, and
`train`: a resumable SFT run with step checkpoints, progress and tokens/s."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
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
from soft_jax.models.llama import Llama
from soft_jax.models.quant import Quantized
from soft_jax.parallel import sharding as shd
from soft_jax.training.optimizer import make_optimizer, make_schedule
from soft_jax.training.packing import batches, prepare, total_steps
from soft_jax.training.settings import TrainConfig

# Peak dense bf16 FLOP/s per chip, by a substring of jax's device_kind (for MFU).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
              "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}




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
