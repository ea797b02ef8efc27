"""SOFT: bootstrapped self-alignment over several rounds, exemplars sampled from the pool, random order.

    soft-jax run --config configs/soft.py --workdir runs/soft            # 3 rounds
    soft-jax run --config configs/soft.py:5 --workdir runs/soft5         # 5 rounds (prompts split evenly)

Each round the previous round's model writes the data and is fine-tuned further ("step on feet").
The validation loss guards against late-round collapse and the best round is kept.
"""

from soft_jax.config import base


def get_config(arg=None):
    c = base()
    c.rounds = int(arg) if arg else 3
    c.prompts.per_round = 0  # the pool split evenly over the rounds
    c.exemplars.update(k=3, strategy="random", granularity="batch")
    c.generator = "previous"
    c.sft_start = "continue"
    c.curriculum.update(order="random", across_rounds="none")
    c.train.update(epochs=1, max_grad_norm=0.3)
    c.validation.update(metric="valid_nll", patience=1, tolerance=0.0)
    return c
