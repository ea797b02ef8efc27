"""soft_jax.scale.plan: the round's programs compiled for a mesh. Generation on a mesh of its own (config
mesh_generate): the weights are resharded device to device from the
training layout, equal array by array; the compiled decode step on a tensor-parallel generation mesh gathers no
parameter (read from its optimized HLO), where the training FSDP layout gathers every weight; and `plan`
compiles generation and scoring for it. A round on it equals one device's: tests/parallel/test_distributed.py."""

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import CONFIGS, TESTS, fresh_environment, run_cli

from soft_jax.parallel import hlo

pytestmark = pytest.mark.e2e  # whole runs, CLI processes, killed and restarted runs (conftest.py)

SCRIPT = r"""
import dataclasses, json, sys
import jax, numpy as np
from flax import nnx
sys.path.insert(0, sys.argv[1])
import helpers as t
from soft_jax import models
from soft_jax.parallel import hlo
from soft_jax.scale import plan
from soft_jax.parallel import sharding as shd
from soft_jax.models.llama import Llama

scan = sys.argv[2] == "scanned"
cfg, sizes = dataclasses.replace(t.CFG, scan_layers=scan), dataclasses.replace(t.SHAPES, scan_layers=scan)
train, gen = shd.make_mesh((1, 8, 1)), shd.make_mesh((2, 1, 4))
model = models.shard_model(Llama(cfg, rngs=nnx.Rngs(0)), train)
moved = shd.reshard(model, gen)
same, specs = [], []
for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(moved))):
    axes = a.get_metadata().get("axes", ())
    same.append(bool(np.array_equal(np.asarray(a[...]), np.asarray(b[...]))))
    specs.append([str(b[...].sharding.spec), str(shd.logical_to_spec(axes, a.shape, gen)),
                  str(a[...].sharding.spec), str(shd.logical_to_spec(axes, a.shape, train))])
# a whole parameter, or (stacked layers) one layer of it: what a scanned layer gathers
shapes = sorted({s for _, v in nnx.to_flat_state(nnx.state(model))
                 for s in ([tuple(v.shape)] + ([tuple(v.shape[1:])] if scan and len(v.shape) > 1 else []))})
gathers = {}
for name, gen_mesh in (("training layout", None), ("generation mesh", gen)):
    programs = plan.compile_run(cfg, sizes, train, gen_mesh=gen_mesh, only=["decode", "score"])
    gathers[name] = {p.name: [c.shape for c in hlo.parameter_gathers(plan.traffic(p), shapes, in_loop=False)]
                     for p in programs}
print(json.dumps({"same": same, "specs": specs, "gathers": gathers}))
"""


@pytest.mark.parametrize("layers", ["loop"])  # stacked layers: test_plan_compiles_generation_for_its_own_mesh
def test_resharded_weights_are_equal_and_decode_gathers_no_parameter(layers):
    """The script takes "scanned" too (stacked layers: decode and scoring scan one layer, whose weights FSDP
    gathers per step); the default run leaves that to the plan CLI test, which reads the same from the TPU
    programs, to stay within its time."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, TESTS, layers], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["same"] and all(out["same"])
    for moved, want_moved, before, want_before in out["specs"]:
        assert (moved, before) == (want_moved, want_before)
    assert any("tensor" in moved for moved, *_ in out["specs"])  # the copy is split over tensor, not fsdp
    # the check sees FSDP's gathers: every layer's weights (once in the scanned layer), in decode and in scoring
    per_layer = 1 if layers == "scanned" else 3
    assert len(out["gathers"]["training layout"]["decode"]) >= per_layer * 7
    assert len(out["gathers"]["training layout"]["score"]) >= per_layer * 7
    assert out["gathers"]["generation mesh"] == {"decode": [], "score": []}


HLO = """HloModule m

%body (p: (s32[], f32[8,96])) -> (s32[], f32[8,96]) {
  %p = (s32[], f32[8,96]{1,0}) parameter(0)
  %w = f32[12,32]{1,0} get-tuple-element(%p), index=1
  %ag = f32[96,32]{1,0} all-gather(%w), dimensions={0}
  %f = f32[8,96]{1,0} fusion(%ag), kind=kLoop, calls=%inner
  ROOT %t = (s32[], f32[8,96]{1,0}) tuple(%i, %f)
}

