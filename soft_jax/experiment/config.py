"""Run configs: ml-collections files with `get_config(arg=None)`, `--config.key=value` overrides, checks.

`base()` holds every knob of a run with its default; a config file changes what its experiment needs.
`load("configs/soft.py:5", ["--config.rounds=3"])` imports the file, calls get_config("5"), applies the
overrides (typed by the default they replace; unknown keys are refused) and validates the result.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence

import ml_collections

from soft_jax.core import settings
from soft_jax.core.errors import UserError
from soft_jax.data.filters import FilterConfig

GENERATORS = ("previous", "base")
SFT_STARTS = ("continue", "reinit")
STRATEGIES = ("fixed", "random")
GRANULARITIES = ("prompt", "batch")
ACROSS_ROUNDS = ("none", "prompt_ppl", "prompt_length")
# Keys a resumed run may change without invalidating finished rounds (checked in bootstrap).
RESUMABLE_CHANGES = ("rounds", "check_contamination", "validation.patience", "validation.tolerance",
                     "validation.confidence", "validation.resamples", "progress", "prompts.per_round", "eval.required",
                     "mesh_generate", "mesh_generate.data", "mesh_generate.fsdp", "mesh_generate.tensor")
# Keys added since runs may have started, each with the value that behaves as before it existed: a run's
# config.json that lacks one reads it as that value, so that a run started by an older soft-jax resumes.
ADDED_KEYS = {"train.lora_dropout": 0.0}
# The paper's benchmarks, run every round (round 0, the base model, included) by the paper configs.
PAPER_TASKS = "hhh,truthfulqa_mc1,truthfulqa_mc2"


def base() -> ml_collections.ConfigDict:
    """Every knob of a SOFT run, with the method's defaults where it gives them (docs/method.md)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.progress = True
    # `soft-jax data check` on the run's pool, exemplars and validation pairs against the benchmarks and the
    # open-ended questions when the run starts (contamination.json in the work dir; overlaps are logged, not fatal)
    config.check_contamination = True
    # name: "smollm2-135m", "tiny" (random, for tests) or a preset of soft_jax.models.presets; path overrides it.
    # scan_layers: store the layers stacked ([layers, ...] per weight) and run them as one lax.scan in every program
    # (training, prefill, decode, scoring): one compiled layer instead of all of them, so a deep model compiles far
    # faster (benchmarks/RESULTS.md); HF checkpoints convert on load and export
    # quant: none | int8 | nf4: the base's projections stored quantized (QLoRA), for LoRA on top (train.lora_rank)
    config.model = dict(name="smollm2-135m", path="", dtype="float32", param_dtype="", scan_layers=False, quant="none")
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    # The mesh of generation and every scoring pass (difficulty, validation, eval). All 0: on TPUs and H100s the
    # tensor-parallel mesh whose decode bound `soft-jax plan` ranks first among those that fit, elsewhere (CPUs)
    # the training mesh.
    # Decoding under an FSDP layout gathers every weight for every token; a tensor-parallel mesh (e.g. data=8,
    # fsdp=1, tensor=8 on 64 chips) reads each chip's own shard. The weights are resharded device to device at
    # each phase boundary (sharding.reshard); `soft-jax plan` compares the layouts (docs/architecture.md).
    config.mesh_generate = dict(data=0, fsdp=0, tensor=0)
    config.rounds = 3
    # path: JSONL ("" = the built-in pool); per_round: int, list (one per round), or 0 = the pool split evenly
    # tfds: a TFDS dataset name (array_record; read without TensorFlow) instead of path, with its split,
    # data_dir and feature names; build one from JSONL with soft_jax.data.tfds.build_prompt_dataset
    config.prompts = dict(path="", per_round=64, tfds="", tfds_split="train", tfds_data_dir="",
                          tfds_prompt_key="prompt")
    config.principles = ""  # text file; "" = the built-in principles
    # strategy: fixed | random; granularity: prompt (each prompt draws its own k) | batch (a batch shares one
    # draw). fixed_ids: the fixed set; empty = k exemplars covering as many principles as k random ones do on
    # average (data.choose_fixed), resolved when the run starts and recorded in config.json
    config.exemplars = dict(path="", k=2, strategy="random", granularity="prompt", fixed_ids=[])
    config.generator = "previous"  # previous (SOFT) | base (ablation: always M0)
    config.sft_start = "continue"  # continue ("step on feet") | reinit (ablation: train M0 on the round's data)
    # force_answer: when the thoughts end without "Assistant:", append the marker and sample the answer, in the
    # thoughts' own KV cache (small models often stop after their thoughts; Dromedary's 65B did not need this).
    # group_batches: batches sampled together as one device batch, each with its own exemplars and shared prefix
    # (what is sampled does not change the method; more rows per decode step is faster where one batch does not
    # saturate a step: CPU, small models). The random stream is keyed by the group, so it is part of a run's config.
    config.sampling = settings.defaults(settings.SamplingConfig, "top_k batch_size", temperature=0.7, top_p=0.95,
                                        max_new_tokens=512, force_answer=False, group_batches=1)
    config.filters = dataclasses.asdict(FilterConfig())  # soft_jax.data.filters.FilterConfig documents each
    # score: response_ppl | response_length | prompt_ppl; order: easy_to_hard | hard_to_easy | random | none
    # across_rounds: none (seeded shuffle) | prompt_ppl | prompt_length: prompts go easy to hard across rounds
    # within each category (hard to easy when order is hard_to_easy); every round keeps the pool's category mix
    config.curriculum = dict(score="response_ppl", order="random", across_rounds="none", batch_size=8)
    # SFT: TrainConfig's defaults (soft_jax.core.settings documents each), with step checkpoints every 20 steps
    config.train = settings.defaults(settings.TrainConfig, "learning_rate batch_size grad_accum epochs max_prompt_len "
                                     "max_response_len warmup_ratio max_grad_norm weight_decay pack remat lora_rank "
                                     "lora_alpha lora_dropout lora_targets",
                                     checkpoint_every=20)
    # metric: valid_nll (mean response NLL per held-out pair, lower is better), an eval task's accuracy
    # (hhh | truthfulqa_mc1 | truthfulqa_mc2, higher is better, on the first `limit` items) or a degeneracy signal
    # of the open-ended answers (distinct_2 | repeated_ngram_rate | truncation_rate; needs open_ended.limit).
    # A round is worse (or better) than the best only when the paired bootstrap interval of the per-item
    # difference, at `confidence`, lies beyond `tolerance` (confidence 0: the point estimate decides)
    config.validation = dict(path="", metric="valid_nll", patience=1, tolerance=0.0, confidence=0.95, resamples=2000,
                             limit=0, batch_size=8)
    # required: a run whose eval tasks cannot be had (no BIG-bench task files: see `soft-jax data tasks`) stops
    # before any weights are read; false: it says so once, goes on and shows them as n/a (the demo)
    config.eval = dict(tasks="", protocol="dromedary", limit=0, batch_size=16, truthfulqa_file="", required=True)
    config.open_ended = dict(path="", limit=0, max_new_tokens=256)  # limit 0: no open-ended answers
    return config


