"""Dromedary-style baseline: one round of principle-driven self-alignment, every prompt, fixed exemplars.

    soft-jax run --config configs/single_round.py --workdir runs/single_round
    # a 7B base model (an HF directory of meta-llama/Llama-2-7b-hf) and your own prompt pool:
    soft-jax run --config configs/single_round.py --workdir runs/sr7b --config.model.name=llama2-7b \\
        --config.model.path=/ckpt/Llama-2-7b-hf --config.prompts.path=prompts.jsonl

The reference point of claim 1 (METHOD.md): SOFT's rounds must beat this on the same prompts.
"""

from soft_jax.config import base


def get_config(arg=None):
    c = base()
    c.rounds = 1
    c.prompts.per_round = 0  # the whole pool
    c.exemplars.update(k=5, strategy="fixed", granularity="batch")
    c.curriculum.update(order="random", across_rounds="none")
    c.train.update(epochs=1, max_grad_norm=0.3)
    return c
