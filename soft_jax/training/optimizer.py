"""The learning-rate schedule (linear warmup, cosine decay) and AdamW with clipping, as SFT uses them."""

from __future__ import annotations

import functools
import math

import optax

from soft_jax.core.errors import UserError
from soft_jax.training.settings import TrainConfig


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

