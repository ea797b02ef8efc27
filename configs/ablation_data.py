"""Ablation: each round trains on its own kept pairs (replace, the paper's) or on every round's so far (accumulate),
everything else configs/soft_plus.py's.

    soft-jax sweep --config configs/ablation_data.py --workdir runs/abl_data

Accumulating the earlier rounds' data rather than replacing it bounds the drift of training on one's own outputs
(Gerstgrasser et al. 2024, arXiv 2404.01413); with accumulate the curriculum orders the union. The two variants
differ only in train_data.
"""

from soft_jax.experiment.config import sibling

# `soft-jax sweep --config FILE --workdir DIR` runs each into DIR/<variant>/ (the first is the default)
VARIANTS = ("replace", "accumulate")


def get_config(arg="replace"):
    config = sibling(__file__, "soft_plus.py")
    config.train_data = arg or "replace"
    return config
