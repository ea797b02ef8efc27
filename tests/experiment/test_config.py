"""The run config: files and overrides in ml-collections' syntax, read into one frozen, typed RunConfig."""

import dataclasses
import glob
import json
import os

import pytest
from helpers import CONFIGS

from soft_jax.core.errors import UserError
from soft_jax.experiment import config as config_lib
from soft_jax.experiment.config import RunConfig
from soft_jax.inference.sampler import SamplingConfig
from soft_jax.training import TrainConfig


def test_every_config_file_loads_into_a_frozen_typed_tree():
    for path in sorted(glob.glob(os.path.join(CONFIGS, "*.py"))):
        for variant in config_lib.variants(path) if "ablation" in path else (None,):
            c = config_lib.load(path + (f":{variant}" if variant else ""))
            assert isinstance(c, RunConfig), path
            with pytest.raises(dataclasses.FrozenInstanceError):
                c.train.learning_rate = 1.0
            # what the file set is what the tree holds (the ConfigDict the file returns, key by key)
            spec = config_lib.load_file(path + (f":{variant}" if variant else ""))
            assert c.to_dict() == json.loads(spec.to_json()) | {"exemplars": c.to_dict()["exemplars"]}, path


def test_base_is_the_typed_defaults_and_round_trips_through_config_json():
    c = config_lib.from_tree(config_lib.base())
    assert c == RunConfig()
    assert config_lib.from_saved(json.loads(json.dumps(c.to_dict()))) == c
    # the method's defaults differ from the API's where the method sets them
    assert c.sampling.temperature == 0.7 and SamplingConfig().temperature == 0.0
    assert c.train.checkpoint_every == 20 and TrainConfig().checkpoint_every == 0


def test_overrides_are_typed_by_the_default_they_replace():
    c = config_lib.load(os.path.join(CONFIGS, "soft.py"), [
        "train.learning_rate=1", "train.seq_len=1024", "prompts.per_round=[4,5,6]", "model.scan_layers=true",
        "exemplars.fixed_ids=['a', 'b']"])
    assert c.train.learning_rate == 1.0 and isinstance(c.train.learning_rate, float)
    assert c.train.seq_len == 1024 and c.prompts.per_round == (4, 5, 6) and c.model.scan_layers is True
    assert c.exemplars.fixed_ids == ("a", "b")


def test_the_run_makes_the_settings_of_the_layers_below():
    c = config_lib.load(os.path.join(CONFIGS, "soft.py"), ["seed=7", "train.max_steps=3"])
    t = c.train_config(2)
    assert isinstance(t, TrainConfig) and (t.order, t.seed, t.max_steps) == ("given", 9, 3)
    assert t.max_grad_norm == c.train.max_grad_norm == 0.3
    s = c.sampling_config(stop_strings=("x",))
    assert isinstance(s, SamplingConfig) and s.stop_strings == ("x",) and s.top_p == c.sampling.top_p
    # the fields the run decides are not keys of the run config (a key that did nothing would be a trap)
    assert not {"order", "seed"} & {f.name for f in dataclasses.fields(c.train)}
    assert not {"seed", "stop_strings", "stop_token_ids"} & {f.name for f in dataclasses.fields(c.sampling)}


@pytest.mark.parametrize("override,message", [
    ("train.batch_size=0", "config: train.batch_size = 0: must be >= 1"),
    ("sampling.top_p=2", r"config: sampling.top_p = 2.0: must be in \(0, 1\]"),
    ("train.seq_len=10", "config: train.seq_len = 10: must be at least"),
    ("model.dtype=x", "config: model.dtype = 'x': must be float32"),
    ("rounds=0", "config: rounds must be at least 1"),
    ("train.bogus=1", "unknown config key"),
    ("train.epochs=two", "not a valid value"),
])
def test_a_bad_value_is_one_line_naming_its_key(override, message):
    with pytest.raises(UserError, match=message):
        config_lib.load(os.path.join(CONFIGS, "soft.py"), [override])


def test_a_file_with_a_wrongly_typed_value_is_refused(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("from soft_jax.experiment import config\n\n\ndef get_config(arg=None):\n"
                    "    c = config.base()\n    del c.open_ended['limit']\n    c.open_ended['limit'] = 'many'\n"
                    "    return c\n")
    with pytest.raises(UserError, match="config: open_ended.limit = 'many': expected a int"):
        config_lib.load(str(path))


def test_a_config_json_written_before_a_key_existed_reads_as_before():
    saved = RunConfig().to_dict()
    for dotted in config_lib.ADDED_KEYS:
        *sections, leaf = dotted.split(".")
        node = saved
        for section in sections:
            node = node[section]
        del node[leaf]
    # sections added whole: absent from an older config.json
    assert saved["eval"].pop("lm_eval") == {} and saved.pop("log") == {"wandb": {}}
    assert config_lib.from_saved(saved) == RunConfig()
