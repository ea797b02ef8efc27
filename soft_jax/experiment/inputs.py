"""What a run reads besides the model, loaded and checked before any weights, and the settings derived from
the config that a run and `soft-jax plan` share (prompt lengths)."""

from __future__ import annotations

import dataclasses

from soft_jax import data, evaluation
from soft_jax.core.errors import UserError
from soft_jax.data import filters, templates
from soft_jax.experiment.config import RunConfig


@dataclasses.dataclass
class Inputs:
    principles: str
    exemplars: list[data.Exemplar]
    pool: list[dict]
    validation: list[dict]
    sizes: list[int]  # prompts per round
    open_ended: list[dict]
    eval_tasks: list[str] = dataclasses.field(default_factory=list)  # the configured tasks that can be evaluated
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)  # task -> why it cannot be evaluated
    bigbench: object = None  # evaluation.sources.Source of the BIG-bench task files, when a task reads them
    lm_eval_tasks: list[str] = dataclasses.field(default_factory=list)  # eval.lm_eval.tasks whose data can be had


def check_eval(config: RunConfig) -> tuple[list[str], dict[str, str], object]:
    """(the eval tasks to run, {task: why it cannot be}, the BIG-bench source or None). Tasks without their data
    stop a run that requires them (eval.required) and never pass silently as a validation metric, since the
    collapse guard would have nothing to compare."""
    tasks = evaluation.parse_tasks(config.eval.tasks) if config.eval.tasks else []
    metric = [config.validation.metric] if config.validation.metric in evaluation.TASKS else []
    source, unavailable = evaluation.availability(list(dict.fromkeys(tasks + metric)), config.eval.protocol,
                                                  config.eval.truthfulqa_file or None)
    if metric and metric[0] in unavailable:
        raise UserError(f"config: validation.metric {metric[0]} cannot be evaluated: {unavailable[metric[0]]}; or "
                        "choose another validation.metric (valid_nll needs no benchmark data)")
    if unavailable and config.eval.required:
        raise UserError(f"config: eval.tasks {', '.join(unavailable)} cannot be evaluated: "
                        f"{next(iter(unavailable.values()))}; or set eval.required=false to run without them")
    return [t for t in tasks if t not in unavailable], unavailable, source


def check_lm_eval(config: RunConfig) -> tuple[list[str], dict[str, str]]:
    """(the eval.lm_eval tasks whose data can be had, {task: why not}), loaded as lm-eval loads them; lm-eval missing
    or an unknown task is a UserError, and so is missing data when eval.required."""
    lm = config.eval.lm_eval
    names = [t.strip() for t in lm.tasks.split(",") if t.strip()]
    if not names:
        return [], {}
    try:
        from soft_jax.evaluation import harness
    except ImportError as e:
        raise UserError(f"config: eval.lm_eval.tasks needs lm-evaluation-harness ({e}); pip install "
                        "'soft-jax[lm-eval]', or set eval.lm_eval.tasks=''") from None
    available, unavailable = harness.check_tasks(names, lm.include)
    metric = config.validation.metric
    if metric.startswith("lm_eval:") and metric.split(":")[1] in unavailable:
        raise UserError(f"config: validation.metric {metric} cannot be evaluated: {unavailable[metric.split(':')[1]]}; "
                        "or choose another validation.metric (valid_nll needs no benchmark data)")
    if unavailable and config.eval.required:
        task, why = next(iter(unavailable.items()))
        raise UserError(f"config: eval.lm_eval.tasks {task}: {why}; make its data reachable (or cached for "
                        "HF_DATASETS_OFFLINE=1), or set eval.required=false to run without it")
    return available, unavailable


def load(config: RunConfig, evaluating: bool = True) -> Inputs:
    """Everything the run reads, checked. evaluating=False (`soft-jax plan`): the eval tasks are not looked up, as
    compiling needs no benchmark item."""
    exemplars = data.load_exemplars(config.exemplars.path)
    if config.exemplars.k > len(exemplars):
        raise UserError(f"exemplars.k = {config.exemplars.k} but the exemplar pool has {len(exemplars)}; lower "
                        "exemplars.k or add exemplars")
    if config.exemplars.strategy == "fixed" and config.exemplars.fixed_ids:
        # refuses unknown ids
        data.sample_exemplars(exemplars, config.exemplars.k, "fixed", [], config.exemplars.fixed_ids)
    pr = config.prompts
    pool = (data.load_tfds_prompts(pr.tfds, pr.tfds_split, pr.tfds_data_dir, pr.tfds_prompt_key) if pr.tfds
            else data.load_prompts(pr.path))
    per_round = config.prompts.per_round or len(pool) // config.rounds  # 0: the whole pool, split evenly
    sizes = data.round_sizes(per_round, config.rounds)
    if sum(sizes) > len(pool):
        raise UserError(f"{config.rounds} rounds of {per_round} prompts need {sum(sizes)} prompts but the "
                        f"prompt pool ({config.prompts.path or 'built-in'}) has {len(pool)}; lower rounds or "
                        "prompts.per_round, or give a larger pool")
    validation = data.load_pairs(config.validation.path) if config.validation.metric == "valid_nll" else []
    eval_tasks, unavailable, source = check_eval(config) if evaluating else ([], {}, None)
    lm_tasks, lm_unavailable = check_lm_eval(config) if evaluating else ([], {})
    open_ended = (data.load_prompts(config.open_ended.path or data.asset("questions.jsonl"))
                  if config.open_ended.limit else [])
    return Inputs(data.load_principles(config.principles), exemplars, pool, validation, sizes,
                  open_ended[:config.open_ended.limit], eval_tasks, {**unavailable, **lm_unavailable}, source,
                  lm_tasks)


def resolve_fixed_exemplars(config: RunConfig, inputs: Inputs) -> RunConfig:
    """The config with the fixed strategy's exemplars chosen when it names none: k covering as many principles as
    k random draws do on average (data.choose_fixed), so that config.json records them."""
    e = config.exemplars
    if e.strategy != "fixed" or e.fixed_ids:
        return config
    covers = [filters.cited_principles(x.thoughts) for x in inputs.exemplars]
    return config.replace("exemplars", fixed_ids=tuple(data.choose_fixed(inputs.exemplars, e.k, covers)))


def prompt_tokens(config: RunConfig, inputs: Inputs, tokenizer) -> tuple[int, int]:
    """(the longest self-align prompt, the tokens a sampling batch shares) in tokens: the principles and the k
    longest exemplars, and the pool's longest prompt; a batch shares the principles (per-prompt exemplars) or
    the principles and its exemplars (per-batch)."""
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    longest = sorted(inputs.exemplars, key=lambda e: -len(templates.exemplar_block(e)))[:config.exemplars.k]
    head = count(templates.prefix(inputs.principles, longest))
    prompt = head + max(count(templates.user_turn(p["prompt"], p["input"])) for p in inputs.pool) + 16
    shared = head if config.exemplars.granularity == "batch" or config.exemplars.strategy == "fixed" else \
        count(templates.prefix(inputs.principles, []))
    return prompt, shared
