"""What a run reads besides the model, loaded and checked before any weights, and the settings derived from
the config that a run and `soft-jax plan` share (batch divisibility, prompt lengths, SFT settings)."""

from __future__ import annotations

import dataclasses

import ml_collections

from soft_jax import data, evaluation, settings
from soft_jax import sharding as shd
from soft_jax.data import filters, templates
from soft_jax.errors import UserError


@dataclasses.dataclass
class Inputs:
    principles: str
    exemplars: list[data.Exemplar]
    pool: list[dict]
    validation: list[dict]
    sizes: list[int]  # prompts per round
    open_ended: list[dict]


def load(c: ml_collections.ConfigDict) -> Inputs:
    exemplars = data.load_exemplars(c.exemplars.path)
    if c.exemplars.k > len(exemplars):
        raise UserError(f"exemplars.k = {c.exemplars.k} but the exemplar pool has {len(exemplars)}; lower "
                        "exemplars.k or add exemplars")
    if c.exemplars.strategy == "fixed" and c.exemplars.fixed_ids:
        data.sample_exemplars(exemplars, c.exemplars.k, "fixed", [], c.exemplars.fixed_ids)  # refuses unknown ids
    pr = c.prompts
    pool = (data.load_tfds_prompts(pr.tfds, pr.tfds_split, pr.tfds_data_dir, pr.tfds_prompt_key) if pr.tfds
            else data.load_prompts(pr.path))
    per_round = c.prompts.per_round or len(pool) // c.rounds  # 0: the whole pool, split evenly
    sizes = data.round_sizes(per_round, c.rounds)
    if sum(sizes) > len(pool):
        raise UserError(f"{c.rounds} rounds of {per_round} prompts need {sum(sizes)} prompts but the "
                        f"prompt pool ({c.prompts.path or 'built-in'}) has {len(pool)}; lower rounds or "
                        "prompts.per_round, or give a larger pool")
    validation = data.load_pairs(c.validation.path) if c.validation.metric == "valid_nll" else []
    tasks = evaluation.parse_tasks(c.eval.tasks) if c.eval.tasks else []
    for task in set(tasks) | ({c.validation.metric} & set(evaluation.TASKS)):  # no data: fail now, not later
        evaluation.load_items(task, 1, c.eval.truthfulqa_file or None)
    open_ended = data.load_prompts(c.open_ended.path or data.asset("questions.jsonl")) if c.open_ended.limit else []
    return Inputs(data.load_principles(c.principles), exemplars, pool, validation, sizes,
                  open_ended[:c.open_ended.limit])


def resolve_fixed_exemplars(c: ml_collections.ConfigDict, inputs: Inputs) -> None:
    """The fixed strategy's exemplars, when the config names none: k covering as many principles as k random
    draws do on average (data.choose_fixed), written into the config so config.json records them."""
    e = c.exemplars
    if e.strategy == "fixed" and not e.fixed_ids:
        covers = [filters.cited_principles(x.thoughts) for x in inputs.exemplars]
        e.fixed_ids = data.choose_fixed(inputs.exemplars, e.k, covers)


def check_batches(c: ml_collections.ConfigDict, mesh_sizes: dict) -> None:
    """Refuses batch sizes that the mesh's data axes (data x fsdp) do not divide."""
    micro = c.train.batch_size // max(c.train.grad_accum, 1)
    for what, n in (("sampling.batch_size", c.sampling.batch_size), ("train.batch_size / train.grad_accum", micro)):
        shd.check_rows(n, mesh_sizes, f"config: {what}")


def prompt_tokens(c: ml_collections.ConfigDict, inputs: Inputs, tokenizer) -> tuple[int, int]:
    """(the longest self-align prompt, the tokens a sampling batch shares) in tokens: the principles and the k
    longest exemplars, and the pool's longest prompt; a batch shares the principles (per-prompt exemplars) or
    the principles and its exemplars (per-batch)."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    longest = sorted(inputs.exemplars, key=lambda e: -len(templates.exemplar_block(e)))[:c.exemplars.k]
    head = count(templates.prefix(inputs.principles, longest))
    prompt = head + max(count(templates.user_turn(p["prompt"], p["input"])) for p in inputs.pool) + 16
    shared = head if c.exemplars.granularity == "batch" or c.exemplars.strategy == "fixed" else \
        count(templates.prefix(inputs.principles, []))
    return prompt, shared


def train_config(c: ml_collections.ConfigDict, t: int = 1) -> settings.TrainConfig:
    """Round t's SFT settings: the config's, in the curriculum's order, seeded by the round."""
    return settings.TrainConfig(**settings.fields(settings.TrainConfig, c.train), order="given", seed=c.seed + t,
                                scan_layers=c.model.scan_layers)
