"""Meshes and logical-axis sharding rules (the MaxText way).

Parameters and activations name their axes logically ("embed", "heads", "batch", ...). A rule table
maps each logical name to mesh axes, so one config line moves a run between one device and a pod.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from soft_jax.errors import UserError

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
)


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


def shard_model(model, mesh: Mesh | None, rules=DEFAULT_RULES):
    """Moves every parameter of an NNX model onto its sharding (in place); returns the model."""
    from flax import nnx

    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(jax.device_put(np.asarray(var[...]), named_sharding(var.get_metadata().get("axes", ()), var.shape,
                                                                  mesh, rules)))
    return model
