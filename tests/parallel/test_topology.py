"""Slice names, compile-only TPU devices from libtpu, and a sharded program compiled for them on this CPU."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from soft_jax.core.errors import UserError
from soft_jax.parallel import topology

GiB = 1024 ** 3


@pytest.mark.parametrize("name, generation, chips, hosts, topo, chip_config, hbm", [
    ("v4-8", "v4", 4, 1, "v4:2x2x1", "megacore", 32 * GiB),
    ("v4-32", "v4", 16, 4, "v4:2x2x4", "megacore", 32 * GiB),
    ("v5e-8", "v5e", 8, 1, "v5e:2x4", "default", 16 * GiB),
    ("v5e-64", "v5e", 64, 16, "v5e:8x8", "default", 16 * GiB),
    ("v5litepod-64", "v5e", 64, 16, "v5e:8x8", "default", 16 * GiB),
    ("v5p-8", "v5p", 4, 1, "v5:2x2x1", "megacore", 95 * GiB),
    ("v5p-128", "v5p", 64, 16, "v5:4x4x4", "megacore", 95 * GiB),
    ("v6e-16", "v6e", 16, 4, "v6e:4x4", "default", 32 * GiB),
    ("V6E-1", "v6e", 1, 1, "v6e:1x1", "default", 32 * GiB),
])
def test_parse(name, generation, chips, hosts, topo, chip_config, hbm):
    spec = topology.parse(name)
    assert (spec.generation, spec.chips, spec.hosts, spec.topology, spec.chip_config_name, spec.hbm_bytes) == (
        generation, chips, hosts, topo, chip_config, hbm)
    assert spec.peak_bf16_flops > 1e14


@pytest.mark.parametrize("name, topo, wrap", [
    ("v5e-128", "v5e:8x16", (False, True, False)),  # a 16-chip row closes into a ring
    ("v6e-256", "v6e:16x16", (True, True, False)),
    ("v4-384", "v4:4x4x12", (True, True, True)),  # whole 4x4x4 cubes, as near a cube as they go
    ("v5p-640", "v5:4x4x20", (True, True, True)),
    ("v5p-3072", "v5:8x12x16", (True, True, True)),
    ("v5p-17920", "v5:16x20x28", (True, True, True)),  # a whole v5p pod
])
def test_parse_shapes(name, topo, wrap):
    spec = topology.parse(name)
    assert (spec.topology, spec.wrap) == (topo, wrap)


@pytest.mark.parametrize("name", ["v4-12", "v5e-2", "v5e-512", "v5p-192", "v4-16384", "v3-8", "tpu", "v5e64", ""])
def test_parse_refuses_other_names_in_one_line(name):
    with pytest.raises(UserError) as e:
        topology.parse(name)
    assert "\n" not in str(e.value) and "v5e-64" in str(e.value)


def test_without_libtpu_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(topology, "_installed", lambda module: False)
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(UserError, match=rf'pip install "jax\[tpu\]=={jax.__version__}"'):
        topology._tpu_devices.__wrapped__(topology.parse("v5e-4"))  # past the cache


def test_gpu_devices_errors(monkeypatch, tmp_path):
    assert all(os.path.isfile(g.target_config) for g in topology.GPUS.values())
    with pytest.raises(UserError, match="multiple of 8"):
        topology.gpu_devices(count=12)
    with pytest.raises(UserError, match="cannot read"):
        topology.gpu_devices(str(tmp_path / "missing.txtpb"))
    monkeypatch.setattr(topology, "_installed", lambda module: False)
    with pytest.raises(UserError, match=f"jax-cuda12-pjrt=={jax.__version__}"):
        topology._gpu_devices.__wrapped__("", "1x1x8", "h100")


def _compile_matmul(devices):
    """tanh(x @ w) with x split by rows over `data`, w by columns over `model`: the compiled executable."""
    mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "model"))
    xs, ws, out = (NamedSharding(mesh, spec) for spec in (P("data", None), P(None, "model"), P("data", "model")))
    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=xs)
    w = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16, sharding=ws)
    return jax.jit(lambda x, w: jnp.tanh(x @ w), in_shardings=(xs, ws), out_shardings=out).lower(x, w).compile()


@pytest.mark.parametrize("name, kind", [("v5e-4", "TPU v5 lite"), ("v4-8", "TPU v4"), ("v5p-8", "TPU v5"),
                                        ("v6e-8", "TPU v6 lite"), ("v5e-64", "TPU v5 lite")])
def test_devices(name, kind):
    pytest.importorskip("libtpu")
    spec = topology.parse(name)
    devices = topology.devices(name)
    assert len(devices) == spec.chips and {d.device_kind for d in devices} == {kind}
    assert {d.platform for d in devices} == {"tpu"} and len({d.process_index for d in devices}) == spec.hosts
    assert topology.devices(spec) == devices


@pytest.mark.parametrize("name", ["v5e-4", "v4-8"])
def test_sharded_matmul_compiles_and_reports_memory_per_chip(name):
    pytest.importorskip("libtpu")
    compiled = _compile_matmul(topology.devices(name))
    memory = compiled.memory_analysis()
    # Per chip: a 128x512 block of x and a 512x512 block of w in, a 128x512 block of the output out.
    assert memory.argument_size_in_bytes == (128 * 512 + 512 * 512) * 2
    assert memory.output_size_in_bytes == 128 * 512 * 2
    assert 0 < memory.peak_memory_in_bytes < topology.parse(name).hbm_bytes
    assert compiled.output_shardings.shard_shape((256, 1024)) == (128, 512)


def test_libtpu_loads_quietly_and_leaves_jax_on_cpu():
    """libtpu's first load warns about the TPU VM it cannot find unless soft_jax.parallel.topology answers for it."""
    pytest.importorskip("libtpu")
    code = ("import jax; from soft_jax.parallel import topology; assert len(topology.devices('v5e-4')) == 4; "
            "print(jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # jax's default: try every platform
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "TPU_ACCELERATOR_TYPE" not in proc.stderr and "TPU_WORKER_HOSTNAMES" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() != "tpu"


def test_a_gpu_process_gets_the_share_jax_preallocates(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert topology.gpu_memory_share() == 0.75  # jax's default
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # launch/gpu.sh's
    assert topology.gpu_memory_share() == 0.9
    for bad in ("most", "1.5", "0"):
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", bad)
        with pytest.raises(UserError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
            topology.gpu_memory_share()


@pytest.mark.parametrize("name", sorted(topology.GPUS))
def test_gpu_devices_compile_for_each_shipped_gpu(name):
    pytest.importorskip("jax_plugins.xla_cuda12")
    spec = topology.GPUS[name]
    devices = topology.gpu_devices(spec.target_config, count=16)
    assert len(devices) == 16 and {d.device_kind for d in devices} == {spec.device_kind}
    assert len({d.process_index for d in devices}) == 2
    assert topology.chip(spec.device_kind).peak_bf16_flops == spec.peak_bf16_flops  # plan's bounds find it
    memory = _compile_matmul(devices[:4]).memory_analysis()
    assert memory.argument_size_in_bytes == (128 * 512 + 512 * 512) * 2
