"""Multi-host runs: start-up, the writer process, barriers.

Every host runs the same program on the same (deterministic) inputs; arrays are sharded over the global
mesh, so each host computes only its devices' share of every batch (its share of the round's prompts in
generation, of the rows in training). Shared files are written by process 0 only, after every host has
checked the work dir; Orbax checkpoints are written by every process together. A stop (SIGTERM, Ctrl-C)
that reaches one host is agreed by all at the next safe point (preemption.py). A host that dies makes the
others fail at their next collective (or after the heartbeat timeout): the run stops, and the same command
on every host resumes it.

Start-up, from the environment (`soft-jax run` reads it before anything touches a device):
  SOFT_JAX_DISTRIBUTED=auto                 jax.distributed.initialize() with cluster auto-detection (TPU pods)
  SOFT_JAX_COORDINATOR=host:port            explicit: with SOFT_JAX_NUM_PROCESSES and SOFT_JAX_PROCESS_ID
  SOFT_JAX_HEARTBEAT_TIMEOUT=seconds        how soon the others notice a dead host (default 100)
"""

from __future__ import annotations

import os

import jax
import numpy as np

from soft_jax.core import faults
from soft_jax.core.errors import UserError


def initialize() -> None:
    """jax.distributed.initialize() when the environment asks for a multi-process run; else nothing."""
    coordinator = os.environ.get("SOFT_JAX_COORDINATOR")
    mode = os.environ.get("SOFT_JAX_DISTRIBUTED")
    if not coordinator and not mode:
        return
    timeout = int(os.environ.get("SOFT_JAX_HEARTBEAT_TIMEOUT", "100"))
    if coordinator:
        try:
            n, pid = int(os.environ["SOFT_JAX_NUM_PROCESSES"]), int(os.environ["SOFT_JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise UserError("SOFT_JAX_COORDINATOR is set: also set SOFT_JAX_NUM_PROCESSES and SOFT_JAX_PROCESS_ID "
                            "(integers) on every host") from None
        if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" or jax.default_backend() == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(coordinator, n, pid, heartbeat_timeout_seconds=timeout)
    elif mode == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=timeout)
    else:
        raise UserError(f"SOFT_JAX_DISTRIBUTED={mode!r}: use 'auto', or set SOFT_JAX_COORDINATOR instead")
    faults.point("distributed_started")  # tests make one host start late here


def is_writer() -> bool:
    """Whether this process writes the shared files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as one full NumPy array on every host."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
