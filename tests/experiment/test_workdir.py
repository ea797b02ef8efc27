"""The work dir's config check on a rerun: a run started before a config key existed resumes."""

import json
import os

import pytest
from helpers import config

from soft_jax.core.errors import UserError
from soft_jax.experiment import config as config_lib
from soft_jax.experiment import workdir
from soft_jax.rounds import sweep


def saved_without_added_keys(path, c):
    """Writes c's config.json as a run started before ADDED_KEYS existed would have: without them."""
    saved = config_lib.to_dict(c)
    for dotted in config_lib.ADDED_KEYS:
        *parents, leaf = dotted.split(".")
        node = saved
        for part in parents:
            node = node[part]
        del node[leaf]
    os.makedirs(path)
    with open(os.path.join(path, workdir.CONFIG), "w") as f:
        json.dump(saved, f)
    return saved


def test_a_run_saved_before_a_key_was_added_resumes_and_another_change_is_refused(tmp_path):
    c = config("tiny.py")
    assert "train.lora_dropout" in config_lib.ADDED_KEYS and c.train.lora_dropout == 0.0
    saved = saved_without_added_keys(str(tmp_path / "w"), c)
    assert "lora_dropout" not in saved["train"]
    assert workdir.compare_config(str(tmp_path / "w"), c) is None  # nothing changed that matters
    assert sweep._same_run(saved, config_lib.to_dict(c))
    # the new key at another value is a change to the run
    with pytest.raises(UserError, match="train.lora_dropout"):
        workdir.compare_config(str(tmp_path / "w"), c.replace("train", lora_rank=4, lora_dropout=0.1))
    with pytest.raises(UserError, match="changed: seed"):
        workdir.compare_config(str(tmp_path / "w"), c.replace("", seed=c.seed + 1))
