"""Meshes and logical-axis sharding rules (the MaxText way).

Parameters and activations name their axes logically ("embed", "heads", "batch", ...). A rule table
maps each logical name to mesh axes, so one config line moves a run between one device and a pod.

Parameters follow DEFAULT_RULES: "embed" over fsdp (FSDP), heads / kv_heads / mlp / vocab over tensor, a LoRA
adapter's rank over fsdp where "embed" did not take it.
Activations follow ACTIVATION_RULES: batch rows over data x fsdp, heads / mlp / vocab over tensor, and
their embed dimension whole. Jitted programs enter `activation_sharding(mesh)` while they trace and the
model calls `constrain` on every activation. Without those constraints XLA is free to split an FSDP step
by the weights' embed axis and gather the whole batch onto every device: the results stay equal, only the
compiled per-device shapes show it (tests/parallel/test_sharding.py checks them).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from soft_jax.core.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("length", None),
    ("layers", None),  # the leading axis of stacked (scanned) layers: every device holds all of its layers
    # a LoRA adapter's rank: over fsdp where its other axis left fsdp free (b [rank, out]: out is over tensor), so
    # that under pure FSDP the adapters and their Adam moments are split like the weights, not whole on every device
    ("lora_rank", "fsdp"),
)
# Activations: the rows of a batch over data x fsdp; a row's hidden state whole on each device.
ACTIVATION_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("length", None),
    ("layers", None),
)
# Logical axes of the KV cache's arrays (soft_jax.models.llama.KVCache) by rank: stacked keys / values of scanned
# layers [layers, B, S, KV_HEADS, D], one layer's [B, S, KV_HEADS, D], positions / segment ids [B, S], the index.
CACHE_AXES = {5: ("layers", "batch", "length", "kv_heads", None), 4: ("batch", "length", "kv_heads", None),
              2: ("batch", "length"), 0: ()}

_active: contextvars.ContextVar = contextvars.ContextVar("soft_jax_activation_mesh", default=None)


def check_rows(n: int, sizes, what: str) -> None:
    """Refuses a batch of n rows that the mesh's data axes (data x fsdp; `sizes`: a mesh or its axis sizes) do
    not split evenly: every device must get the same number of rows."""
    rows = sizes["data"] * sizes["fsdp"] if isinstance(sizes, dict) else sizes.shape["data"] * sizes.shape["fsdp"]
    if n % rows:
        raise UserError(f"{what} = {n} is not divisible by the mesh's data x fsdp = {rows}; make it a multiple of "
                        f"{rows}")


def make_mesh(shape: Sequence[int] = (1, 1, -1), devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry may be -1 for "the rest of the devices"."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(MESH_AXES) or shape.count(-1) > 1:
        raise UserError(f"mesh shape {tuple(shape)} must give {len(MESH_AXES)} sizes for {MESH_AXES}, "
                        "at most one of them -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        shape[shape.index(-1)] = len(devices) // max(known, 1)
    if math.prod(shape) != len(devices) or min(shape) < 1:
        raise UserError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide the {len(devices)} devices; "
                        "choose sizes whose product is the device count (one may be -1)")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array with these logical axes; a dimension the mesh axes do not divide
    evenly stays replicated, and a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = table.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
        if targets and size % math.prod(mesh.shape[t] for t in targets) == 0:
            used.update(targets)
            spec.append(targets[0] if len(targets) == 1 else targets)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def named_sharding(axes, shape, mesh: Mesh | None, rules=DEFAULT_RULES):
    """NamedSharding on `mesh`, or the first device when there is no mesh."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


@functools.cache
def _copy_to(sharding, dtype):
    return jax.jit(lambda x: x if dtype is None or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype),
                   out_shardings=sharding)


def reshard(model, mesh: Mesh, rules=DEFAULT_RULES, dtype=None):
    """A copy of an NNX model with every parameter on `mesh` under the rules; `model` is left as it is.

    The training and generation meshes hold the same devices in the same order, so each array moves device to
    device in one jitted copy (across processes too: no host round trip). One array at a time: a copy that
    XLA can only make by gathering the array whole then holds one array, not the whole model, at once.
    dtype: store the copy's floating-point arrays in it. The model casts every parameter to its compute dtype
    where it uses it, so a copy in the compute dtype computes exactly what the original does, in less memory
    and with fewer bytes read per step than float32 master weights."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    shardings = tree_shardings(state, mesh, rules)
    key = None if dtype is None else jnp.dtype(dtype)
    # only parameters take the compute dtype: a quantized kernel's float scales stay as they are
    moved = jax.tree.map(lambda s, x: jax.tree.map(lambda a: _copy_to(s, key if isinstance(x, nnx.Param) else None)(a),
                                                   x), shardings, state)
    return nnx.merge(graphdef, moved)


def tree_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """The NamedSharding of every array in a tree of NNX variables (parameters, or Adam moments, which keep
    the parameters' variables and metadata): by each variable's logical `axes`; other leaves (scalars such
    as Adam's step count) replicated. Returns a tree prefix of `tree`, as jit's in/out_shardings take it."""
    from flax import nnx

    def one(x):
        if isinstance(x, nnx.Variable):
            return named_sharding(x.get_metadata().get("axes", ()), x.shape, mesh, rules)
        return NamedSharding(mesh, PartitionSpec())

    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return treedef.unflatten([one(x) for x in leaves])


def abstract(tree, mesh: Mesh | None, rules=DEFAULT_RULES):
    """`tree` with each array replaced by a ShapeDtypeStruct carrying its sharding (for lowering without data)."""
    if mesh is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    shardings = tree_shardings(tree, mesh, rules)
    return jax.tree.map(lambda s, x: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), x),
                        shardings, tree)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules=ACTIVATION_RULES):
    """While a jitted function traces inside this context, `constrain` pins activations to `mesh`.

    Enter it inside the traced function, with `mesh` a static argument of the jit: the context is then part
    of what the compiled program was traced with."""
    token = _active.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _active.reset(token)


def constrain(x, axes: Sequence[str | None]):
    """`x` constrained to the sharding of its logical `axes` under the active activation rules (a no-op
    outside `activation_sharding`, and on one device)."""
    active = _active.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))


def cache_sharding(shape: Sequence[int], mesh: Mesh | None):
    """Sharding of a KV-cache array, by its rank (CACHE_AXES): rows over data x fsdp, KV heads over tensor."""
    return named_sharding(CACHE_AXES[len(shape)], shape, mesh, ACTIVATION_RULES)
