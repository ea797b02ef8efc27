"""Dromedary-style baseline: one round of principle-driven self-alignment, every prompt, fixed exemplars.

The fixed set has the same k as SOFT's random draws and covers as many principles as they do on average
(chosen when the run starts, recorded in config.json as exemplars.fixed_ids). HHH and TruthfulQA MC1/MC2
are evaluated before (round 0) and after the round.

    soft-jax run --config configs/single_round.py --workdir runs/single_round
    # a 7B base model (an HF directory of meta-llama/Llama-2-7b-hf) and your own prompt pool:
    soft-jax run --config configs/single_round.py --workdir runs/sr7b --config.model.name=llama2-7b \\
        --config.model.path=/ckpt/Llama-2-7b-hf --config.prompts.path=prompts.jsonl

The reference point of claim 1 (docs/method.md, "The claims and the configs that test them"): SOFT's rounds must
beat this on the same prompts.
"""

from soft_jax.experiment.config import PAPER_TASKS, base


def get_config(arg=None):
    config = base()
    config.rounds = 1
    config.prompts.per_round = 0  # the whole pool
    config.exemplars.update(k=3, strategy="fixed")  # the same k as soft.py
    config.curriculum.update(order="random", across_rounds="none")
    config.train.update(epochs=1, max_grad_norm=0.3)
    config.eval.tasks = PAPER_TASKS
    config.open_ended.limit = 45  # the built-in questions: answers for a judge, and their degeneracy signals
    return config
