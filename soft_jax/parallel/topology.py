"""Compile-only TPU and GPU devices: prove on a CPU machine that a run compiles and fits on hardware.

`parse("v5e-64")` says what a Cloud TPU slice is (chips, hosts, HBM per chip, the topology libtpu
builds); `devices(spec)` gives the slice's compile-only jax devices, which need libtpu installed but no
TPU. A mesh of them goes where a mesh of real devices would, and

    jax.jit(f, in_shardings=..., out_shardings=...).lower(<ShapeDtypeStructs>).compile().memory_analysis()

says what the program needs per chip. The compiler does not always refuse a program larger than HBM,
so compare with `hbm_bytes`. `gpu_devices` does the same for NVIDIA GPUs through the CUDA plugin and a
GpuTargetConfigProto; `GPUS` ships the H100, A100 and L4.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re

import jax

from soft_jax.core.errors import UserError

GiB = 1024 ** 3
# the target configs ship with the package data, beside the prompt pool
_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "assets")


@dataclasses.dataclass(frozen=True)
class _Generation:
    libtpu_name: str  # the prefix of libtpu's topology name
    device_kind: str  # what the compile-only devices report
    cores_per_chip: int  # v4 and v5p names count TensorCores, two per chip
    dims: int  # 2-D or 3-D torus
    max_chips: int  # one pod
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float  # bytes/s
    ici_bandwidth: float | None  # bytes/s per chip


@dataclasses.dataclass(frozen=True)
class Chip:
    """A chip's published limits, for lower bounds on a program's time (soft_jax.scale.plan)."""

    name: str
    peak_bf16_flops: float  # FLOP/s
    hbm_bandwidth: float  # bytes/s
    interconnect_bandwidth: float | None  # bytes/s per chip (ICI, NVLink); None: not published
    source: str


def chip(device_kind: str) -> Chip | None:
    """The published limits of a device kind (a TPU generation or a GPU in GPUS), or None when unknown (a CPU)."""
    for key, g in _GENERATIONS.items():
        if g.device_kind == device_kind:
            return Chip(f"TPU {key}", g.peak_bf16_flops, g.hbm_bandwidth, g.ici_bandwidth,
                        f"cloud.google.com/tpu/docs/{key}")
    for g in GPUS.values():
        if g.device_kind == device_kind:
            return Chip(g.label, g.peak_bf16_flops, g.hbm_bandwidth, g.nvlink_bandwidth, g.source)
    return None


# Cloud TPU's published per-chip figures (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}, "system architecture"):
# bf16 peak, HBM capacity and bandwidth, and the inter-chip interconnect (ICI) bandwidth per chip, one direction
# (v5e / v5p: "1600 / 4800 Gbps"; v6e: "800 GBps bidirectional"). v4's page gives no per-chip ICI figure: None,
# and bounds that need it say so.
_GENERATIONS = {
    "v4": _Generation("v4", "TPU v4", 2, 3, 4096, 32 * GiB, 275e12, 1200e9, None),
    "v5e": _Generation("v5e", "TPU v5 lite", 1, 2, 256, 16 * GiB, 197e12, 819e9, 1600e9 / 8),
    "v5p": _Generation("v5", "TPU v5", 2, 3, 8960, 95 * GiB, 459e12, 2765e9, 4800e9 / 8),
    "v6e": _Generation("v6e", "TPU v6 lite", 1, 2, 256, 32 * GiB, 918e12, 1638e9, 800e9 / 2),
}
_ALIASES = {"v5litepod": "v5e"}
_NAMES_THAT_WORK = ("v4-N or v5p-N, N TensorCores = 8, 16, 32, 64 or a multiple of 128 (v4-32, v5p-128); "
                    "v5e-N (or v5litepod-N) or v6e-N, N chips = 1, 4, 8, 16, 32, 64, 128 or 256 (v5e-64)")


@dataclasses.dataclass(frozen=True)
class TpuSpec:
    """One Cloud TPU slice: what libtpu needs to build its compile-only devices, and the chip's limits."""

    name: str  # canonical, e.g. "v5e-64"
    generation: str  # "v4", "v5e", "v5p" or "v6e"
    chips: int  # one jax device per chip
    hosts: int
    topology: str  # libtpu's name, e.g. "v5e:8x8" or "v4:2x2x4"
    chip_config_name: str  # "megacore" makes a two-TensorCore chip one device
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]  # torus links per dimension
    device_kind: str
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # per chip


