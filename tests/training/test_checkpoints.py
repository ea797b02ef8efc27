"""Step checkpoints: a corrupted or partial newest checkpoint falls back to the previous good one."""

import os

import numpy as np
import pytest

from soft_jax.core.errors import UserError
from soft_jax.training.checkpoints import StepCheckpointer


def _trees():
    return {s: {"w": np.full((4, 3), float(s), np.float32), "b": np.arange(3, dtype=np.float32) * s} for s in (1, 2)}


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    ckpt = StepCheckpointer(str(tmp_path / "c"), every=1, keep=3)
    trees = _trees()
    for step, tree in trees.items():
        ckpt.save(step, tree, {"step": step, "fingerprint": "f"})
    ckpt.close()
    files = [os.path.join(d, n) for d, _, ns in os.walk(tmp_path / "c" / "2") for n in ns]
    data = [f for f in files if os.path.getsize(f) > 0 and "_METADATA" not in f and "_CHECKPOINT" not in f]
    assert data
    for f in data:
        if damage == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 3)
        else:
            os.remove(f)
    logs = []
    ckpt = StepCheckpointer(str(tmp_path / "c"), every=1, keep=3)
    step, tree, meta = ckpt.restore_latest(trees[1], "f", log=logs.append)
    assert step == 1 and meta["step"] == 1
    np.testing.assert_array_equal(tree["w"], trees[1]["w"])
    assert len(logs) == 1 and "/2 is unreadable" in logs[0] and "falling back" in logs[0]
    with pytest.raises(UserError, match="other training settings"):
        ckpt.restore_latest(trees[1], "another", log=logs.append)
    ckpt.close()
