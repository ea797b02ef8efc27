"""Ablation (claim 1): fixed vs random exemplars under bootstrapping (SOFT+ otherwise).

    soft-jax run --config configs/ablation_exemplars.py:fixed --workdir runs/abl_exemplars_fixed
    soft-jax run --config configs/ablation_exemplars.py:random --workdir runs/abl_exemplars_random

Claim 1 (docs/method.md): with a fixed exemplar set, bootstrapping degrades quickly; with sampled ones it improves.
The two differ only in the exemplar strategy (and the fixed set it implies): the same k, and the fixed set
covers as many principles as the random draws do on average (data.choose_fixed; config.json records it).
"""

from soft_jax.experiment.config import sibling

# `soft-jax sweep --config FILE --workdir DIR` runs each into DIR/<variant>/ (the first is the default)
VARIANTS = ("random", "fixed")


def get_config(arg="random"):
    arg = arg or "random"
    config = sibling(__file__, "soft_plus.py")
    config.exemplars.strategy = arg  # fixed | random (checked when the config loads)
    return config
