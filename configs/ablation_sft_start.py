"""Ablation: each round fine-tunes the previous model ("continue", step on feet) or the base model ("reinit").

    soft-jax run --config configs/ablation_sft_start.py:continue --workdir runs/abl_start_continue
    soft-jax run --config configs/ablation_sft_start.py:reinit --workdir runs/abl_start_reinit
"""

from soft_jax.experiment.config import sibling

# `soft-jax sweep --config FILE --workdir DIR` runs each into DIR/<variant>/ (the first is the default)
VARIANTS = ("continue", "reinit")


def get_config(arg="continue"):
    config = sibling(__file__, "soft_plus.py")
    config.sft_start = arg or "continue"  # continue | reinit
    return config
