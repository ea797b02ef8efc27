"""`soft-jax plan`: a run config's programs compiled for a slice or a GPU before the run pays for it.

The config and its inputs are read as `soft-jax run` reads them (prompt lengths, batch sizes, the generation mesh),
and soft_jax.scale.plan compiles and measures what the round would run."""

from __future__ import annotations

from soft_jax.experiment import config as config_lib
from soft_jax.experiment import inputs
from soft_jax.models import presets
from soft_jax.parallel import sharding as shd
from soft_jax.parallel import topology
from soft_jax.scale import memory, plan, tables


def plan_run(config, where: plan.Target, log=print) -> list[plan.Program]:
    """Compiles a run config's programs for `where`, prints the table, and refuses (UserError) a program
    that does not fit a device."""
    cfg, tokenizer = plan.model_config(config)
    counted = "the model's tokenizer"
    if tokenizer is None:
        tokenizer, counted = presets.inspect("smollm2-135m")[1], "SmolLM2's tokenizer (no model.path given)"
    run_inputs = inputs.load(config, evaluating=False)
    prompt, shared = inputs.prompt_tokens(config, run_inputs, tokenizer)
    mesh = shd.make_mesh((config.mesh.data, config.mesh.fsdp, config.mesh.tensor), where.devices)
    sizes = memory.resolve_mesh(dict(mesh.shape), mesh.devices.size)
    gen_shape = config_lib.generation_mesh_shape(config)
    gen_mesh = None if gen_shape is None else shd.make_mesh(gen_shape, where.devices)
    plan.check_batches(config, sizes, None if gen_mesh is None else dict(gen_mesh.shape))
    shapes = plan.Shapes.of_run(config, prompt, shared)
    chip = topology.chip(where.devices[0].device_kind)
    log(f"[plan] {cfg.num_params / 1e6:,.0f}M parameters ({cfg.param_dtype} stored, {cfg.dtype} compute"
        f"{', layers stacked and scanned' if config.model.scan_layers else ''}) on {where.name}, "
        f"mesh {dict(mesh.shape)}"
        + (f", generation and scoring on mesh {dict(gen_mesh.shape)}" if gen_mesh is not None else "")
        + f"; prompts of {prompt} tokens ({shared} shared), counted with {counted}")
    progress = lambda name: log(f"[plan] compiling {name} ...")
    if gen_shape is None and chip is not None:  # as a run chooses: plan's best generation mesh that fits
        gen_mesh, programs = plan.fit_generation_mesh(cfg, shapes, mesh, plan.generation_candidates(
            config, cfg, shapes, mesh, chip, where.device_bytes), where.device_bytes, inputs.train_config(config), log,
            progress)
        log("[plan] mesh_generate all 0: generation and scoring on "
            + (f"mesh {dict(gen_mesh.shape)}, plan's best generation mesh that fits" if gen_mesh is not None else
               "the training mesh (" + ("one device" if mesh.devices.size == 1 else
                                        "no tensor-parallel mesh fits") + ")"))
    else:
        programs = plan.compile_run(cfg, shapes, mesh, inputs.train_config(config), progress=progress,
                                    gen_mesh=gen_mesh)
    log(tables.programs_table(programs, where.device_bytes))
    if chip is not None:
        tables.log_bounds(cfg, shapes, mesh, gen_mesh, programs, chip, where, max(run_inputs.sizes), log)
    tables.refuse_over(programs, where.device_bytes)
    return programs
