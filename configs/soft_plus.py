"""SOFT+: SOFT with an easy-to-hard curriculum, across rounds and within each round.

    soft-jax run --config configs/soft_plus.py --workdir runs/soft_plus
    soft-jax run --config configs/soft_plus.py:5 --workdir runs/soft_plus5   # 5 rounds

Across rounds, prompts go easy to hard by their perplexity under the base model *within each category*
(every round keeps the pool's category mix, so the order is not a topic order); within a round the kept
pairs are trained in order of response perplexity under the current model (easy first, no shuffling).
Claim 2 (docs/method.md) compares this with configs/soft.py: the two differ only in curriculum.order and
curriculum.across_rounds (tests/rounds/test_experiments.py::test_each_claims_configs_differ_only_in_its_knobs
checks it).
"""

from soft_jax.experiment.config import sibling


def get_config(arg=None):
    config = sibling(__file__, "soft.py", arg)
    config.curriculum.update(score="response_ppl", order="easy_to_hard", across_rounds="prompt_ppl")
    return config
