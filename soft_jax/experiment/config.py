"""Run configs: ml-collections files with `get_config(arg=None)`, `--config.key=value` overrides, and the typed,
frozen `RunConfig` tree a run reads.

ml-collections is the file format and the override syntax: `base()` is a ConfigDict of every knob with its default
(RunConfig's), which a config file changes where its experiment needs to. `load("configs/soft.py:5",
["rounds=3"])` imports the file, calls get_config("5"), applies the overrides (typed by the default they replace;
unknown keys are refused) and returns a checked `RunConfig`. Nothing below this layer reads a RunConfig: training
takes a TrainConfig, sampling a SamplingConfig, filtering a FilterConfig, soft_jax.scale `Shapes`; this module's
`RunConfig.train_config` and `.sampling_config` make them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
from collections.abc import Sequence

import ml_collections

from soft_jax import evaluation
from soft_jax.core.errors import UserError
from soft_jax.data.filters import FilterConfig
from soft_jax.inference.sampler import SamplingConfig
from soft_jax.models.config import DTYPES
from soft_jax.training.settings import TrainConfig

GENERATORS = ("previous", "base")
SFT_STARTS = ("continue", "reinit")
TRAIN_DATA = ("replace", "accumulate")
STRATEGIES = ("fixed", "random")
WANDB_MODES = ("online", "offline", "disabled")
GRANULARITIES = ("prompt", "batch")
ACROSS_ROUNDS = ("none", "prompt_ppl", "prompt_length")
CURRICULUM_ORDERS = ("easy_to_hard", "hard_to_easy", "random", "none")  # soft_jax.rounds.curriculum implements them
DIFFICULTY_SCORES = ("response_ppl", "response_length", "prompt_ppl")
# Keys a resumed run may change without invalidating finished rounds (soft_jax.experiment.workdir checks).
RESUMABLE_CHANGES = ("rounds", "check_contamination", "validation.patience", "validation.tolerance",
                     "validation.confidence", "validation.resamples", "progress", "prompts.per_round", "eval.required",
                     "mesh_generate", "mesh_generate.data", "mesh_generate.fsdp", "mesh_generate.tensor",
                     # how decode is cut into programs: the same tokens, up to float summation order (as a mesh)
                     "sampling.decode_segment",
                     # tracking never changes what a round computes
                     "log", "log.wandb", "log.wandb.project", "log.wandb.entity", "log.wandb.mode", "log.wandb.tags",
                     "log.wandb_samples")
# Keys added since runs may have started, each with the value that behaves as before it existed: a run's
# config.json that lacks one reads it as that value, so that a run started by an older soft-jax resumes.
ADDED_KEYS = {"train.lora_dropout": 0.0, "train.seq_len": None, "train.max_steps": None, "train.warmup_steps": None,
              "train.end_lr_ratio": 0.0, "train.b1": 0.9, "train.b2": 0.999, "train.eps": 1e-8,
              "eval.lm_eval.tasks": "", "eval.lm_eval.num_fewshot": -1, "eval.lm_eval.limit": 0,
              "eval.lm_eval.batch_size": 16, "eval.lm_eval.include": "",
              "log.wandb.project": "", "log.wandb.entity": "", "log.wandb.mode": "online", "log.wandb.tags": "",
              "log.wandb_samples": 64, "filters.min_chars": 0, "filters.cut_repeated": "sentence",
              "filters.exemplar_topics": False, "filters.max_relevance_ratio": 0.0,
              "train_data": "replace", "sampling.kv_dtype": "model", "sampling.decode_segment": 128}
# The paper's benchmarks, run every round (round 0, the base model, included) by the paper configs.
PAPER_TASKS = "hhh,truthfulqa_mc1,truthfulqa_mc2"


def _frozen(cls):
    return dataclasses.dataclass(frozen=True)(cls)


@_frozen
class ModelSection:
    """name: "smollm2-135m", "tiny" (random, for tests) or a preset of soft_jax.models.presets; path (an HF dir, a
    GGUF file, a PEFT adapter dir, a work dir's best round; gs:// too) overrides it.
    scan_layers: the layers stored stacked ([layers, ...] per weight) and run as one lax.scan in every program
    (training, prefill, decode, scoring): one compiled layer instead of all of them, so a deep model compiles far
    faster (benchmarks/RESULTS.md); HF checkpoints convert on load and export.
    quant: none | int8 | nf4: the base's projections stored quantized (QLoRA), for LoRA on top (train.lora_rank)."""

    name: str = "smollm2-135m"
    path: str = ""
    dtype: str = "float32"
    param_dtype: str = ""  # "": dtype
    scan_layers: bool = False
    quant: str = "none"


@_frozen
class MeshSection:
    """(data, fsdp, tensor) sizes; one may be -1 for the rest of the devices. For mesh_generate, all 0 means: on
    TPUs and H100s the tensor-parallel mesh whose decode bound `soft-jax plan` ranks first among those that fit,
    elsewhere (CPUs) the training mesh. Decoding under an FSDP layout gathers every weight for every token; a
    tensor-parallel mesh (e.g. data=8, fsdp=1, tensor=8 on 64 chips) reads each chip's own shard. The weights are
    resharded device to device at each phase boundary (sharding.reshard; docs/architecture.md)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data, self.fsdp, self.tensor


@_frozen
class PromptsSection:
    """path: JSONL ("" = the built-in pool); per_round: an int, one per round, or 0 = the pool split evenly.
    tfds: a TFDS dataset name (array_record, read without TensorFlow) instead of path, with its split, data_dir
    and feature name; build one from JSONL with soft_jax.data.tfds.build_prompt_dataset."""

    path: str = ""
    per_round: int | tuple[int, ...] = 64
    tfds: str = ""
    tfds_split: str = "train"
    tfds_data_dir: str = ""
    tfds_prompt_key: str = "prompt"


@_frozen
class ExemplarsSection:
    """strategy: fixed | random; granularity: prompt (each prompt draws its own k) | batch (a batch shares one
    draw). fixed_ids: the fixed set; empty = k exemplars covering as many principles as k random ones do on average
    (data.choose_fixed), resolved when the run starts and recorded in config.json."""

    path: str = ""
    k: int = 2
    strategy: str = "random"
    granularity: str = "prompt"
    fixed_ids: tuple[str, ...] = ()


@_frozen
class CurriculumSection:
    """score: response_ppl | response_length | prompt_ppl; order: easy_to_hard | hard_to_easy | random | none.
    across_rounds: none (seeded shuffle) | prompt_ppl | prompt_length: prompts go easy to hard across rounds within
    each category (hard to easy when order is hard_to_easy); every round keeps the pool's category mix."""

    score: str = "response_ppl"
    order: str = "random"
    across_rounds: str = "none"
    batch_size: int = 8


@_frozen
class ValidationSection:
    """metric: valid_nll (mean response NLL per held-out pair, lower is better), an eval task's accuracy (hhh |
    truthfulqa_mc1 | truthfulqa_mc2, higher is better, on the first `limit` items) or a degeneracy signal of the
    open-ended answers (distinct_2 | repeated_ngram_rate | truncation_rate; needs open_ended.limit). A round is worse
    (or better) than the best only when the paired bootstrap interval of the per-item difference, at `confidence`,
    lies beyond `tolerance` (confidence 0: the point estimate decides)."""

    path: str = ""
    metric: str = "valid_nll"
    patience: int = 1
    tolerance: float = 0.0
    confidence: float = 0.95
    resamples: int = 2000
    limit: int = 0
    batch_size: int = 8


@_frozen
class LmEvalSection:
    """lm-evaluation-harness tasks run on every round's model (soft_jax.evaluation.harness; `pip install
    'soft-jax[lm-eval]'`): tasks comma-separated (any lm-eval task, or one of your YAMLs under `include`, lm-eval's
    include path); num_fewshot -1: each task's own; limit 0: every item. Their data are loaded before any weights
    are read: a task whose data cannot be had stops the run when eval.required, else shows as n/a."""

    tasks: str = ""
    num_fewshot: int = -1
    limit: int = 0
    batch_size: int = 16
    include: str = ""


@_frozen
class EvalSection:
    """tasks: comma-separated (hhh, truthfulqa_mc1, truthfulqa_mc2), each evaluated every round under `protocol`.
    required: a run whose eval tasks cannot be had (no BIG-bench task files: see `soft-jax data tasks`) stops before
    any weights are read; false: it says so once, goes on and shows them as n/a (the demo)."""

    tasks: str = ""
    protocol: str = "dromedary"
    limit: int = 0
    batch_size: int = 16
    truthfulqa_file: str = ""
    required: bool = True
    lm_eval: LmEvalSection = LmEvalSection()


@_frozen
class OpenEndedSection:
    """limit questions (0: none) answered every round, at most max_new_tokens each, for the degeneracy signals."""

    path: str = ""
    limit: int = 0
    max_new_tokens: int = 256


@_frozen
class WandbSection:
    """Weights & Biases (`pip install 'soft-jax[wandb]'`): off while project is "". entity: "" = your default;
    mode: online | offline (written under the work dir, `wandb sync` uploads it) | disabled; tags: comma-separated."""

    project: str = ""
    entity: str = ""
    mode: str = "online"
    tags: str = ""


@_frozen
class LogSection:
    """Where a run's numbers go besides metrics.jsonl and tensorboard/ (soft_jax.experiment.tracking). wandb: the
    resolved config, each round's round-table numbers at step = round (0: the base model), a table of the round's
    first `wandb_samples` generations (prompt, answer, kept or dropped and by which filter, difficulty, finish) and
    the report's plots; a rerun continues the same W&B run (its id in WORKDIR/wandb_id). Process 0 only."""

    wandb: WandbSection = WandbSection()
    wandb_samples: int = 64


def _section(settings_cls, name: str, run_decides: tuple[str, ...], doc: str, changed: dict, added=()):
    """A run config section holding a settings dataclass's fields, less those the run decides itself, with the
    method's defaults `changed` and the run's own `added` fields ((name, type, default), ...). Constructing one
    checks it by the settings' own rules; `.settings(**decided)` is the settings object."""
    own = [f for f in dataclasses.fields(settings_cls) if f.name not in run_decides]
    fields = [(f.name, f.type, dataclasses.field(default=changed.get(f.name, f.default))) for f in own]
    fields += [(n, tp, dataclasses.field(default=d)) for n, tp, d in added]

    def settings(self, **decided):
        return settings_cls(**{f.name: getattr(self, f.name) for f in own}, **decided)

    def check(self):
        settings(self, **{n: f.default for f in dataclasses.fields(settings_cls) if (n := f.name) in run_decides})

    cls = dataclasses.make_dataclass(name, fields, frozen=True,
                                     namespace={"settings": settings, "__post_init__": check, "__doc__": doc})
    cls.__module__ = __name__
    return cls


# SFT: TrainConfig's fields (soft_jax.training.settings documents each), with step checkpoints every 20 steps
TrainSection = _section(TrainConfig, "TrainSection", ("order", "seed"), changed=dict(checkpoint_every=20), doc=(
    "TrainConfig's fields but order (the curriculum's: given) and seed (the run's seed plus the round)."))
# Sampling: SamplingConfig's fields with the method's temperature, top_p and length; and two of the run's own.
# force_answer: when the thoughts end without "Assistant:", append the marker and sample the answer, in the
# thoughts' own KV cache (small models often stop after their thoughts; Dromedary's 65B did not need this).
# group_batches: batches sampled together as one device batch, each with its own exemplars and shared prefix
# (what is sampled does not change the method; more rows per decode step is faster where one batch does not
# saturate a step: CPU, small models). The random stream is keyed by the group, so it is part of a run's config.
SamplingSection = _section(
    SamplingConfig, "SamplingSection", ("stop_token_ids", "stop_strings", "seed", "reuse_prefix"),
    changed=dict(temperature=0.7, top_p=0.95, max_new_tokens=512),
    added=(("force_answer", bool, False), ("group_batches", int, 1)), doc=(
        "SamplingConfig's fields but the stops (the engraving template's), the seed (drawn per batch from the "
        "run's) and prefix reuse (always); with force_answer and group_batches."))


@_frozen
class RunConfig:
    """Every knob of a SOFT run, with the method's defaults where it gives them (docs/method.md); checked when made.
    `check_contamination`: `soft-jax data check` on the run's pool, exemplars and validation pairs against the
    benchmarks and the open-ended questions when the run starts (contamination.json; overlaps are logged, not
    fatal). `generator`: previous (SOFT) | base (ablation: always M0); `sft_start`: continue ("step on feet") |
    reinit (ablation: train M0 on the round's data); `train_data`: replace (round t trains on round t's kept pairs,
    the paper's) | accumulate (on rounds 1..t's, the curriculum ordering the union: arXiv 2404.01413's bound on the
    drift of training on one's own outputs); `principles`: a text file ("" = the built-in principles)."""

    seed: int = 0
    progress: bool = True
    check_contamination: bool = True
    model: ModelSection = ModelSection()
    mesh: MeshSection = MeshSection()
    mesh_generate: MeshSection = MeshSection(0, 0, 0)  # the mesh of generation and every scoring pass
    rounds: int = 3
    prompts: PromptsSection = PromptsSection()
    principles: str = ""
    exemplars: ExemplarsSection = ExemplarsSection()
    generator: str = "previous"
    sft_start: str = "continue"
    train_data: str = "replace"
    sampling: SamplingSection = SamplingSection()
    filters: FilterConfig = FilterConfig()  # soft_jax.data.filters.FilterConfig documents each
    curriculum: CurriculumSection = CurriculumSection()
    train: TrainSection = TrainSection()
    validation: ValidationSection = ValidationSection()
    eval: EvalSection = EvalSection()
    open_ended: OpenEndedSection = OpenEndedSection()
    log: LogSection = LogSection()

    def __post_init__(self):
        validate(self)

    def to_dict(self) -> dict:
        """As config.json holds it (JSON types: lists for tuples)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def train_config(self, t: int = 1) -> TrainConfig:
        """Round t's SFT settings: the config's, in the curriculum's order, seeded by the round."""
        return self.train.settings(order="given", seed=self.seed + t)

    def sampling_config(self, **decided) -> SamplingConfig:
        """The SamplingConfig of the run's sampling section, with what the run decides (stop strings)."""
        return self.sampling.settings(**decided)

    def replace(self, section: str, **changes) -> RunConfig:
        """A copy with `changes` to one section's fields (or, with section "", to top-level fields)."""
        if not section:
            return dataclasses.replace(self, **changes)
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def base() -> ml_collections.ConfigDict:
    """Every knob of a SOFT run with its default (RunConfig's), as the ConfigDict a config file changes."""
    return ml_collections.ConfigDict(RunConfig().to_dict())


def _typed(value, default, key: str):
    """A config value typed like its default (ints where a float is expected become floats; lists, tuples)."""
    if default is None:  # an optional int of TrainConfig (seq_len, max_steps, warmup_steps)
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):  # prompts.per_round may also list one size per round
        ok = (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, (list, tuple))
        value = tuple(value) if isinstance(value, list) else value
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise UserError(f"config: {key} = {value!r}: expected a {type(default).__name__} like the default {default!r}")
    return value


