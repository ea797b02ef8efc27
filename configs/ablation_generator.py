"""Ablation: the data of each round is written by the previous round's model (SOFT) or always by the base.

    soft-jax run --config configs/ablation_generator.py:previous --workdir runs/abl_gen_previous
    soft-jax run --config configs/ablation_generator.py:base --workdir runs/abl_gen_base
"""

from soft_jax.experiment.config import sibling

# `soft-jax sweep --config FILE --workdir DIR` runs each into DIR/<variant>/ (the first is the default)
VARIANTS = ("previous", "base")


def get_config(arg="previous"):
    config = sibling(__file__, "soft_plus.py")
    config.generator = arg or "previous"  # previous | base
    return config
