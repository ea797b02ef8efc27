"""Ablation: the relevance filter off (the paper's, and the lineage's) vs on, everything else configs/soft.py's.

    soft-jax sweep --config configs/ablation_filters.py --workdir runs/abl_filters

With it on, an answer whose prompt does not make it likelier (its mean per-token loss given the prompt over its loss
given an empty prompt, Li et al.'s IFD ratio, above 1.0) is dropped as irrelevant before training (docs/method.md,
"Filtering"). The two variants differ only in filters.max_relevance_ratio.
"""

from soft_jax.experiment.config import sibling

# `soft-jax sweep --config FILE --workdir DIR` runs each into DIR/<variant>/ (the first is the default)
VARIANTS = ("off", "relevance")


def get_config(arg="off"):
    config = sibling(__file__, "soft.py")
    config.filters.max_relevance_ratio = 1.0 if arg == "relevance" else 0.0
    return config