def _build(cls, node, prefix: str = ""):
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    values = {}
    for key in node.keys():
        if key not in defaults:
            raise UserError(f"config: unknown config key {prefix + key!r}; check its spelling against "
                            "soft_jax.experiment.config.base()")
        default = defaults[key]
        if dataclasses.is_dataclass(default):
            if not hasattr(node[key], "keys"):
                raise UserError(f"config: {prefix + key} = {node[key]!r}: expected a section of keys")
            values[key] = _build(type(default), node[key], prefix + key + ".")
        else:
            values[key] = _typed(node[key], default, prefix + key)
    if not prefix:
        return cls(**values)
    try:  # a section checks its own fields (TrainConfig's and SamplingConfig's rules)
        return cls(**values)
    except UserError as e:
        raise UserError(f"config: {prefix}{e}") from None


def from_tree(node) -> RunConfig:
    """The checked RunConfig of a ConfigDict (a config file's) or a dict (a run's config.json, with the keys added
    since it was written: with_added_keys)."""
    if isinstance(node, RunConfig):
        return node
    return _build(RunConfig, node)


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
    if default is None:  # an optional int (train.seq_len, max_steps, warmup_steps)
        default = 0
        if text.strip().lower() == "none":
            return None
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
    value = _parse_value(text, node[leaf], key)
    with node.unlocked():
        if type(value) is not type(node[leaf]):  # an int field given a list (prompts.per_round), None for an int
            del node[leaf]
        node[leaf] = value


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


