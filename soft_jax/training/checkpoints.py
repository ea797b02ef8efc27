"""Orbax checkpoints: training-step checkpoints that a killed run resumes from.

Each checkpoint holds a pytree (params, optimizer state) and a small JSON record (step, data position,
a fingerprint of what produced it). Orbax writes to a temporary directory and renames it when complete (on
gs://, where there is no rename, it writes a commit marker last), so a run killed mid-save leaves the previous
checkpoint as the latest.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from soft_jax.core import faults, storage
from soft_jax.core.errors import UserError

# Orbax's OCDBT data files are written in parallel, one upload each on a bucket: at its defaults (2 GiB on disk,
# 400 MiB on GCS) a round checkpoint of a small model is one or two files written one after the other.
# benchmarks/storage.py measures the difference on both.
DATA_FILE_BYTES = 32 * 2**20


class StepCheckpointer:
    """Saves every `every` steps (and on demand); keeps the newest `keep`.

    Args:
        directory: The checkpoint directory; created when missing.
        every: Save every this many steps; 0 saves only on demand.
        keep: How many of the newest checkpoints to keep.
    """

    def __init__(self, directory: str, every: int, keep: int = 2):
        self.every = every
        self.manager = ocp.CheckpointManager(
            storage.abspath(storage.check(directory, "checkpoint directory")),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False))

    def due(self, step: int) -> bool:
        """Whether `step` (1-based, a step just finished) is one of the every-`every`-steps saves."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, tree: Any, meta: dict[str, Any]) -> None:
        """Saves a checkpoint and waits until it is written; an existing one of the same step is replaced.

        Args:
            step: The step number it is saved under.
            tree: The pytree of arrays to save, e.g. (params, opt_state).
            meta: A JSON-serializable record saved beside it (e.g. step and fingerprint).
        """
        faults.point(f"checkpoint:{os.path.basename(str(self.manager.directory))}/{step}")
        state = ocp.args.PyTreeSave(tree, ocdbt_target_data_file_size=DATA_FILE_BYTES)
        self.manager.save(step, args=ocp.args.Composite(state=state, meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """The newest saved step, or None when there is no checkpoint."""
        return self.manager.latest_step()

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """The tree saved at `step`, with the shapes, dtypes and shardings of `like`, and its JSON record.

        Args:
            step: The saved step to read.
            like: A pytree with the structure of the saved tree; its arrays give shapes, dtypes and shardings.

        Returns:
            A tuple (tree, meta): the restored pytree and the JSON record saved with it.
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        state = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args)
        out = self.manager.restore(step, args=ocp.args.Composite(state=state, meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_latest(self, like: Any, fingerprint: str, log=print) -> tuple[int, Any, dict[str, Any]] | None:
        """(step, tree, meta) of the newest readable checkpoint, or None; refuses one written by other settings.

        A checkpoint that fails to load (corrupted or partial files) is reported and the previous one is used.
        The unreadable checkpoint is removed.

        Args:
            like: A pytree like the saved one (see `restore`).
            fingerprint: The current run's fingerprint; the checkpoint's record must hold the same.
            log: Called with a message for each unreadable checkpoint.

        Returns:
            A tuple (step, tree, meta), or None when no checkpoint could be read.

        Raises:
            UserError: When the newest readable checkpoint has another fingerprint.
        """
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
        """Removes a (damaged) checkpoint; on a multi-host run process 0 removes it once all have read it.

        Args:
            step: The step of the checkpoint to remove.
        """
        from soft_jax.parallel import distributed

        distributed.barrier(f"checkpoint {step} checked")
        if distributed.is_writer():
            storage.remove(storage.join(str(self.manager.directory), str(step)))
        distributed.barrier(f"checkpoint {step} removed")
        self.manager.reload()

    def close(self) -> None:
        """Closes the underlying Orbax checkpoint manager."""
        self.manager.close()
