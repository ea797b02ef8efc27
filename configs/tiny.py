"""The smoke run: SOFT+ on a tiny random model with the built-in data, 2 rounds, under a minute on CPU.

    soft-jax run --config configs/tiny.py --workdir runs/tiny

The tests' base config. A random model writes no "Assistant:" marker, so require_marker is off and
every completion counts as an answer (cut by the token limit, citing no principle); the numbers mean nothing, the
artifacts and the flow are real.
"""

from soft_jax.experiment.config import base


def get_config(arg=None):
    config = base()
    config.model.name = "tiny"
    config.rounds = 2
    config.prompts.per_round = 8
    config.exemplars.k = 1
    config.sampling.update(max_new_tokens=16, batch_size=4)
    # its answers cite no principles and run to the token limit: keep them (trained without end of turn)
    config.filters.update(require_marker=False, min_words=1, min_cited_principles=0, keep_truncated=True)
    config.curriculum.update(order="easy_to_hard", across_rounds="prompt_ppl", batch_size=8)
    config.train.update(learning_rate=1e-3, batch_size=2, max_prompt_len=64, max_response_len=32, checkpoint_every=1,
                        warmup_ratio=0.0)
    config.validation.update(batch_size=8)
    config.open_ended.update(limit=2, max_new_tokens=8)
    return config