def validate(config: RunConfig) -> None:
    """The checks across a run config's fields (RunConfig runs them when made; its train and sampling sections
    check themselves by TrainConfig's and SamplingConfig's rules)."""
    checks = [
        (config.rounds >= 1, f"rounds must be at least 1 (got {config.rounds})"),
        (config.generator in GENERATORS, f"generator {config.generator!r}: choose {' | '.join(GENERATORS)}"),
        (config.sft_start in SFT_STARTS, f"sft_start {config.sft_start!r}: choose {' | '.join(SFT_STARTS)}"),
        (config.train_data in TRAIN_DATA, f"train_data {config.train_data!r}: choose {' | '.join(TRAIN_DATA)}"),
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
        (config.log.wandb.mode in WANDB_MODES, f"log.wandb.mode {config.log.wandb.mode!r}: choose "
         f"{' | '.join(WANDB_MODES)}"),
        (config.log.wandb_samples >= 0, f"log.wandb_samples must be >= 0 (got {config.log.wandb_samples})"),
    ]
    checks += [(ok, f"{key} = {value!r}: must be {what}") for key, value, ok, what in [
        ("model.dtype", config.model.dtype, config.model.dtype in DTYPES, " | ".join(DTYPES)),
        ("model.param_dtype", config.model.param_dtype, config.model.param_dtype in ("", *DTYPES),
         " | ".join(DTYPES) + " (empty: model.dtype)"),
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
    from soft_jax.evaluation import guard, signals

    if config.curriculum.order not in CURRICULUM_ORDERS:
        raise UserError(f"config: curriculum.order {config.curriculum.order!r}: choose "
                        f"{' | '.join(CURRICULUM_ORDERS)}")
    if config.curriculum.score not in DIFFICULTY_SCORES:
        raise UserError(f"config: curriculum.score {config.curriculum.score!r}: choose "
                        f"{' | '.join(DIFFICULTY_SCORES)}")
    lm_metric = guard.lm_eval_metric(config.validation.metric)
    lm_tasks = [t.strip() for t in config.eval.lm_eval.tasks.split(",") if t.strip()]
    if config.validation.metric not in guard.METRICS and (lm_metric is None or lm_metric[0] not in lm_tasks):
        raise UserError(f"config: validation.metric {config.validation.metric!r}: choose {' | '.join(guard.METRICS)}, "
                        "or lm_eval:TASK:METRIC of a task in eval.lm_eval.tasks (e.g. lm_eval:arc_easy:acc)")
    if config.validation.metric in signals.SIGNALS and not config.open_ended.limit:
        raise UserError(f"config: validation.metric {config.validation.metric} is a signal of the open-ended answers; "
                        "set open_ended.limit to the number of questions to answer each round")
    if config.eval.tasks:
        evaluation.parse_tasks(config.eval.tasks)
    lm = config.eval.lm_eval
    if lm.num_fewshot < -1 or lm.limit < 0 or lm.batch_size < 1:
        raise UserError(f"config: eval.lm_eval num_fewshot={lm.num_fewshot}, limit={lm.limit}, batch_size="
                        f"{lm.batch_size}: num_fewshot >= -1 (-1: each task's own), limit >= 0 (0: every item), "
                        "batch_size >= 1")
    if config.eval.protocol not in evaluation.PROTOCOLS:
        raise UserError(f"config: eval.protocol {config.eval.protocol!r}: choose {' | '.join(evaluation.PROTOCOLS)}")
    g = generation_mesh_shape(config)
    if g is not None and (sum(s == -1 for s in g) > 1 or any(s == 0 or s < -1 for s in g)):
        raise UserError(f"config: mesh_generate = {dict(zip(('data', 'fsdp', 'tensor'), g))}: give all three sizes "
                        "(one may be -1 for the rest of the devices), or all 0 for the training mesh")


def generation_mesh_shape(config: RunConfig) -> tuple[int, int, int] | None:
    """(data, fsdp, tensor) of the generation mesh, or None when it is the training mesh (all 0)."""
    g = config.mesh_generate.shape
    return None if g == (0, 0, 0) else g


def load(spec: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig of `path[:arg]` (""; the defaults, `base()`) with `key=value` overrides applied, checked."""
    config = load_file(spec) if spec else base()
    if spec:
        check_keys(config, spec.partition(":")[0])
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq:
            raise UserError(f"--config.{key}: give a value as --config.{key}=VALUE")
        override(config, key, text)
    return from_tree(config)


def to_dict(config: RunConfig | ml_collections.ConfigDict) -> dict:
    return config.to_dict() if isinstance(config, RunConfig) else json.loads(config.to_json())


def from_saved(saved: dict) -> RunConfig:
    """The RunConfig of a run's config.json (read with the keys added since it was written)."""
    return from_tree(with_added_keys(saved))


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
