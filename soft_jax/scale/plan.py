"""Will a run compile and fit? Its own programs, compiled for the target devices from this machine.

`compile_run(model_cfg, shapes, mesh, train_config)` lowers the programs a round runs at the sizes `Shapes`
gives (soft_jax.experiment.preflight.run_shapes for a run config), on abstract parameters (no weight is read), with the
run's mesh and shardings, and compiles them for the mesh's devices: real ones, or the
compile-only devices of a TPU slice or GPU node (soft_jax.parallel.topology) that this CPU can compile for. XLA's
`memory_analysis()` then says what each program needs per device:

- train_step: one optimizer step (grad_accum micro-batches of the config's micro-batch), parameters and
  Adam moments donated;
- prefix_prefill: the principles + exemplars a sampling batch shares, prefilled once at batch 1;
- prefill: the batch's own prompts, after the shared prefix;
- decode: the sampling loop over the KV cache;
- score: one scoring pass (difficulty, validation): responses read after their prompts' cached rows.

A program's peak is its arguments + outputs - donated (aliased) buffers + temporaries + code. Parameter
copies that live beside it (the model the trainer copied its parameters from, the base model kept from
round 2 on) are added as `resident`. `soft-jax plan` prints the table and exits 2 when a program does not
fit the device's memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from soft_jax import training
from soft_jax.core.errors import UserError
from soft_jax.inference import engine, scorer
from soft_jax.models.config import ModelConfig
from soft_jax.models.llama import KVCache, Llama, SharedPrefix
from soft_jax.parallel import hlo
from soft_jax.parallel import sharding as shd
from soft_jax.scale.memory import Shapes, size_text

GiB = 1024 ** 3


@dataclasses.dataclass
class Program:
    """One compiled program's memory per device (bytes) and its compile time."""

    name: str
    shapes: str  # what it was compiled for, in words
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    resident: int  # parameter copies alive beside the program, outside it
    compile_s: float
    compiled: object = dataclasses.field(repr=False, default=None)
    refused: str = ""  # the compiler's message when it refused the program (temporaries: what it said it needed)

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code + self.resident


def abstract_model(cfg: ModelConfig, train_config: training.TrainConfig | None = None):
    """(graphdef, abstract parameter state): shapes and dtypes only, nothing allocated; with the LoRA adapters
    `train_config` asks for (train.lora_rank)."""
    return nnx.split(abstract_module(cfg, train_config))


def abstract_module(cfg: ModelConfig, train_config: training.TrainConfig | None = None) -> Llama:
    from soft_jax.models import lora

    def make():
        model = Llama(cfg, rngs=nnx.Rngs(0))
        if train_config is not None and train_config.lora_rank:
            model = lora.add_adapters(model, train_config.lora_rank, train_config.lora_alpha, train_config.lora_targets)
        return model

    return nnx.eval_shape(make)


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _rows(mesh, shape, dtype):
    """An array whose first axis is batch rows: rows over data x fsdp."""
    return _sds(shape, dtype, NamedSharding(mesh, shd.logical_to_spec(("batch",), shape[:1], mesh)))


def _replicated(mesh, shape, dtype):
    return _sds(shape, dtype, NamedSharding(mesh, PartitionSpec()))


def abstract_cache(cfg: ModelConfig, mesh, rows: int, length: int, prefix_len: int = 0, groups: int = 1,
                   kv_dtype: str = "model") -> KVCache:
    """A KVCache of ShapeDtypeStructs on the shardings sampling puts caches on (`groups` shared prefixes; the rows'
    own slots stored as kv_dtype, the prefixes in the compute dtype)."""
    def place(x):
        return _sds(x.shape, x.dtype, shd.cache_sharding(x.shape, mesh))

    shared = None
    if prefix_len:
        one = jax.eval_shape(lambda: KVCache.init(cfg, groups, prefix_len))
        shared = jax.tree.map(place, SharedPrefix(k=one.k, v=one.v, positions=one.positions,
                                                  segment_ids=one.segment_ids))
    cache = jax.eval_shape(lambda: KVCache.init(cfg, rows, length, kv_dtype))
    return jax.tree.map(place, cache).replace(prefix=shared)


