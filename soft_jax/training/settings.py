"""TrainConfig: the SFT settings, checked where they are made. A run config's `train` section holds its fields but
the two the run decides (order: the curriculum's; seed: the run's seed plus the round), and the `train` command takes
its flags' defaults from it."""

from __future__ import annotations

import dataclasses

from soft_jax.core.errors import UserError, check_fields

TRAIN_ORDERS = ("shuffle", "given")  # SFT example order: shuffled per epoch, or exactly as given (a curriculum)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """SFT settings. batch_size counts packed rows per optimizer step (all devices together)."""

    max_prompt_len: int = 256
    max_response_len: int = 256
    seq_len: int | None = None  # packed row length; default max_prompt_len + max_response_len
    pack: bool = True
    order: str = "shuffle"  # packed best fit decreasing, rows shuffled; or "given": exactly the examples' order
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    learning_rate: float = 2e-5
    warmup_steps: int | None = None  # default: warmup_ratio of the steps
    warmup_ratio: float = 0.03
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end and when stopped (with a checkpoint_dir)
    remat: bool = False
    # LoRA (soft_jax.models.lora): rank 0 = full fine-tuning; else each targeted projection gets an adapter
    # (x @ A @ B * alpha / rank) and only the adapters train
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # as PEFT's lora_dropout: the adapters' input entries dropped in training
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

    RULES = [
        ("order", lambda v: v in TRAIN_ORDERS, " | ".join(TRAIN_ORDERS)),
        ("batch_size", lambda v: v >= 1, ">= 1"),
        ("epochs", lambda v: v >= 1, ">= 1"),
        ("learning_rate", lambda v: v > 0, "> 0"),
        ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1): a fraction of the steps"),
        ("weight_decay", lambda v: v >= 0, ">= 0"),
        ("max_grad_norm", lambda v: v >= 0, ">= 0 (0 = no clipping)"),
        ("max_prompt_len", lambda v: v >= 1, ">= 1"),
        ("max_response_len", lambda v: v >= 1, ">= 1"),
        ("checkpoint_every", lambda v: v >= 0, ">= 0 (0 = only when stopped)"),
        ("lora_rank", lambda v: v >= 0, ">= 0 (0 = full fine-tuning)"),
        ("lora_alpha", lambda v: v > 0, "> 0"),
        ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1) (0 = no dropout)"),
    ]

    @property
    def row_len(self) -> int:
        return self.seq_len or self.max_prompt_len + self.max_response_len

    def __post_init__(self):
        check_fields(self, self.RULES)
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise UserError(f"grad_accum = {self.grad_accum!r}: must be >= 1 and divide batch_size "
                            f"({self.batch_size})")
        if self.row_len < self.max_prompt_len + self.max_response_len:
            raise UserError(f"seq_len = {self.row_len}: must be at least max_prompt_len + max_response_len "
                            f"({self.max_prompt_len + self.max_response_len}); raise seq_len or lower the maxima")