def parse(name: str) -> TpuSpec:
    """The slice a MaxText-style name stands for: "v4-32", "v5e-64", "v5litepod-64", "v5p-8", "v6e-16"."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
    gen_name = m and _ALIASES.get(m.group(1), m.group(1))
    if not m or gen_name not in _GENERATIONS:
        raise UserError(f"unknown TPU slice {name!r}; use {_NAMES_THAT_WORK}")
    gen = _GENERATIONS[gen_name]
    count = int(m.group(2))
    chips, odd = divmod(count, gen.cores_per_chip)
    shape = None if odd or chips > gen.max_chips else (_torus_2d(chips) if gen.dims == 2 else _torus_3d(chips))
    if shape is None:
        raise UserError(f"no {gen_name} slice has {count} {'TensorCores' if gen.cores_per_chip > 1 else 'chips'} "
                        f"({name!r}); use {_NAMES_THAT_WORK}")
    # A host drives 4 chips, or 8 in a single-host v5e-8 or v6e-8.
    bounds = (1, 1, 1) if chips == 1 else (2, 4, 1) if gen.dims == 2 and chips == 8 else (2, 2, 1)
    # Full 4x4x4 cubes and 16-chip rows of a 2-D pod close into rings.
    wrap = tuple(chips >= 64 if gen.dims == 3 else n == 16 for n in shape) + (False,) * (3 - len(shape))
    return TpuSpec(name=f"{gen_name}-{count}", generation=gen_name, chips=chips, hosts=chips // math.prod(bounds),
                   topology=f"{gen.libtpu_name}:{'x'.join(map(str, shape))}",
                   chip_config_name="megacore" if gen.cores_per_chip > 1 else "default",
                   chips_per_host_bounds=bounds, wrap=wrap, device_kind=gen.device_kind, hbm_bytes=gen.hbm_bytes,
                   peak_bf16_flops=gen.peak_bf16_flops)


def _torus_2d(chips: int) -> tuple[int, int] | None:
    """v5e/v6e slices: 1x1, then powers of two from 2x2 to 16x16, the longer side second (2x4, 8x16)."""
    if chips not in (1, 4, 8, 16, 32, 64, 128, 256):
        return None
    short = 2 ** ((chips.bit_length() - 1) // 2)
    return short, chips // short


def _torus_3d(chips: int) -> tuple[int, int, int] | None:
    """v4/v5p slices: 2x2x1 to 2x4x4 within a cube, then whole 4x4x4 cubes, as near a cube as they go."""
    small = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
    if chips in small or chips % 64:
        return small.get(chips)
    cubes = chips // 64
    shapes = [(a, b, cubes // (a * b)) for a in range(1, cubes + 1) for b in range(a, cubes + 1)
              if cubes % (a * b) == 0 and b <= cubes // (a * b)]
    a, b, c = min(shapes, key=lambda abc: (sum(abc), abc[2]))
    return 4 * a, 4 * b, 4 * c


def _no_persistent_cache() -> None:
    """Compile-only devices have no client to load executables from JAX's persistent compilation cache: a
    process that compiles for them turns it off (its in-memory caches stay)."""
    jax.config.update("jax_enable_compilation_cache", False)


def devices(spec: TpuSpec | str) -> list[jax.Device]:
    """The compile-only jax devices of a TPU slice, one per chip, in libtpu's order."""
    return list(_tpu_devices(parse(spec) if isinstance(spec, str) else spec))


@functools.cache
def _tpu_devices(spec: TpuSpec) -> tuple[jax.Device, ...]:
    from jax.experimental import topologies

    if not _installed("libtpu") and not os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
        raise UserError(f"compiling for {spec.name} needs libtpu (no TPU needed): "
                        f'pip install "jax[tpu]=={jax.__version__}"')
    # jax sets TPU_SKIP_MDS_QUERY=1 at import when the machine has no TPU chip. There libtpu's first load
    # would take /tmp/libtpu_lockfile, which keeps every other process on the machine from loading it (a
    # second test worker, a second CLI run); warn that it cannot find the TPU VM's type and hostnames; and
    # write /tmp/tpu_logs. For the length of that load, tell it not to lock and what it would look up.
    no_tpu_here = os.environ.get("TPU_SKIP_MDS_QUERY") == "1"
    _no_persistent_cache()
    with _environ(ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_ACCELERATOR_TYPE="v5litepod-1", TPU_WORKER_HOSTNAMES="localhost",
                  TPU_LOG_DIR="disabled", enabled=no_tpu_here):
        topo = topologies.get_topology_desc(topology_name=spec.topology, platform="tpu",
                                            chip_config_name=spec.chip_config_name,
                                            chips_per_host_bounds=spec.chips_per_host_bounds, num_slices=1,
                                            wrap=spec.wrap)
    return tuple(topo.devices)


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """An NVIDIA GPU for compile-only use: its GpuTargetConfigProto file and its published limits."""

    name: str
    label: str
    device_kind: str  # the target config's device_description_str: what its compile-only devices report
    target_config: str  # path of a text-format stream_executor.GpuTargetConfigProto
    hbm_bytes: int  # the whole memory; jax preallocates a share of it (gpu_memory_share)
    peak_bf16_flops: float  # dense
    devices_per_host: int
    hbm_bandwidth: float  # bytes/s
    nvlink_bandwidth: float | None  # bytes/s per GPU; None: no NVLink
    source: str