def param_bytes(state, mesh) -> int:
    """Bytes one device holds of an (abstract) parameter state on its shardings."""
    shardings = jax.tree.leaves(shd.tree_shardings(state, mesh))
    arrays = jax.tree.leaves(state)
    return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for s, a in zip(shardings, arrays))


def generation_state(cfg: ModelConfig, state):
    """The abstract parameters of a generation mesh's copy: in the compute dtype when it is narrower than the
    stored one (loop.generation_dtype), as `sharding.reshard` makes them."""
    stored, compute = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    if compute.itemsize >= stored.itemsize:
        return state
    cast = lambda x: jax.ShapeDtypeStruct(x.shape, compute if jnp.issubdtype(x.dtype, jnp.floating)
                                          else x.dtype)
    # parameters only: a quantized kernel's float scales keep their dtype, as sharding.reshard keeps them
    return jax.tree.map(lambda v: jax.tree.map(cast, v) if isinstance(v, nnx.Param) else v, state,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


def _lowerings(cfg: ModelConfig, shapes: Shapes, mesh, train_config: training.TrainConfig, gen_mesh=None):
    """(name, what, resident bytes of parameter copies, lower()) for each program of a round: the train step on
    `mesh`, generation and scoring on `gen_mesh` (None: `mesh`)."""
    cfg = dataclasses.replace(cfg, scan_layers=shapes.scan_layers)
    module = abstract_module(cfg, train_config)
    graphdef, state = nnx.split(module)
    lora_rank = train_config.lora_rank
    gmesh = gen_mesh if gen_mesh is not None else mesh
    gparams = shd.abstract(generation_state(cfg, state) if gmesh is not mesh else state, gmesh)
    platform = mesh.devices.flat[0].platform
    i32, f32 = jnp.int32, jnp.float32
    base = int(shapes.keep_base)

    def train():
        tx = training.make_optimizer(train_config)
        # as training.Trainer splits it: LoRA trains the adapters, the base goes in frozen
        tgraph, trained, frozen = nnx.split(module, nnx.LoRAParam if lora_rank else nnx.Param, ...)
        params, frozen = shd.abstract(trained, mesh), shd.abstract(frozen, mesh)
        opt_state = shd.abstract(jax.eval_shape(tx.init, trained), mesh)
        dropout = train_config.lora_dropout if lora_rank else 0.0
        step = training.compiled_step(tgraph, tx, shapes.remat, platform, mesh, (params, opt_state, frozen), dropout)
        shape = (shapes.grad_accum, shapes.train_rows, shapes.row_len)
        batch_sharding = NamedSharding(mesh, training.BATCH_SPEC)
        # loss at every position: the widest loss_rows a run can have (a real round's is at most this)
        batch = {k: _sds(shape, f32 if k == "loss_weights" else i32, batch_sharding)
                 for k in ("inputs", "segment_ids", "positions", "loss_at", "loss_targets", "loss_weights")}
        if dropout:  # a key per row
            batch["noise"] = _sds(shape[:2] + (2,), jnp.uint32, batch_sharding)
        return step.lower(params, opt_state, batch, _replicated(mesh, (), f32), frozen)

    rows, own, groups = shapes.sample_rows, shapes.own_len, shapes.prefix_groups
    slots = own + shapes.new_tokens + shapes.extra_slots

    def prefix_prefill():
        length = shapes.prefix_len
        ids = _replicated(gmesh, (groups, length), i32)
        return engine.prefill.lower(graphdef, gmesh, gparams, ids, ids, ids,
                                    abstract_cache(cfg, gmesh, groups, length))

    def prefill():
        ids = _rows(gmesh, (rows, own), i32)
        cache = abstract_cache(cfg, gmesh, rows, slots, shapes.prefix_len, groups, shapes.kv_dtype)
        return engine.prefill.lower(graphdef, gmesh, gparams, ids, ids, ids, cache,
                                    own if shapes.decode_segment else None)

    def decode():  # the last segment's window, the widest: the whole cache
        cache = abstract_cache(cfg, gmesh, rows, slots, shapes.prefix_len, groups, shapes.kv_dtype)
        key = jax.eval_shape(lambda: jax.random.key(0))
        ds = engine.DecodeState(step=_replicated(gmesh, (), i32), cache=cache,
                                logits=_rows(gmesh, (rows, cfg.vocab_size), f32),
                                out=_rows(gmesh, (rows, shapes.new_tokens), i32), done=_rows(gmesh, (rows,), bool),
                                rng=_replicated(gmesh, key.shape, key.dtype))
        knobs = (_replicated(gmesh, (), f32), _replicated(gmesh, (), f32), _replicated(gmesh, (), i32),
                 _replicated(gmesh, (2,), i32))
        return engine.decode.lower(graphdef, gmesh, gparams, ds, _rows(gmesh, (rows,), i32), knobs,
                                   _replicated(gmesh, (), i32), True, False)

    def score():
        n = shapes.score_rows
        heads = abstract_cache(cfg, gmesh, n, shapes.score_context)
        ids = _rows(gmesh, (n, shapes.score_len), i32)
        local = gmesh.shape["data"] * gmesh.shape["fsdp"] > 1  # as scorer.score_tokens: rows read their own cache
        which = None if local else _rows(gmesh, (n,), i32)
        return scorer.score_rows.lower(graphdef, gmesh, gparams, heads, which, ids, ids, ids, ids,
                                       _rows(gmesh, (n, 1), i32))

    one_copy = param_bytes(state, mesh)
    # beside a generation program: the base model (generator=base) or, on a generation mesh of its own, the
    # training-layout copies it was resharded from (the model, and the base model). With LoRA the base model
    # and the trained one share their base arrays: the train step holds them as its frozen argument.
    if lora_rank:
        train_resident, beside = 0, 0 if gmesh is mesh else one_copy
    else:
        train_resident, beside = (1 + base) * one_copy, base * one_copy if gmesh is mesh else (1 + base) * one_copy
    out = [("train_step", f"{shapes.grad_accum} x {shapes.train_rows} rows x {shapes.row_len} tokens"
            f"{', remat' if shapes.remat else ''}{', scanned' if shapes.scan_layers else ''}"
            f"{f', LoRA rank {lora_rank}' if lora_rank else ''}"
            f"{f', dropout {train_config.lora_dropout}' if lora_rank and train_config.lora_dropout else ''}",
            train_resident, train)]
    if shapes.prefix_len:
        out.append(("prefix_prefill", f"{groups} x {shapes.prefix_len} shared tokens", beside, prefix_prefill))
    out += [("prefill", f"{rows} rows x {own} tokens" + (" after the prefix" if shapes.prefix_len else ""), beside,
             prefill),
            ("decode", f"{rows} rows, cache {slots} slots", beside, decode),
            ("score", f"{shapes.score_rows} rows x {shapes.score_len} tokens after {shapes.score_context}", beside,
             score)]
    return out


def compile_run(cfg: ModelConfig, shapes: Shapes, mesh, train_config: training.TrainConfig | None = None,
                only: Sequence[str] | None = None, progress=None, gen_mesh=None) -> list[Program]:
    """Compiles a round's programs for `mesh` (generation and scoring for `gen_mesh`, when given) and reads
    their memory per device (see the module docstring)."""
    train_config = train_config or training.TrainConfig()
    lowerings = _lowerings(cfg, shapes, mesh, train_config, gen_mesh)
    programs = []
    for name, what, resident, lower in lowerings:
        if only is not None and name not in only:
            continue
        if progress:
            progress(name)
        start = time.perf_counter()
        try:
            compiled = lower().compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses some programs over HBM
            need = _refused_bytes(str(e))
            if need is None:
                raise
            programs.append(Program(name, what, 0, 0, 0, need, 0, resident, time.perf_counter() - start,
                                    refused=str(e).splitlines()[0]))
            continue
        seconds = time.perf_counter() - start
        m = compiled.memory_analysis()
        programs.append(Program(name, what, m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
                                m.temp_size_in_bytes, m.generated_code_size_in_bytes, resident, seconds,
                                compiled))
    return programs


def check_batches(train_rows: int, sample_batch: int, mesh_sizes: dict, generation_sizes: dict | None = None
                  ) -> None:
    """Refuses batch sizes that the meshes' data axes (data x fsdp) do not divide: the training micro-batch
    (`train_rows`) on the training mesh, the sampling batch on the generation mesh (`generation_sizes`; None: the
    training one)."""
    shd.check_rows(sample_batch, generation_sizes or mesh_sizes,
                   "config: sampling.batch_size" + (" (on mesh_generate)" if generation_sizes else ""))
    shd.check_rows(train_rows, mesh_sizes, "config: train.batch_size / train.grad_accum")


GENERATION_PROGRAMS = ("prefix_prefill", "prefill", "decode", "score")


def generation_candidates(cfg: ModelConfig, shapes: Shapes, mesh, chip, device_bytes: int | None, sample_batch: int
                          ) -> list[tuple[int, int, int]]:
    """The generation meshes `mesh_generate` all 0 tries, in order: the tensor-parallel meshes
    propose_generation_mesh ranks (best decode bound first) whose data axes split the sampling batch
    (`sample_batch` rows), up to the training mesh (not tried: it is what is left). Empty where the chip's limits
    are not published."""
    from soft_jax.scale import memory

    if chip is None:
        return []
    devices = list(mesh.devices.flat)
    resident = (1 + int(shapes.keep_base)) * param_bytes(abstract_model(cfg)[1], mesh)
    sizes = memory.resolve_mesh(dict(mesh.shape), len(devices))
    out = []
    for shape, _, _ in propose_generation_mesh(cfg, shapes, devices, chip, device_bytes, resident, mesh):
        if shape == tuple(mesh.shape.values()):
            break
        try:
            check_batches(shapes.train_rows, sample_batch, sizes, dict(zip(shd.MESH_AXES, shape)))
        except UserError:
            continue
        out.append(shape)
    return out


def fit_generation_mesh(cfg: ModelConfig, shapes: Shapes, mesh, candidates: Sequence[tuple[int, int, int]],
                        device_bytes: int | None, train_config=None, log=print, progress=None):
    """(generation mesh, or None for the training mesh; the round's compiled programs): the first of `candidates`
    whose generation and scoring programs the compiler accepts and a device holds, else the training mesh.

    A candidate is ranked on what its weights and KV cache need; the compiled program also holds temporaries,
    so the first may still not fit: then the next is compiled, and said."""
    programs = compile_run(cfg, shapes, mesh, train_config, only=["train_step"], progress=progress)
    for shape in candidates:
        gen_mesh = shd.make_mesh(shape, list(mesh.devices.flat))
        generation = compile_run(cfg, shapes, mesh, train_config, only=GENERATION_PROGRAMS, progress=progress,
                                 gen_mesh=gen_mesh)
        over = [p for p in generation if p.refused or (device_bytes and p.total > device_bytes)]
        if not over:
            return gen_mesh, programs + generation
        worst = max(over, key=lambda p: p.total)
        log(f"[mesh] generation mesh {dict(gen_mesh.shape)}: {worst.name} needs {size_text(worst.total)} per device "
            f"as compiled, more than the {size_text(device_bytes)} a device has; trying the next")
    return None, programs + compile_run(cfg, shapes, mesh, train_config, only=GENERATION_PROGRAMS, progress=progress)


def _refused_bytes(message: str) -> int | None:
    """What a refused compile said it needed: "... HLO temporaries (18.86G) exceeds available HBM ..."."""
    m = re.search(r"RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT])\) exceeds", message)
    return None if m is None else int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2)))


