"""One preflight for `soft-jax run` and `soft-jax plan`: `prepare(config, devices)` reads and checks everything a
run needs but the weights, and returns a `RunPlan`: the model's architecture and tokenizer, the inputs, the
training and generation meshes, the shapes the round's programs run at, and those programs compiled for the devices.

A run prepares on its own devices (compiling where the device memory is known: GPUs and TPUs; on CPU it logs
soft_jax.scale.memory's estimate instead); `plan_run` prepares on a TPU slice's or GPU node's compile-only devices,
prints the tables and bounds, and refuses what does not fit. Both therefore check, choose and refuse the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from jax.sharding import Mesh

from soft_jax import evaluation, training
from soft_jax.experiment import config as config_lib
from soft_jax.experiment import inputs
from soft_jax.experiment.config import RunConfig
from soft_jax.inference import engine, sampler
from soft_jax.models import presets
from soft_jax.models.config import ModelConfig
from soft_jax.parallel import sharding as shd
from soft_jax.parallel import topology
from soft_jax.scale import memory, plan, tables
from soft_jax.scale.memory import Shapes


@dataclasses.dataclass
class RunPlan:
    """A run before any weight is read.

    Attributes:
      config: the run config, its fixed exemplars resolved (what config.json records).
      model_config, tokenizer: the model's architecture (stacked, quantized as the run stores it) and tokenizer.
      counted: which tokenizer counted the prompts (a preset without a path plans with SmolLM2's).
      inputs: principles, exemplars, pool, validation pairs, open-ended questions and eval tasks, checked.
      prompt_tokens, shared_tokens: the longest self-align prompt, and what a sampling batch shares.
      mesh: the training mesh over the devices (one device: a 1x1x1 mesh).
      gen_mesh: generation and scoring's mesh; None: the training mesh.
      candidates: the generation meshes `mesh_generate` all 0 tried, best decode bound first.
      shapes: the sizes the round's programs run at.
      chip: the devices' chip (soft_jax.parallel.topology), None where its limits are not published.
      programs: the round's programs compiled for the devices ([] when not compiled).
      estimate: soft_jax.scale.memory's estimate per device (None when compiled).
    """

    config: RunConfig
    model_config: ModelConfig
    tokenizer: object
    counted: str
    inputs: inputs.Inputs
    prompt_tokens: int
    shared_tokens: int
    mesh: Mesh
    gen_mesh: Mesh | None
    candidates: list[tuple[int, int, int]]
    shapes: Shapes
    chip: object
    programs: list[plan.Program]
    estimate: dict | None


def model_config(config: RunConfig, planning: bool = False) -> tuple[ModelConfig, object]:
    """(architecture, tokenizer or None) of a run config's model, without reading weights. planning: a preset that
    needs a path (llama2-7b, llama3-8b) plans from its known architecture when no path is given."""
    m = config.model
    if planning and not m.path and m.name in presets.ARCHITECTURES:
        cfg, tokenizer = presets.architecture(m.name, m.param_dtype or m.dtype, m.dtype), None
    else:
        cfg, tokenizer = presets.inspect_preset(m.name, m.path, m.dtype, m.param_dtype)
    # how the run stores the model: stacked layers, a quantized base
    return dataclasses.replace(cfg, scan_layers=m.scan_layers, quant=m.quant), tokenizer


def run_shapes(config: RunConfig, prompt_tokens: int, prefix_tokens: int) -> Shapes:
    """The shapes `soft-jax run` uses for `config`, with sampling's buckets.

    prompt_tokens: the longest self-align prompt; prefix_tokens: what a sampling batch shares (0: none)."""
    t, s = config.train_config(), config.sampling
    prefix = engine.bucket(prefix_tokens, "prefix") if prefix_tokens else 0
    return Shapes(train_rows=t.batch_size // t.grad_accum, grad_accum=t.grad_accum, row_len=t.row_len, remat=t.remat,
                  scan_layers=config.model.scan_layers, sample_rows=s.batch_size * s.group_batches,
                  prefix_len=prefix, own_len=engine.bucket(max(1, prompt_tokens - prefix_tokens)),
                  new_tokens=s.max_new_tokens,
                  score_rows=max(config.curriculum.batch_size, config.validation.batch_size),
                  score_context=engine.bucket(t.max_prompt_len, "cache"),
                  score_len=engine.bucket(t.max_response_len, "length"), keep_base=config.rounds > 1,
                  prefix_groups=s.group_batches,
                  extra_slots=sampler.TAIL_SLOTS + s.max_new_tokens if s.force_answer else 0,
                  kv_dtype=s.kv_dtype, decode_segment=s.decode_segment)


def prepare(config: RunConfig, devices: Sequence, device_bytes: int | None = None, *, compile: bool = True,
            planning: bool = False, log: Callable[[str], None] = print, name: str = "") -> RunPlan:
    """Everything a run reads and decides before its weights, checked; a UserError (one line) for what is wrong.

    devices: real or compile-only devices; device_bytes: what each holds (None: unknown, nothing refused here).
    compile: compile the round's programs for `devices` (else the memory estimate). planning (`soft-jax plan`): the
    eval tasks' data are not looked up, and a preset without a path plans from its known architecture (its prompts
    counted with SmolLM2's tokenizer). name: the devices, for the header logged before compiling."""
    cfg, tokenizer = model_config(config, planning)
    counted = "the model's tokenizer"
    if tokenizer is None:
        tokenizer, counted = presets.inspect_preset("smollm2-135m")[1], "SmolLM2's tokenizer (no model.path given)"
    run_inputs = inputs.load(config, evaluating=not planning)
    training.check_overhead(tokenizer, config.train_config())  # max lengths that cannot hold the chat format
    config = inputs.resolve_fixed_exemplars(config, run_inputs)
    prompt, shared = inputs.prompt_tokens(config, run_inputs, tokenizer)
    devices = list(devices)
    mesh = shd.make_mesh(config.mesh.shape, devices)  # refuses a mesh that does not divide the devices
    sizes = memory.resolve_mesh(dict(mesh.shape), len(devices))
    gen_shape = config_lib.generation_mesh_shape(config)
    # generation and scoring: their own mesh over the same devices in the same order (reshard copies between them
    # device to device), or the training mesh
    gen_mesh = None if gen_shape is None else shd.make_mesh(gen_shape, devices)
    if gen_mesh is not None and dict(gen_mesh.shape) == dict(mesh.shape):
        gen_mesh = None
    shapes = run_shapes(config, prompt, shared)
    plan.check_batches(shapes.train_rows, config.sampling.batch_size, sizes,
                       None if gen_mesh is None else dict(gen_mesh.shape))
    chip = topology.chip(devices[0].device_kind)
    auto = gen_shape is None and chip is not None  # as `soft-jax plan` ranks them, the best that fits
    candidates = (plan.generation_candidates(cfg, shapes, mesh, chip, device_bytes, config.sampling.batch_size)
                  if auto else [])
    programs, estimate = [], None
    if compile:
        log(f"[plan] {cfg.num_params / 1e6:,.0f}M parameters ({cfg.param_dtype} stored, {cfg.dtype} compute"
            f"{', layers stacked and scanned' if config.model.scan_layers else ''}) on {name or len(devices)}, "
            f"mesh {dict(mesh.shape)}"
            + (f", generation and scoring on mesh {dict(gen_mesh.shape)}" if gen_mesh is not None else "")
            + f"; prompts of {prompt} tokens ({shared} shared), counted with {counted}")
        progress = lambda program: log(f"[plan] compiling {program} ...")
        train_config = config.train_config()
        if auto:
            gen_mesh, programs = plan.fit_generation_mesh(cfg, shapes, mesh, candidates, device_bytes, train_config,
                                                          log, progress)
        else:
            programs = plan.compile_run(cfg, shapes, mesh, train_config, progress=progress, gen_mesh=gen_mesh)
    else:  # not compiled (a run on CPU): the estimate, and the generation mesh plan's bound ranks first
        estimate = memory.for_shapes(cfg, shapes, sizes)
        gen_mesh = shd.make_mesh(candidates[0], devices) if candidates else gen_mesh
    return RunPlan(config, cfg, tokenizer, counted, run_inputs, prompt, shared, mesh, gen_mesh, candidates, shapes,
                   chip, programs, estimate)


def round_counts(config: RunConfig, p: RunPlan) -> dict:
    """What a round's table (`tables.round_table`) multiplies the compiled programs by: the round's prompts (all
    taken as kept), epochs, held-out pairs, the pairs the relevance filter and difficulty scoring score (none for
    difficulty where the round reuses the relevance filter's perplexities or counts tokens), and the eval tasks'
    pairs, read from their items where their data is here (`eval_missing`: the tasks whose data is not)."""
    prompts, filt, cur = max(p.inputs.sizes), config.filters, config.curriculum
    relevance = 2 * prompts if filt.max_relevance_ratio else 0  # each answer after its prompt and after none
    reused = (relevance and cur.score == "response_ppl" and config.generator == "previous"
              and config.train_data != "accumulate")
    untouched = cur.score == "response_length"  # counted from the tokens: the model scores nothing
    tasks = list(dict.fromkeys(evaluation.parse_tasks(config.eval.tasks) if config.eval.tasks else []))
    pairs, missing = (evaluation.request_count(tasks, config.eval.protocol, p.tokenizer, config.eval.limit or None,
                                               config.eval.truthfulqa_file or None, download=False)
                      if tasks else (0, {}))
    not_counted = [f"eval.lm_eval.tasks ({config.eval.lm_eval.tasks})"] if config.eval.lm_eval.tasks else []
    if config.open_ended.limit:
        not_counted.append(f"{config.open_ended.limit} open-ended answers")
    return {"prompts": prompts, "epochs": config.train.epochs, "validation": len(p.inputs.validation),
            "relevance": relevance, "difficulty": 0 if reused or untouched else prompts, "eval": pairs,
            "frozen_base": bool(config.train.lora_rank),
            "eval_missing": sorted(missing), "not_counted": not_counted}


def plan_run(config: RunConfig, where: plan.Target, log=print) -> list[plan.Program]:
    """`soft-jax plan`: compiles a run config's programs for `where`, prints the table and the speed bounds, and
    refuses (UserError) a program that does not fit a device."""
    p = prepare(config, where.devices, where.device_bytes, planning=True, log=log, name=where.name)
    if config_lib.generation_mesh_shape(config) is None and p.chip is not None:
        log("[plan] mesh_generate all 0: generation and scoring on "
            + (f"mesh {dict(p.gen_mesh.shape)}, plan's best generation mesh that fits" if p.gen_mesh is not None else
               "the training mesh (" + ("one device" if p.mesh.devices.size == 1 else
                                        "no tensor-parallel mesh fits") + ")"))
    log(tables.programs_table(p.programs, where.device_bytes))
    if p.chip is not None:
        tables.log_bounds(p.model_config, p.shapes, p.mesh, p.gen_mesh, p.programs, p.chip, where,
                          max(p.inputs.sizes), log, counts=round_counts(config, p))
    tables.refuse_over(p.programs, where.device_bytes)
    return p.programs
