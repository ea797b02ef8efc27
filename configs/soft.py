"""SOFT: bootstrapped self-alignment over several rounds, exemplars sampled from the pool, random order.

    soft-jax run --config configs/soft.py --workdir runs/soft            # 3 rounds
    soft-jax run --config configs/soft.py:5 --workdir runs/soft5         # 5 rounds (prompts split evenly)

Each round the previous round's model writes the data and is fine-tuned further ("step on feet").
Each round's prompts keep the pool's category mix. The validation loss guards against late-round collapse:
a round is worse than the best only when a paired bootstrap over the validation pairs says so, and the best
round is kept. HHH and TruthfulQA MC1/MC2 are evaluated every round, round 0 included.
"""

from soft_jax.experiment.config import PAPER_TASKS, base


def get_config(arg=None):
    config = base()
    config.rounds = int(arg) if arg else 3
    config.prompts.per_round = 0  # the pool split evenly over the rounds
    config.exemplars.update(k=3, strategy="random", granularity="prompt")  # each prompt draws its own 3
    config.generator = "previous"
    config.sft_start = "continue"
    config.curriculum.update(order="random", across_rounds="none")
    config.train.update(epochs=1, max_grad_norm=0.3)
    config.validation.update(metric="valid_nll", patience=1, tolerance=0.0, confidence=0.95)
    config.eval.tasks = PAPER_TASKS  # every round, round 0 (the base model) included
    config.open_ended.limit = 45  # the built-in questions: answers for a judge, and the rounds' degeneracy signals
    return config
