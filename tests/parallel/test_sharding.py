"""Compiled programs split the work: parameters on their logical shardings, activations holding each
device's share of the batch (not the global batch), on TPU slices (compile-only devices from libtpu) and
on an 8-device CPU mesh. Results being equal on a mesh (test_sampling, test_training) does not show this:
XLA may split an FSDP step by the weights' embed axis and gather the whole batch onto every device."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
from helpers import CFG, SHAPES, TESTS
from jax.sharding import PartitionSpec as P

from soft_jax.parallel import sharding as shd
from soft_jax.parallel import topology
from soft_jax.scale import plan

# Sizes chosen so no two of them meet in one dimension by accident: the MLP width (200, 100 per tensor shard)
# is no cache length, row length or hidden size, and the hidden size (96) and its fsdp shards (48, 24, 12) are
# no token count.
# What the rules promise per parameter: (path suffix, PartitionSpec) on a (data, fsdp, tensor) mesh.
EXPECTED_SPECS = {
    "embed_tokens": P("tensor", "fsdp"),
    "q_proj/kernel": P("fsdp", "tensor"),
    "k_proj/kernel": P("fsdp", "tensor"),
    "o_proj/kernel": P("tensor", "fsdp"),
    "gate_proj/kernel": P("fsdp", "tensor"),
    "down_proj/kernel": P("tensor", "fsdp"),
    "input_layernorm/scale": P(None),
}


def check_programs(programs, mesh, shapes=SHAPES) -> dict:
    """name -> (tokens per device in its MLP, the device's share of the batch)."""
    return {p.name: (plan.mlp_tokens(p, CFG, mesh), plan.expected_tokens(p.name, shapes, mesh)) for p in programs}


def _name(path) -> str:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return "/".join(p for p in parts if p != "value")


def train_param_specs(program) -> dict:
    """Parameter path -> the PartitionSpec the compiled train step takes it with (its first argument)."""
    import jax

    params = program.compiled.input_shardings[0][0]
    return {_name(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(params)}


def rule_specs(mesh, scan_layers: bool = False) -> dict:
    """Parameter path -> the PartitionSpec its logical axes map to under soft_jax.parallel.sharding's rules."""
    import jax

    _, state = plan.abstract_model(dataclasses.replace(CFG, scan_layers=scan_layers))
    return {_name(path): s.spec for path, s in jax.tree_util.tree_leaves_with_path(shd.tree_shardings(state, mesh))}


def assert_param_specs(specs: dict, mesh) -> None:
    for suffix, want in EXPECTED_SPECS.items():
        hits = [k for k in specs if k.endswith(suffix)]
        assert hits, suffix
        for k in hits:  # an axis of size 1 is not used; compare on the mesh axes that split
            spec = tuple(specs[k])
            if k.startswith("layers/") and not k.split("/")[1].isdigit():  # stacked layers: every device has them all
                assert spec[:1] in ((), (None,)), (k, spec)
                spec = spec[1:]
            got = tuple(a if a is None or mesh.shape[a] > 1 else None for a in spec + (None,) * 2)[:2]
            want_ = tuple(a if a is None or mesh.shape[a] > 1 else None for a in tuple(want) + (None,) * 2)[:2]
            assert got == want_, (k, specs[k], want)


# v5e:2x2 and v4:2x2x1 (v4-8: 4 chips, one device each) under several meshes; an 8-chip slice with scanned layers;
# one case samples 2 batches as one (sampling.group_batches: 2 shared prefixes, a forced answer's cache slots).
TPU_CASES = [("v5e-4", (1, 4, 1), False, 1), ("v5e-4", (2, 1, 2), False, 1), ("v4-8", (2, 2, 1), False, 2),
             ("v4-8", (1, 2, 2), False, 1), ("v5e-8", (2, 2, 2), True, 1)]


# Two cases in the default run, the other three slow (about 20 s each, cold): the default run keeps within 15
# minutes, and CI's slow step runs them all.
DEFAULT_TPU_CASES = {("v5e-4", (1, 4, 1)), ("v4-8", (2, 2, 1))}


@pytest.mark.parametrize("slice_name, mesh_shape, scan, groups",
                         [pytest.param(*case, marks=() if case[:2] in DEFAULT_TPU_CASES else pytest.mark.slow,
                                       id=f"{case[0]}-{case[1]}{'-scan' if case[2] else ''}"
                                          f"{f'-groups{case[3]}' if case[3] > 1 else ''}")
                          for case in TPU_CASES])
def test_tpu_programs_hold_the_local_batch(slice_name, mesh_shape, scan, groups):
    devices = topology.devices(slice_name)
    assert len(devices) == math.prod(mesh_shape)
    mesh = shd.make_mesh(mesh_shape, devices)
    shapes = dataclasses.replace(SHAPES, scan_layers=scan, prefix_groups=groups,
                                 extra_slots=0 if groups == 1 else 16 + SHAPES.new_tokens)
    programs = plan.compile_run(CFG, shapes, mesh)
    assert [p.name for p in programs] == ["train_step", "prefix_prefill", "prefill", "decode", "score"]
    for name, (tokens, share) in check_programs(programs, mesh, shapes).items():
        assert tokens == share, f"{name}: a device runs {tokens} tokens through its MLP, its share is {share}"
    specs = train_param_specs(programs[0])
    assert_param_specs(specs, mesh)
    # every parameter as the rules place it: none that the rules split is replicated in the compiled step
    assert specs == rule_specs(mesh, scan)
    split = [k for k, v in specs.items() if any(a is not None for a in v)]
    assert len(split) >= 7 * (1 if scan else CFG.num_layers), specs
    one_copy = plan.param_bytes(plan.abstract_model(CFG)[1], mesh)  # this device's share of the parameters
    for p in programs:  # every program takes the parameters; the train step its Adam moments too
        assert p.arguments >= one_copy * (3 if p.name == "train_step" else 1), p


CPU_SCRIPT = r"""
import json, sys
import jax
from soft_jax.scale import plan
from soft_jax.parallel import sharding as shd
sys.path[:0] = sys.argv[2:]  # this file's folder, and tests/ for helpers
import test_sharding as t
mesh = shd.make_mesh(tuple(json.loads(sys.argv[1])))
programs = plan.compile_run(t.CFG, t.SHAPES, mesh)
specs = {k: tuple(v) for k, v in t.train_param_specs(programs[0]).items()}
print(json.dumps({"devices": jax.device_count(), "tokens": t.check_programs(programs, mesh), "specs": specs}))
"""


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
@pytest.mark.e2e  # a CLI process, or several CPU devices in a process of their own
def test_cpu_mesh_programs_hold_the_local_batch(mesh_shape):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CPU_SCRIPT, json.dumps(mesh_shape), os.path.dirname(__file__), TESTS],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["devices"] == 8
    for name, (tokens, share) in out["tokens"].items():
        assert tokens == share, f"{name}: a device runs {tokens} tokens through its MLP, its share is {share}"
    mesh = {"data": mesh_shape[0], "fsdp": mesh_shape[1], "tensor": mesh_shape[2]}

    class _Mesh:  # assert_param_specs reads mesh.shape only
        shape = mesh

    specs = {k: P(*[tuple(a) if isinstance(a, list) else a for a in v]) for k, v in out["specs"].items()}
    assert_param_specs(specs, _Mesh)


def test_tree_shardings_follow_the_variables_axes():
    """Adam's moments keep their parameters' shardings; scalars (Adam's count) are replicated."""
    import jax
    import optax

    mesh = shd.make_mesh((2, 2, 2), topology.devices("v5e-8"))
    _, state = plan.abstract_model(CFG)
    count, mu, nu = jax.eval_shape(optax.scale_by_adam().init, state)
    params = [s.spec for s in jax.tree.leaves(shd.tree_shardings(state, mesh))]
    assert [s.spec for s in jax.tree.leaves(shd.tree_shardings(mu, mesh))] == params
    assert [s.spec for s in jax.tree.leaves(shd.tree_shardings(nu, mesh))] == params
    assert shd.tree_shardings(count, mesh).spec == P()
    assert P("fsdp", "tensor") in params and P("tensor", "fsdp") in params
