"""SFT ("principle engraving"): masked-loss, packed, sharded, resumable fine-tuning.

(prompt, response) pairs are rendered in the engraving format (the model's chat template, else a plain
format) and tokenized as prompt tokens + response tokens; only response tokens carry loss. Examples are
packed into fixed-length rows with per-example segment ids and positions, so attention never crosses
examples and the packed loss equals the unpacked one. The loss is the mean over every response token
of the global batch, also under gradient accumulation.

`packing` turns pairs into rows and epochs, `optimizer` holds the schedule and AdamW, `trainer` the jitted step,
the Trainer and `train`; this package's names are the API.
"""

from soft_jax.training.optimizer import make_optimizer, make_schedule
from soft_jax.training.packing import (
    Example,
    batches,
    best_fit_decreasing,
    check_overhead,
    epoch_order,
    epoch_rows,
    loss_rows,
    loss_width,
    pack,
    prepare,
    render,
    total_steps,
)
from soft_jax.training.settings import TRAIN_ORDERS, TrainConfig
from soft_jax.training.trainer import (
    BATCH_SPEC,
    CPU_TRAIN_COMPILER_OPTIONS,
    PEAK_FLOPS,
    Trainer,
    TrainResult,
    compiled_step,
    compiler_options,
    fingerprint,
    flops_per_token,
    loss_sums,
    peak_flops,
    train,
)

__all__ = ["BATCH_SPEC", "CPU_TRAIN_COMPILER_OPTIONS", "PEAK_FLOPS", "TRAIN_ORDERS", "Example", "TrainConfig",
           "TrainResult", "Trainer", "batches", "best_fit_decreasing", "check_overhead", "compiled_step",
           "compiler_options", "epoch_order", "epoch_rows", "fingerprint", "flops_per_token", "loss_rows",
           "loss_sums", "loss_width", "make_optimizer", "make_schedule", "pack", "peak_flops", "prepare", "render",
           "total_steps", "train"]
