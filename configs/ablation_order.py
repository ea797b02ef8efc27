"""Ablation (claim 2): training order easy-to-hard vs hard-to-easy vs random, within and across rounds.

    soft-jax run --config configs/ablation_order.py:easy_to_hard --workdir runs/abl_order_e2h
    soft-jax run --config configs/ablation_order.py:hard_to_easy --workdir runs/abl_order_h2e
    soft-jax run --config configs/ablation_order.py:random --workdir runs/abl_order_random

easy_to_hard and hard_to_easy differ only in curriculum.order: the across-rounds slices (by prompt
perplexity within each category) follow the same direction as the within-round order. random shuffles
both (across_rounds none): each round is still a stratified sample of the pool's categories.
"""

from soft_jax.experiment.config import sibling

# `soft-jax sweep --config FILE --workdir DIR` runs each into DIR/<variant>/ (the first is the default)
VARIANTS = ("easy_to_hard", "hard_to_easy", "random")


def get_config(arg="easy_to_hard"):
    arg = arg or "easy_to_hard"
    config = sibling(__file__, "soft_plus.py")
    config.curriculum.order = arg  # easy_to_hard | hard_to_easy | random
    config.curriculum.across_rounds = "none" if arg == "random" else "prompt_ppl"
    return config