def _parse_value(text: str, default, key: str):
    """The override's value, typed like the default it replaces."""
    if isinstance(default, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise UserError(f"--config.{key}={text}: expected true or false")
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"--config.{key}={text}: not a valid value for a {type(default).__name__} "
                        f"(default {default!r})") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = (isinstance(value, (int, list, tuple)) if isinstance(default, (int, list, tuple)) and not isinstance(
        default, bool) else isinstance(value, type(default)))
    if not ok:
        raise UserError(f"--config.{key}={text}: expected a {type(default).__name__} like the default {default!r}")
    return list(value) if isinstance(value, tuple) else value


def override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            raise UserError(f"--config.{key}: unknown config key {'.'.join(parents[:i + 1])!r}; "
                            "see the config file or `soft_jax.experiment.config.base()` for the keys")
        node = node[name]
    if leaf not in node:
        near = ", ".join(sorted(node.keys()))
        raise UserError(f"--config.{key}: unknown config key; keys here: {near}")
    with node.unlocked():
        node[leaf] = _parse_value(text, node[leaf], key)


def sibling(config_file: str, name: str, arg=None) -> ml_collections.ConfigDict:
    """get_config(arg) of another config file in the same directory (ablations build on soft/soft_plus)."""
    return load_file(os.path.join(os.path.dirname(os.path.abspath(config_file)), name) + (f":{arg}" if arg else ""))


