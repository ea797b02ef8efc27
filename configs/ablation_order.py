"""Ablation (claim 2): training order easy-to-hard vs hard-to-easy vs random, within and across rounds.

    soft-jax run --config configs/ablation_order.py:easy_to_hard --workdir runs/abl_order_e2h
    soft-jax run --config configs/ablation_order.py:hard_to_easy --workdir runs/abl_order_h2e
    soft-jax run --config configs/ablation_order.py:random --workdir runs/abl_order_random

hard_to_easy reverses the within-round order; across rounds, prompts still go easy to hard only for
easy_to_hard (the others slice a seeded shuffle of the pool), so the orders differ in both places.
"""

from soft_jax.config import sibling


def get_config(arg="easy_to_hard"):
    arg = arg or "easy_to_hard"
    c = sibling(__file__, "soft_plus.py")
    c.curriculum.order = arg  # easy_to_hard | hard_to_easy | random
    c.curriculum.across_rounds = "prompt_ppl" if arg == "easy_to_hard" else "none"
    return c