_SHAPE = re.compile(r"\b(pred|s8|u8|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")


def hlo_shapes(compiled) -> set[tuple[str, tuple[int, ...]]]:
    """(dtype, per-device shape) of every array in a compiled program's optimized HLO."""
    return {(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
            for m in _SHAPE.finditer(compiled.as_text())}


def mlp_tokens(program: Program, cfg: ModelConfig, mesh) -> int:
    """The most tokens one device runs through the MLP at once in `program`: the leading dimensions of its
    largest [..., mlp / tensor] activation. Weights ([..., embed or its fsdp shard, mlp]: a kernel, its
    gathered or stacked form) are left out. Under the activation rules this is the device's share of the
    batch's rows, not the global batch."""
    if program.compiled is None:
        return 0
    tensor = mesh.shape["tensor"]
    mlp = cfg.intermediate_size // tensor if cfg.intermediate_size % tensor == 0 else cfg.intermediate_size
    weight_rows = {cfg.hidden_size, cfg.hidden_size // mesh.shape["fsdp"]}
    tokens = 0
    for _, s in hlo_shapes(program.compiled):
        lead = [d for d in s[:-1] if d != 1]
        if len(s) > 1 and s[-1] == mlp and not (lead and lead[-1] in weight_rows):
            tokens = max(tokens, math.prod(lead))
    return tokens


def expected_tokens(name: str, shapes: Shapes, mesh) -> int:
    """The tokens per device `mlp_tokens` should find: the program's rows split over data x fsdp."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    share = lambda rows: rows // dp if rows % dp == 0 else rows
    return {"train_step": share(shapes.train_rows) * shapes.row_len,
            "prefix_prefill": share(shapes.prefix_groups) * shapes.prefix_len,
            "prefill": share(shapes.sample_rows) * shapes.own_len, "decode": share(shapes.sample_rows),
            "score": share(shapes.score_rows) * shapes.score_len}[name]


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class DecodeBound:
    """Lower bounds on one decode step per chip, from what it must read (its share of the weights and the KV
    cache), compute and receive (the compiled program's collectives), against the chip's published limits."""

    weights_read: int  # bytes per step: the weights each chip multiplies by (its tensor shard, whole over fsdp)
    cache_read: int  # bytes per step: the chip's KV cache, the mean decode window of it (engine.mean_window)
    flops: float  # per step per chip
    collectives: float  # bytes per step per chip: in the loop, plus what is moved once per call over its steps
    step_s: float
    limited_by: str  # "HBM", "FLOP/s" or "interconnect"
    tokens_per_s_per_chip: float
    reshard_s: float | None  # moving the weights into the generation layout, once per phase (None: same mesh)
    note: str = ""
    cache_held: int = 0  # bytes: the chip's whole KV cache (what it holds; cache_read is what a step reads)


def decode_bound(cfg: ModelConfig, shapes: Shapes, gen_mesh, chip, traffic_: hlo.Traffic | None = None,
                 train_mesh=None) -> DecodeBound:
    """The decode step's lower bound on `gen_mesh` for `chip` (soft_jax.parallel.topology.chip). traffic_: the compiled
    decode program's collectives (None: an estimate without them, as for a mesh not compiled)."""
    n = gen_mesh.devices.size
    tensor, replicas = gen_mesh.shape["tensor"], gen_mesh.shape["data"] * gen_mesh.shape["fsdp"]
    graphdef, state = abstract_model(cfg)
    own_copy = train_mesh is not None and dict(train_mesh.shape) != dict(gen_mesh.shape)
    copy = generation_state(cfg, state) if own_copy else state
    total = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(copy))
    weights = total / tensor
    slots = shapes.own_len + shapes.new_tokens + shapes.extra_slots
    whole = abstract_cache(cfg, gen_mesh, shapes.sample_rows, slots, shapes.prefix_len, shapes.prefix_groups,
                           shapes.kv_dtype)
    # a step reads the shared prefixes whole and the rows' own slots up to its segment's window: on average over
    # the loop, the mean window (the first pass's: a forced answer's second pass reads more, and is not counted)
    window = engine.mean_window(shapes.own_len, shapes.new_tokens, slots, shapes.decode_segment)
    prefix = shard_bytes(whole.prefix) if whole.prefix is not None else 0
    cache = prefix + int((shard_bytes(whole) - prefix) * window / slots)
    rows = shapes.sample_rows / replicas if shapes.sample_rows % replicas == 0 else shapes.sample_rows
    matmul = cfg.num_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (window + shapes.prefix_len)
    flops = rows * (2 * matmul + attention) / tensor
    moved = 0.0 if traffic_ is None else traffic_.per_step + traffic_.per_call / max(shapes.new_tokens, 1)
    times = {"HBM": (weights + cache) / chip.hbm_bandwidth, "FLOP/s": flops / chip.peak_bf16_flops}
    note = ""
    if chip.interconnect_bandwidth:
        times["interconnect"] = moved / chip.interconnect_bandwidth
    elif moved:
        note = f"{chip.name}: no published per-chip interconnect bandwidth; collectives not bounded"
    limited_by = max(times, key=times.get)
    step = times[limited_by]
    if note:
        limited_by += " (collectives unbounded)"
    reshard = None
    if own_copy and chip.interconnect_bandwidth:
        held = param_bytes(state, train_mesh)  # already on the chip before the move (at best all of it useful)
        reshard = max(param_bytes(copy, gen_mesh) - held, 0) / chip.interconnect_bandwidth
    return DecodeBound(int(weights), cache, flops, moved, step, limited_by, shapes.sample_rows / step / n, reshard,
                       note, cache_held=shard_bytes(whole))


def propose_generation_mesh(cfg: ModelConfig, shapes: Shapes, devices, chip, device_bytes: int | None,
                            resident: int = 0, train_mesh=None) -> list[tuple[tuple[int, int, int], DecodeBound, int]]:
    """Tensor-parallel generation meshes (data, 1, tensor) over `devices`, best decode bound first, that hold
    their weights, KV cache and `resident` bytes in `device_bytes`: [(shape, bound without collectives, bytes)].
    The tensor axis divides the KV heads (else the cache is copied on each of its chips); rows split evenly."""
    n, out = len(devices), []
    copy = generation_state(cfg, abstract_model(cfg)[1])
    for tensor in (t for t in range(1, n + 1) if n % t == 0 and cfg.num_kv_heads % t == 0 and t <= 16):
        shape = (n // tensor, 1, tensor)
        if shapes.sample_rows % shape[0]:
            continue
        mesh = shd.make_mesh(shape, devices)
        bound = decode_bound(cfg, shapes, mesh, chip, train_mesh=train_mesh)
        need = param_bytes(copy, mesh) + bound.cache_held + resident
        if device_bytes is None or need <= device_bytes:
            out.append((shape, bound, need))
    return sorted(out, key=lambda x: -x[1].tokens_per_s_per_chip)


def param_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    """Every parameter's shape, and with stacked layers one layer's too (what a scanned layer gathers)."""
    shapes = set()
    for x in jax.tree.leaves(abstract_model(cfg)[1]):
        shapes.add(tuple(x.shape))
        if cfg.scan_layers and x.ndim > 1 and x.shape[0] == cfg.num_layers:
            shapes.add(tuple(x.shape[1:]))
    return sorted(shapes)


def traffic(program: Program) -> hlo.Traffic | None:
    """The collectives of a compiled program (None when the compiler refused it)."""
    return None if program.compiled is None else hlo.traffic(program.compiled.as_text())


@dataclasses.dataclass
class Target:
    """Devices to compile for: real ones or compile-only ones, and the memory each has."""

    name: str
    devices: list
    device_bytes: int | None


def target(tpu: str | None = None, gpu_target: str | None = None, gpus: int = 1,
           gpu_memory_gib: float | None = None) -> Target:
    """A TPU slice by name (`v5e-64`), GPUs by name (h100, a100, l4) or target-config file, or
    this machine's own devices when neither is given."""
    from soft_jax.parallel import topology

    if tpu and gpu_target:
        raise UserError("give --topology (a TPU slice) or --gpu-target (GPUs), not both")
    if tpu:
        spec = topology.parse(tpu)
        return Target(f"{spec.name} ({spec.chips} x {spec.device_kind}, {spec.hbm_bytes / GiB:.0f} GiB HBM each, "
                      f"{spec.hosts} host(s))", topology.devices(spec), spec.hbm_bytes)
    if gpu_target:
        spec = topology.GPUS.get(gpu_target.lower())
        path = spec.target_config if spec else gpu_target
        if not (spec or gpu_memory_gib):
            raise UserError(f"--gpu-target {gpu_target}: with a target-config file also give --gpu-memory GIB, "
                            f"the memory a process gets of one GPU (or name one of {', '.join(topology.GPUS)})")
        share = "" if gpu_memory_gib else (f": {topology.gpu_memory_share():.0%} of {spec.hbm_bytes / GiB:.1f} GiB "
                                           "(XLA_PYTHON_CLIENT_MEM_FRACTION)")
        memory_bytes = int(gpu_memory_gib * GiB if gpu_memory_gib else spec.hbm_bytes * topology.gpu_memory_share())
        label = f"{spec.label if spec else os.path.basename(path)}, {memory_bytes / GiB:.1f} GiB each{share}"
        return Target(f"{gpus} x {label}", topology.gpu_devices(path, gpus), memory_bytes)
    from soft_jax.scale import memory

    devices = jax.devices()
    return Target(f"this machine: {len(devices)} x {devices[0].device_kind}", devices, memory.device_memory())


# --- the sizes of the scale-up tables (benchmarks/memory_table.py, benchmarks/decode_bounds.py) ---------------

def table_shapes(mesh_shape, settings=None) -> tuple[Shapes, dict]:
    """soft_jax.scale.memory.TABLE_SETTINGS as Shapes (scanned layers), and the estimate's keyword arguments."""
    from soft_jax.scale import memory

    s = dict(settings or memory.TABLE_SETTINGS)
    dp = mesh_shape[0] * mesh_shape[1]
    micro = s["rows_per_device"] * dp
    accum = max(1, s["train_batch"] // micro)
    prefix, new = s["sample_prefix"], s["sample_new"]
    own = s["sample_len"] - prefix - new
    shapes = Shapes(train_rows=micro, grad_accum=accum, row_len=s["train_seq"], remat=s["remat"], scan_layers=True,
                    sample_rows=s["sample_batch"], prefix_len=prefix, own_len=own, new_tokens=new,
                    score_rows=micro, score_context=engine.bucket(s["train_seq"] // 2, "cache"),
                    score_len=s["train_seq"] // 2, keep_base=s["keep_base"])
    estimate = dict(train_batch=accum * micro, train_seq=s["train_seq"], grad_accum=accum, remat=s["remat"],
                    sample_batch=s["sample_batch"], sample_len=s["sample_len"], sample_new=new,
                    sample_prefix=prefix, keep_base=s["keep_base"])
    return shapes, estimate