%inner (x: f32[96,32]) -> f32[8,96] {
  %x = f32[96,32]{1,0} parameter(0)
  %ars = f32[8,96]{1,0} all-reduce-start(%x), to_apply=%add
  ROOT %ar = f32[8,96]{1,0} all-reduce-done(%ars)
}

%cond (p: (s32[], f32[8,96])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: bf16[4,1000]) -> bf16[4,1000] {
  %a = bf16[4,1000]{1,0} parameter(0)
  %g = bf16[8,1000]{1,0} all-gather(%a), dimensions={0}
  %loop = (s32[], f32[8,96]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = bf16[4,1000]{1,0} copy(%a)
}
"""


def test_collectives_are_attributed_to_loops_and_calls():
    """A hand-written module: an all-gather in a while body, an async all-reduce in a computation the body
    calls (counted once, at its -done), an all-gather outside any loop."""
    t = hlo.traffic(HLO)
    assert sorted((c.kind, c.in_loop, c.bytes) for c in t.collectives) == [
        ("all-gather", False, 8 * 1000 * 2), ("all-gather", True, 96 * 32 * 4), ("all-reduce", True, 8 * 96 * 4)]
    assert t.per_step == 96 * 32 * 4 + 8 * 96 * 4 and t.per_call == 8 * 1000 * 2
    assert [c.shape.split("{")[0] for c in hlo.parameter_gathers(t, [(96, 32), (1000, 96)])] == ["f32[96,32]"]


NESTED = """HloModule m

%layer (q: (s32[], f32[8,96])) -> (s32[], f32[8,96]) {
  %q = (s32[], f32[8,96]{1,0}) parameter(0)
  %v = f32[12,32]{1,0} get-tuple-element(%q), index=1
  ROOT %lg = f32[96,32]{1,0} all-gather(%v), dimensions={0}
}

%prefill_layer (q: (s32[], f32[8,96])) -> (s32[], f32[8,96]) {
  %q = (s32[], f32[8,96]{1,0}) parameter(0)
  %v = bf16[12,32]{1,0} get-tuple-element(%q), index=1
  ROOT %pg = bf16[96,32]{1,0} all-gather(%v), dimensions={0}
}

%step (p: (s32[], f32[8,96])) -> (s32[], f32[8,96]) {
  %p = (s32[], f32[8,96]{1,0}) parameter(0)
  %layers = (s32[], f32[8,96]{1,0}) while(%p), condition=%LAYERS_COND, body=%layer, LAYERS_CONFIG
  ROOT %ar = f32[8,96]{1,0} all-reduce(%x), to_apply=%add
}

%cond (p: (s32[], f32[8,96])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%layers_left (p: (s32[], f32[8,96])) -> pred[] {
  %n = s32[]{:T(128)} constant(30)
  %p = (s32[], f32[8,96]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8,96]) -> f32[8,96] {
  %a = f32[8,96]{1,0} parameter(0)
  %prefill = (s32[], f32[8,96]{1,0}) while(%a), condition=%cond, body=%prefill_layer, backend_config={"known_trip_count":{"n":"30"}}
  ROOT %decode = (s32[], f32[8,96]{1,0}) while(%a), condition=%cond, body=%step
}
"""


def test_a_loop_nested_in_a_step_counts_its_trip_count_times():
    """Layers scanned inside a decode step: the layer loop's all-gather runs 30 times per token step, its trip
    count read from XLA's annotation or from its loop condition. The same
    layer loop outside any loop (a prefill) is itself the outermost loop: its body counts once per iteration."""
    for how, cond, config in (("XLA:CPU's annotation", "cond", 'backend_config={"known_trip_count":{"n":"30"}}'),
                              ("the TPU compiler's i < N condition", "layers_left", "metadata={}")):
        t = hlo.traffic(NESTED.replace("LAYERS_COND", cond).replace("LAYERS_CONFIG", config))
        assert t.per_step == 30 * 96 * 32 * 4 + 8 * 96 * 4 + 96 * 32 * 2, how
        assert sorted((c.computation, c.repeats) for c in t.collectives) == [("layer", 30), ("prefill_layer", 1),
                                                                             ("step", 1)], how


@pytest.mark.slow  # a whole round compiled for a TPU slice, twice: over a minute
def test_plan_compiles_generation_for_its_own_mesh(tmp_path):
    """A paper config (its eval tasks unavailable: a fresh machine) on v5e-8, training FSDP over 8 chips,
    generation and scoring tensor-parallel (2, 1, 4): every program compiles and fits without benchmark data,
    the table says which mesh each phase uses and what each program's collectives move, and the decode
    bounds compare the two layouts."""
    plan = ["plan", "--config", os.path.join(CONFIGS, "soft_plus.py"),
            "--config.model.name=tiny", "--topology", "v5e-8", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
            "--config.sampling.batch_size=8", "--config.train.batch_size=8", "--config.train.grad_accum=1",
            "--config.exemplars.k=1", "--config.sampling.max_new_tokens=16", "--config.train.max_prompt_len=64",
            "--config.train.max_response_len=32", "--config.model.scan_layers=true"]
    proc = run_cli(*plan, "--mesh-generate", "2,1,4", env=fresh_environment(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generation and scoring on mesh {'data': 2, 'fsdp': 1, 'tensor': 4}" in proc.stdout
    head = next(line for line in proc.stdout.splitlines() if line.startswith("| program"))
    assert "collectives MiB per step | per call" in head
    assert proc.stdout.strip().endswith("[plan] every program fits")
    # the decode bounds: FSDP's step waits on its gathered weights, the tensor-parallel one on HBM, and is faster
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in proc.stdout.splitlines()
            if line.startswith("| training mesh") or line.startswith("| generation mesh")}
    train, gen = rows["training mesh (1, 8, 1)"], rows["generation mesh (2, 1, 4)"]
    assert train[6] == "interconnect" and gen[6] == "HBM"
    assert float(gen[7].replace(",", "")) > 5 * float(train[7].replace(",", ""))
    # FSDP gathers every weight of each scanned layer at every step; the tensor-parallel mesh none
    said = next(line for line in proc.stdout.splitlines() if "per decode step, read from the HLO" in line)
    counts = {kind: int(n) for kind, n in re.findall(r"(\w+) mesh \([\d, ]+\): (\d+)", said)}
    assert counts["generation"] == 0 and counts["training"] >= 7 * 2, said
    assert "generation meshes that fit, best decode bound first" in proc.stdout
    # the paper's eval tasks have no data on a fresh machine: plan names them rather than downloading them
    last = next(line for line in proc.stdout.splitlines() if line.startswith("| round |"))
    assert "not counted: eval.tasks hhh, truthfulqa_mc1, truthfulqa_mc2 (no data here)" in last, last
    bad = run_cli(*plan, "--mesh-generate", "3,1,4")
    assert bad.returncode == 2 and "does not divide the 8 devices" in bad.stderr.strip().splitlines()[-1]


def test_decode_bound_is_what_a_step_must_read_compute_and_receive():
    """On one device: the step reads every weight and the whole KV cache, computes 2 FLOPs per weight and row
    plus attention over every cache slot, receives what the program's collectives move per step plus its
    per-call collectives spread over the steps; the bound is the slowest of the three at the chip's rates."""
    import math

    import jax
    import numpy as np
    from helpers import CFG, SHAPES

    from soft_jax.parallel import sharding as shd
    from soft_jax.parallel import topology
    from soft_jax.scale import plan

    chip = topology.Chip("test chip", peak_bf16_flops=1e12, hbm_bandwidth=1e9, interconnect_bandwidth=1e6, source="-")
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    weights = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(plan.abstract_model(CFG)[1]))
    slots = SHAPES.own_len + SHAPES.new_tokens + SHAPES.extra_slots
    # per row and slot: k and v of every layer (float32), a position and a segment id (int32); the step counter
    per_slot = 2 * CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * 4 + 2 * 4
    cache = per_slot * (SHAPES.sample_rows * slots + SHAPES.prefix_groups * SHAPES.prefix_len) + 4
    flops = SHAPES.sample_rows * (2 * CFG.num_params + 4 * CFG.num_layers * CFG.num_heads * CFG.head_dim
                                  * (slots + SHAPES.prefix_len))
    b = plan.decode_bound(CFG, SHAPES, mesh, chip)
    assert (b.weights_read, b.cache_read, b.flops, b.collectives) == (weights, cache, flops, 0)
    assert b.limited_by == "HBM" and b.step_s == (weights + b.cache_read) / 1e9
    assert b.tokens_per_s_per_chip == SHAPES.sample_rows / b.step_s and b.reshard_s is None
    moved = hlo.Traffic((hlo.Collective("all-gather", "", 10**6, True, "body", "a"),
                         hlo.Collective("all-gather", "", 16 * 10**6, False, "main", "b")))
    b = plan.decode_bound(CFG, SHAPES, mesh, chip, moved)
    assert b.collectives == 10**6 + 16 * 10**6 / SHAPES.new_tokens and b.limited_by == "interconnect"
    np.testing.assert_allclose(b.step_s, b.collectives / 1e6)


def test_decode_bound_reads_the_mean_window_and_int8_codes():
    """With decode segments of 8 slots the 16 steps after a 32-slot prompt read windows of 40 (8 steps) and 48
    slots (8 steps): 44 of the cache's 48 own slots on average, and the shared prefix whole. With an int8 cache
    a slot's key or value is a byte per channel and a float32 scale per head; the prefix stays float32. What the
    chip holds is the whole cache."""
    import dataclasses
    import math

    import jax
    from helpers import CFG, SHAPES

    from soft_jax.parallel import sharding as shd
    from soft_jax.parallel import topology
    from soft_jax.scale import plan

    chip = topology.Chip("test chip", peak_bf16_flops=1e12, hbm_bandwidth=1e9, interconnect_bandwidth=1e6, source="-")
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    kv = 2 * CFG.num_layers * CFG.num_kv_heads
    prefix = (kv * CFG.head_dim * 4 + 2 * 4) * SHAPES.prefix_groups * SHAPES.prefix_len
    for kv_dtype, per_slot in (("model", kv * CFG.head_dim * 4 + 2 * 4), ("int8", kv * (CFG.head_dim + 4) + 2 * 4)):
        shapes = dataclasses.replace(SHAPES, decode_segment=8, kv_dtype=kv_dtype)
        b = plan.decode_bound(CFG, shapes, mesh, chip)
        own = per_slot * SHAPES.sample_rows * 48 + 4
        assert b.cache_held == prefix + own
        assert b.cache_read == prefix + math.floor(own * 44 / 48), kv_dtype
    assert plan.engine.mean_window(32, 16, 48, 8) == 44 and plan.engine.mean_window(32, 16, 48, 0) == 48


def test_a_generation_copy_in_the_compute_dtype_computes_the_same():
    """float32 master weights, bfloat16 compute: the generation mesh's copy is stored in bfloat16 (half the
    memory and the bytes read per step) and gives the same tokens and the same scores, bit for bit, because the
    model casts every parameter to the compute dtype where it uses it."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from helpers import CFG

    from soft_jax.inference import sampler, scorer
    from soft_jax.models.llama import Llama
    from soft_jax.parallel import sharding as shd
    from soft_jax.rounds.loop import generation_dtype

    cfg = dataclasses.replace(CFG, dtype="bfloat16", param_dtype="float32", tie_word_embeddings=False)
    model = Llama(cfg, rngs=nnx.Rngs(1))
    model_cfg = type("M", (), {"dtype": "bfloat16", "param_dtype": "float32"})
    assert generation_dtype(model_cfg) == "bfloat16"
    copy = shd.reshard(model, shd.make_mesh((1, 1, 1), jax.devices()[:1]), dtype=generation_dtype(model_cfg))
    leaves = jax.tree.leaves(nnx.state(copy))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(nnx.state(model)), leaves):
        assert np.array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    rows = [[1, 5, 9, 13, 17], [1, 5, 9, 22], [1, 7, 3, 2, 8, 4], [1, 5, 6]]
    conf = sampler.SamplingConfig(max_new_tokens=10, batch_size=4, temperature=0.9, top_p=0.95)
    outs = [sampler.generate_tokens(m, rows, conf, (2,), rng=jax.random.key(5)) for m in (model, copy)]
    assert outs[0] == outs[1]
    scores = [scorer.score_tokens(m, rows, [[3, 4], [5], [6, 7, 8], [9]], batch_size=4) for m in (model, copy)]
    for a, b in zip(*scores):
        assert np.array_equal(a, b)


AUTO = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
from helpers import config
from soft_jax.rounds import loop
from soft_jax.parallel import topology

if sys.argv[3] == "tpu-like":  # the CPU devices given a chip's published limits, as a TPU's are
    topology.chip = lambda kind: topology.Chip("a chip", 1e12, 1e9, 1e8, "-")
c = config("tiny.py", "mesh.data=1", "mesh.fsdp=8", "sampling.batch_size=8", "train.batch_size=8")
logs = []
run = loop.Run(c, sys.argv[2], log=logs.append)
print(json.dumps({"train": dict(run.mesh.shape), "generate": dict(run.gen_mesh.shape),
                  "said": [line for line in logs if line.startswith("[mesh]")]}))
"""


def test_the_default_generation_mesh_is_plans_first_on_chips_with_published_limits(tmp_path):
    """mesh_generate all 0: where the chip's limits are known, the tensor-parallel mesh that plan ranks first
    (the tiny model's 2 KV heads allow tensor 2: (4, 1, 2), half the weights read per chip), said once; on
    a CPU, the training mesh."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = {}
    for kind in ("tpu-like", "cpu"):
        proc = subprocess.run([sys.executable, "-c", AUTO, TESTS, str(tmp_path / kind), kind],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tpu-like"]["generate"] == {"data": 4, "fsdp": 1, "tensor": 2}
    assert len(out["tpu-like"]["said"]) == 1 and "plan's decode bound ranks first" in out["tpu-like"]["said"][0]
    assert out["cpu"]["generate"] == out["cpu"]["train"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert out["cpu"]["said"] == []


def test_a_partial_generation_mesh_is_refused_in_one_line():
    import pytest
    from helpers import config

    from soft_jax.core.errors import UserError

    for sizes in (("mesh_generate.tensor=4",), ("mesh_generate.data=-1", "mesh_generate.fsdp=-1",
                                                "mesh_generate.tensor=2")):
        with pytest.raises(UserError) as e:
            config("tiny.py", *sizes)
        assert str(e.value).startswith("config: mesh_generate = {") and "all 0 for the training mesh" in str(e.value)
    assert config("tiny.py", "mesh_generate.data=-1", "mesh_generate.fsdp=1", "mesh_generate.tensor=2")


def test_a_generation_mesh_that_does_not_fit_as_compiled_falls_back_to_the_next():
    """plan ranks generation meshes on their weights and KV cache; the compiled programs also hold temporaries.
    When the first candidate's compiled programs exceed the device, the next is compiled and used, and said;
    when none fits, generation stays on the training mesh."""
    import dataclasses

    from helpers import CFG, SHAPES

    from soft_jax.parallel import sharding as shd
    from soft_jax.parallel import topology
    from soft_jax.scale import plan

    devices = topology.devices("v5e-8")
    train = shd.make_mesh((1, 8, 1), devices)
    shapes = dataclasses.replace(SHAPES, scan_layers=True)
    need = {}
    for shape in ((2, 1, 4), (4, 1, 2)):
        programs = plan.compile_run(CFG, shapes, train, only=plan.GENERATION_PROGRAMS,
                                    gen_mesh=shd.make_mesh(shape, devices))
        need[shape] = max(p.total for p in programs)
    big, small = sorted(need, key=need.get, reverse=True)
    assert need[big] > need[small]
    logs = []
    gen_mesh, programs = plan.fit_generation_mesh(CFG, shapes, train, [big, small], need[small], log=logs.append)
    assert tuple(gen_mesh.shape.values()) == small
    assert [p.name for p in programs] == ["train_step", *plan.GENERATION_PROGRAMS]
    assert all(p.total <= need[small] for p in programs[1:])
    assert len(logs) == 1 and logs[0].startswith(f"[mesh] generation mesh {dict(zip(shd.MESH_AXES, big))}: ")
    assert logs[0].endswith("trying the next")
    gen_mesh, programs = plan.fit_generation_mesh(CFG, shapes, train, [big, small], need[small] - 1,
                                                  log=logs.append)
    assert gen_mesh is None and len(logs) == 3 and len(programs) == 5


def test_hlo_flops_count_every_loop_by_its_trip_count():
    """Matmul FLOPs of an optimized HLO: a scan inside a scan counts its body 5 x 3 times; a while loop with a
    bound only known at run time counts once and says so."""
    import jax
    import jax.numpy as jnp

    def nested(x, w):
        def outer(c, wi):
            return jax.lax.scan(lambda h, v: (jnp.tanh(h @ v), None), c, wi)[0], None
        return jax.lax.scan(outer, x, w)[0]

    x, w = jnp.ones((8, 16)), jnp.ones((5, 3, 16, 16))
    assert hlo.flops(jax.jit(nested).lower(x, w).compile().as_text()) == (2 * 8 * 16 * 16 * 15, True)

    def until(x, w, n):
        return jax.lax.while_loop(lambda c: c[1] < n, lambda c: (jnp.tanh(c[0] @ w), c[1] + 1), (x, 0))[0]

    text = jax.jit(until).lower(x, w[0, 0], 4).compile().as_text()
    assert hlo.flops(text) == (2 * 8 * 16 * 16, False)


def test_the_round_table_sums_each_phase_from_the_compiled_programs():
    """Per phase: its calls x the slowest of (HLO matmul FLOPs at the peak, arguments read once, collectives);
    decode from the decode bound; SFT with the MFU its HLO FLOPs allow; the round is the sum."""
    import jax
    import numpy as np
    from helpers import CFG, SHAPES

    from soft_jax.parallel import sharding as shd
    from soft_jax.parallel import topology
    from soft_jax.scale import plan, tables

    chip = topology.Chip("test chip", peak_bf16_flops=1e9, hbm_bandwidth=1e9, interconnect_bandwidth=1e6, source="-")
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    programs = plan.compile_run(CFG, SHAPES, mesh)
    decode = plan.decode_bound(CFG, SHAPES, mesh, chip)
    counts = {"prompts": 20, "epochs": 2, "validation": 9}
    table = tables.round_table(CFG, SHAPES, programs, chip, decode, counts, 1)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    seconds = lambda name: float(rows[name][2].replace(",", ""))
    train = next(p for p in programs if p.name == "train_step")
    work, exact = hlo.flops(train.compiled.as_text())
    tokens = SHAPES.train_rows * SHAPES.grad_accum * SHAPES.row_len
    # a remat step: at least the forward and backward of every matmul weight, at most a second forward more
    matmul = CFG.num_params - CFG.vocab_size * CFG.hidden_size  # tied embeddings: the lookup is no matmul
    assert exact and 6 * matmul * tokens <= work <= 8 * CFG.num_params * tokens * 1.2
    steps = -(-20 * 2 // (SHAPES.train_rows * SHAPES.grad_accum))  # 20 prompts, all kept, 2 epochs
    np.testing.assert_allclose(seconds("SFT"), steps * max(work / 1e9, train.arguments / 1e9), rtol=0.01)
    assert f"MFU <= {6 * CFG.num_params * tokens / (max(work, train.arguments)):.0%} (model FLOPs 6N" in rows["SFT"][4]
    np.testing.assert_allclose(seconds("generation: decode"), 3 * SHAPES.new_tokens * decode.step_s, rtol=0.01)
    assert rows["validation scoring"][1].startswith("2 x ") and rows["difficulty scoring"][1].startswith("3 x ")
    parts = [seconds(n) for n in rows if n != "round"]
    np.testing.assert_allclose(seconds("round"), sum(parts), rtol=0.02)
    assert re.search(r"\| reshard", table) is None  # one mesh: nothing to reshard
    assert "relevance filter" not in rows and "eval tasks" not in rows and "not counted" not in table
    # the relevance filter scores each answer twice; difficulty reuses its perplexities; 70 eval pairs; the rest named
    table = tables.round_table(CFG, SHAPES, programs, chip, decode, {
        **counts, "relevance": 40, "difficulty": 0, "eval": 70, "eval_missing": ["truthfulqa_mc2"],
        "not_counted": ["8 open-ended answers"]}, 1)
    more = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()[2:]}
    per_call = seconds("validation scoring") / 2
    for name, calls in (("relevance filter", 40), ("eval tasks", 70)):
        calls = -(-calls // SHAPES.score_rows)
        assert more[name][1].startswith(f"{calls} x {SHAPES.score_rows} pairs"), more[name]
        np.testing.assert_allclose(float(more[name][2]), calls * per_call, rtol=0.02)
    assert "difficulty scoring" not in more
    lora = tables.round_table(CFG, SHAPES, programs, chip, decode, {**counts, "frozen_base": True}, 1)
    assert f"MFU <= {4 * CFG.num_params * tokens / (max(work, train.arguments)):.0%} (model FLOPs 4N" in lora
    np.testing.assert_allclose(seconds("round") - seconds("difficulty scoring") + 15 * per_call,
                               float(more["round"][2]), rtol=0.02)
    assert "not counted: eval.tasks truthfulqa_mc2 (no data here); 8 open-ended answers |" in table.splitlines()[-1]