def _target(name: str) -> str:
    return os.path.join(_ASSETS, f"{name}.gpu_target.txtpb")


# NVIDIA's datasheets: dense bf16 tensor-core FLOP/s (without sparsity), memory and its bandwidth, NVLink per GPU.
H100_SXM = GpuSpec("h100", "H100 SXM 80GB", "NVIDIA H100 80GB HBM3", _target("h100_sxm_80gb"), 80 * GiB, 989.5e12, 8,
                   3.35e12, 900e9, "NVIDIA H100 datasheet (SXM: 989.5 TFLOP/s dense bf16, 3.35 TB/s, NVLink 900 GB/s)")
A100_SXM = GpuSpec("a100", "A100 SXM 80GB", "NVIDIA A100-SXM4-80GB", _target("a100_sxm_80gb"), 80 * GiB, 312e12, 8,
                   2.039e12, 600e9, "NVIDIA A100 datasheet (SXM 80GB: 312 TFLOP/s dense bf16, 2,039 GB/s, NVLink "
                   "600 GB/s)")
L4 = GpuSpec("l4", "L4 24GB", "NVIDIA L4", _target("l4_24gb"), 24 * 10 ** 9, 121e12, 8, 300e9, None,
             "NVIDIA L4 datasheet (121 TFLOP/s dense bf16, 24 GB GDDR6 at 300 GB/s, PCIe only)")
GPUS = {g.name: g for g in (H100_SXM, A100_SXM, L4)}
JAX_GPU_MEMORY_SHARE = 0.75  # what jax preallocates of a GPU's memory when XLA_PYTHON_CLIENT_MEM_FRACTION is unset


def gpu_memory_share() -> float:
    """The share of a GPU's memory a jax process gets: $XLA_PYTHON_CLIENT_MEM_FRACTION (launch/gpu.sh sets 0.9),
    else jax's default."""
    value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
    try:
        share = float(value) if value else JAX_GPU_MEMORY_SHARE
    except ValueError:
        raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r} is not a number; set it to a share such as 0.9"
                        ) from None
    if not 0 < share <= 1:
        raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value} is not in (0, 1]; set it to a share such as 0.9")
    return share


def gpu_devices(target_config_path: str = H100_SXM.target_config, count: int = 8,
                devices_per_host: int = H100_SXM.devices_per_host) -> list[jax.Device]:
    """`count` compile-only CUDA devices of the GPU a target config describes, `devices_per_host` a host."""
    per_host = min(count, devices_per_host)
    if count < 1 or count % per_host:
        raise UserError(f"{count} GPUs do not fill hosts of {devices_per_host}; give a multiple of {devices_per_host}")
    try:
        with open(target_config_path, encoding="utf-8") as f:
            target_config = f.read()
    except OSError as e:
        raise UserError(f"{target_config_path}: cannot read the GPU target config ({e.strerror})") from None
    return list(_gpu_devices(target_config, f"1x{count // per_host}x{per_host}", target_config_path))


@functools.cache
def _gpu_devices(target_config: str, topology: str, path: str) -> tuple[jax.Device, ...]:
    from jax.experimental import topologies

    _no_persistent_cache()
    version = jax.__version__
    install = f'pip install "jax-cuda12-plugin=={version}" "jax-cuda12-pjrt=={version}"'
    if not _installed("jax_plugins.xla_cuda12"):
        raise UserError(f"compiling for NVIDIA GPUs needs jax's CUDA plugin (no GPU or CUDA needed): {install}")
    # Without this, the plugin refuses to load on a machine without CUDA libraries unless JAX_PLATFORMS
    # leaves CUDA out; it is read once, when jax first loads its plugins.
    with _environ(JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1"):
        try:
            topo = topologies.get_topology_desc(topology_name="gpu", platform="cuda", target_config=target_config,
                                                topology=topology)
        except NotImplementedError:
            raise UserError("jax's CUDA plugin refused to load: jax loaded its plugins, on a machine without CUDA, "
                            "before soft-jax asked for GPU devices; run with JAX_PLATFORMS=cpu") from None
        except jax.errors.JaxRuntimeError as e:
            raise UserError(f"{path}: not a GpuTargetConfigProto this CUDA plugin reads ({e})") from None
    return tuple(topo.devices)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


@contextlib.contextmanager
def _environ(enabled: bool = True, **values: str):
    """Sets environment variables that are not set already, for the length of the block."""
    added = [k for k in values if enabled and k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
