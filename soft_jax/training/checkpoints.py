"""Orbax checkpoints: training-step checkpoints that a killed run resumes from.

Each checkpoint holds a pytree (params, optimizer state) and a small JSON record (step, data position,
a fingerprint of what produced it). Orbax writes to a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from soft_jax.core import faults
from soft_jax.core.errors import UserError


class StepCheckpointer:
    """Saves every `every` steps (and on demand); keeps the newest `keep`."""

    def __init__(self, directory: str, every: int, keep: int = 2):
        self.every = every
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False))

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, tree: Any, meta: dict[str, Any]) -> None:
        faults.point(f"checkpoint:{os.path.basename(str(self.manager.directory))}/{step}")
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """The tree saved at `step`, with the shapes, dtypes and shardings of `like`, and its JSON record."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest(self, like: Any, fingerprint: str, log=print) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, tree, meta) of the newest readable checkpoint, or None; refuses one written by other settings.

        A checkpoint that fails to load (corrupted or partial files) is reported and the previous one is used."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                tree, meta = self.restore(step, like)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: fall back to an older one
                log(f"[checkpoint] {self.manager.directory}/{step} is unreadable ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); removing it and falling back to an "
                    "earlier checkpoint")
                self.discard(step)  # the step is trained again and saved anew
                continue
            if meta.get("fingerprint") != fingerprint:
                raise UserError(f"{self.manager.directory}: checkpoint at step {step} was written with other "
                                "training settings or data; use a new directory, or remove this one to start over")
            return step, tree, meta
        return None

    def discard(self, step: int) -> None:
        """Removes a (damaged) checkpoint; on a multi-host run process 0 removes it once all have read it."""
        from soft_jax.parallel import distributed

        distributed.barrier(f"checkpoint {step} checked")
        if distributed.is_writer():
            shutil.rmtree(os.path.join(str(self.manager.directory), str(step)), ignore_errors=True)
        distributed.barrier(f"checkpoint {step} removed")
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