def _import(path: str):
    """The config file's module (a missing or broken file is the user's to fix)."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such config file; give a file like configs/demo.py")
    module_spec = importlib.util.spec_from_file_location(f"soft_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a broken config file is the user's to fix
        raise UserError(f"--config {path}: the file fails to import ({type(e).__name__}: {e})") from None
    return module


def variants(path: str) -> tuple[str, ...]:
    """The variants an ablation config file declares (a module-level VARIANTS tuple of get_config arguments,
    the first the default), which `soft-jax sweep` runs one after another."""
    if ":" in path:
        raise UserError(f"--config {path}: `sweep` runs every variant of the file; give the file without :ARG "
                        "(pick variants with --only)")
    found = getattr(_import(path), "VARIANTS", None)
    if not found:
        raise UserError(f"--config {path}: the file declares no variants to sweep; give an ablation config "
                        "(configs/ablation_*.py) or add VARIANTS = (\"a\", \"b\") naming its get_config arguments")
    def fit(v) -> bool:  # a get_config argument and a directory name
        return isinstance(v, str) and ":" not in v and v == os.path.basename(v) and v not in ("", ".", "..")

    if isinstance(found, str) or not all(map(fit, found)) or len(set(found)) != len(found):
        raise UserError(f"--config {path}: VARIANTS must be a tuple of distinct names, each fit to name a "
                        f"directory (got {found!r})")
    return tuple(found)


def load_file(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    module = _import(path)
    if not hasattr(module, "get_config"):
        raise UserError(f"--config {path}: the file defines no get_config(arg=None)")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"--config {path}: get_config() must return an ml_collections.ConfigDict")
    return config


def check_keys(config: ml_collections.ConfigDict, path: str) -> None:
    """Refuses keys a config file added that no part of the run reads (a typo would silently do nothing)."""
    def walk(node, ref, prefix):
        for k in node.keys():
            if k not in ref:
                raise UserError(f"{path}: unknown config key {prefix + k!r}; check its spelling against "
                                "soft_jax.experiment.config.base()")
            if isinstance(node[k], ml_collections.ConfigDict) and isinstance(ref[k], ml_collections.ConfigDict):
                walk(node[k], ref[k], prefix + k + ".")
    walk(config, base(), "")


def validate(config: ml_collections.ConfigDict) -> None:
    checks = [
        (config.rounds >= 1, f"rounds must be at least 1 (got {config.rounds})"),
        (config.generator in GENERATORS, f"generator {config.generator!r}: choose {' | '.join(GENERATORS)}"),
        (config.sft_start in SFT_STARTS, f"sft_start {config.sft_start!r}: choose {' | '.join(SFT_STARTS)}"),
        (config.exemplars.strategy in STRATEGIES, f"exemplars.strategy {config.exemplars.strategy!r}: choose "
         f"{' | '.join(STRATEGIES)}"),
        (config.exemplars.granularity in GRANULARITIES,
         f"exemplars.granularity {config.exemplars.granularity!r}: choose {' | '.join(GRANULARITIES)}"),
        (config.exemplars.k >= 0, f"exemplars.k must be >= 0 (got {config.exemplars.k})"),
        (config.curriculum.across_rounds in ACROSS_ROUNDS,
         f"curriculum.across_rounds {config.curriculum.across_rounds!r}: choose {' | '.join(ACROSS_ROUNDS)}"),
        (config.sampling.group_batches >= 1,
         f"sampling.group_batches must be at least 1 (got {config.sampling.group_batches})"),
        (config.validation.patience >= 1, f"validation.patience must be at least 1 (got {config.validation.patience})"),
        (0 <= config.validation.confidence < 1,
         f"validation.confidence must be in [0, 1) (got {config.validation.confidence})"),
        (config.validation.resamples >= 100,
         f"validation.resamples must be at least 100 (got {config.validation.resamples})"),
    ]
    checks += [(ok, f"{key} = {value!r}: must be {what}") for key, value, ok, what in [
        ("model.dtype", config.model.dtype, config.model.dtype in settings.DTYPES, " | ".join(settings.DTYPES)),
        ("model.param_dtype", config.model.param_dtype, config.model.param_dtype in ("", *settings.DTYPES),
         " | ".join(settings.DTYPES) + " (empty: model.dtype)"),
        ("model.quant", config.model.quant, config.model.quant in ("none", "int8", "nf4"), "none | int8 | nf4"),
    ]]
    checks.append((config.model.quant == "none" or config.train.lora_rank > 0,
                   f"model.quant = {config.model.quant!r} freezes a quantized base: it needs LoRA adapters to train; "
                   "set train.lora_rank (e.g. 64), or model.quant=none"))
    checks.append((not config.train.lora_dropout or config.train.lora_rank > 0,
                   f"train.lora_dropout = {config.train.lora_dropout!r} drops the LoRA adapters' inputs: it needs "
                   "adapters; set train.lora_rank (e.g. 64), or train.lora_dropout=0"))
    for ok, message in checks:
        if not ok:
            raise UserError(f"config: {message}")
    for name, cls in (("train", settings.TrainConfig), ("sampling", settings.SamplingConfig)):
        try:  # the settings check themselves (soft_jax.core.settings): one set of rules for runs, commands and API
            cls(**settings.fields(cls, config[name]))
        except UserError as e:
            raise UserError(f"config: {name}.{e}") from None
    from soft_jax.experiment import guard, signals

    if config.curriculum.order not in settings.CURRICULUM_ORDERS:
        raise UserError(f"config: curriculum.order {config.curriculum.order!r}: choose "
                        f"{' | '.join(settings.CURRICULUM_ORDERS)}")
    if config.curriculum.score not in settings.DIFFICULTY_SCORES:
        raise UserError(f"config: curriculum.score {config.curriculum.score!r}: choose "
                        f"{' | '.join(settings.DIFFICULTY_SCORES)}")
    if config.validation.metric not in guard.METRICS:
        raise UserError(f"config: validation.metric {config.validation.metric!r}: choose {' | '.join(guard.METRICS)}")
    if config.validation.metric in signals.SIGNALS and not config.open_ended.limit:
        raise UserError(f"config: validation.metric {config.validation.metric} is a signal of the open-ended answers; "
                        "set open_ended.limit to the number of questions to answer each round")
    if config.eval.tasks:
        settings.parse_tasks(config.eval.tasks)
    if config.eval.protocol not in settings.PROTOCOLS:
        raise UserError(f"config: eval.protocol {config.eval.protocol!r}: choose {' | '.join(settings.PROTOCOLS)}")
    g = generation_mesh_shape(config)
    if g is not None and (sum(s == -1 for s in g) > 1 or any(s == 0 or s < -1 for s in g)):
        raise UserError(f"config: mesh_generate = {dict(zip(('data', 'fsdp', 'tensor'), g))}: give all three sizes "
                        "(one may be -1 for the rest of the devices), or all 0 for the training mesh")


def generation_mesh_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int] | None:
    """(data, fsdp, tensor) of the generation mesh, or None when it is the training mesh (all 0)."""
    g = (config.mesh_generate.data, config.mesh_generate.fsdp, config.mesh_generate.tensor)
    return None if g == (0, 0, 0) else g


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of `path[:arg]` with `key=value` overrides applied, checked and locked."""
    config = load_file(spec)
    check_keys(config, spec.partition(":")[0])
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise UserError(f"--config.{key}: give a value as --config.{key}=VALUE")
        override(config, key, text)
    validate(config)
    config.lock()
    return config


def to_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def with_added_keys(saved: dict) -> dict:
    """A saved config dict with every ADDED_KEYS key it lacks set to its as-before value (a copy)."""
    out = json.loads(json.dumps(saved))
    for dotted, value in ADDED_KEYS.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(leaf, value)
    return out


def diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, prefix + k + ".")
        elif a != b:
            out.append(prefix + k)
    return out
