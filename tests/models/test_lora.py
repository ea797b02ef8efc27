"""LoRA adapters (soft_jax.models.lora): a new adapter changes nothing, merged equals unmerged, training moves the
adapters only, and `peft` + transformers load the exported adapter with our logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import PAIRS, assert_same_logits, random_b, torch_logits

from soft_jax import models, training
from soft_jax.core.errors import UserError
from soft_jax.models import lora, quant, weights
from soft_jax.training import TrainConfig

LAYOUTS = pytest.mark.parametrize("scan_layers", [False, True], ids=["loop", "scanned"])


def adapters(model) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
            jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.LoRAParam))}


@LAYOUTS
def test_a_new_adapter_leaves_the_logits_unchanged_and_merged_equals_unmerged(tiny_chat, scan_layers):
    base, _ = models.load(tiny_chat, progress=False, scan_layers=scan_layers)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, base.config.vocab_size, size=(2, 24)))
    tuned = lora.add_adapters(base, rank=4, alpha=8, seed=0)
    assert not lora.has_adapters(base)  # the base model is left as it is
    n_layers = base.config.num_layers
    got = adapters(tuned)
    assert len(got) == 2 * 7 * (1 if scan_layers else n_layers)
    if scan_layers:
        assert all(v.shape[0] == n_layers for v in got.values())
    np.testing.assert_array_equal(np.asarray(tuned(ids)), np.asarray(base(ids)))  # B = 0: exactly the base
    random_b(tuned)
    unmerged = np.asarray(tuned(ids))
    assert np.abs(unmerged - np.asarray(base(ids))).max() > 1e-3
    np.testing.assert_allclose(np.asarray(lora.merged(tuned)(ids)), unmerged, rtol=0, atol=1e-5)
    assert lora.has_adapters(tuned)  # merging made a copy


def test_adding_adapters_compiles_per_shape_not_per_layer(monkeypatch):
    """Adapters for more layers of the same shapes compile no more programs: SmolLM2's 30 layers once compiled 420
    initializers, about a minute before the first step on this CPU."""
    from jax._src import dispatch, monitoring

    from soft_jax.models.config import ModelConfig
    from soft_jax.models.llama import Llama

    compiles = []
    listener = lambda event, secs, **kw: compiles.append(event) if event == dispatch.BACKEND_COMPILE_EVENT else None
    monitoring.register_event_duration_secs_listener(listener)
    try:
        counts = []
        for layers in (1, 2, 6):  # the first warms what does not depend on shapes (the keys' fold_in)
            width = 8 * layers + 32  # new shapes for every model: nothing cached from the last one
            cfg = ModelConfig(vocab_size=64, hidden_size=width, intermediate_size=width + 16, num_layers=layers,
                              num_heads=2, num_kv_heads=1, head_dim=width // 2)
            model = Llama(cfg, rngs=nnx.Rngs(0))
            compiles.clear()
            lora.add_adapters(model, rank=4, alpha=8)
            counts.append(len(compiles))
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert 0 < counts[1] == counts[2], counts


@LAYOUTS
def test_training_moves_the_adapters_only(tiny_chat, scan_layers):
    """After training every base array is unchanged, array by array; every adapter moved (B from zero); the
    optimizer holds moments for the adapters alone."""
    base, tok = models.load(tiny_chat, progress=False, scan_layers=scan_layers)
    before = weights.hf_tensors(base)
    config = TrainConfig(max_prompt_len=64, max_response_len=64, batch_size=2, epochs=2, learning_rate=1e-2,
                         warmup_steps=0, order="given", pack=False, lora_rank=4, lora_alpha=8)
    tuned, result = training.train(base, tok, PAIRS, config, progress=False)
    assert result.steps == 4 and lora.has_adapters(tuned) and not lora.has_adapters(base)
    after = weights.hf_tensors(tuned)  # the base weights only (adapters are not HF tensors)
    assert sorted(after) == sorted(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    fresh = adapters(lora.add_adapters(base, 4, 8, seed=config.seed))
    moved = adapters(tuned)
    assert sorted(moved) == sorted(fresh)
    for name in moved:
        assert np.abs(moved[name] - fresh[name]).max() > 1e-4, name
    trainer = training.Trainer(tuned, config, 4)
    moments = [x for x in jax.tree.leaves(trainer.opt_state) if x.ndim]
    assert sum(x.size for x in moments) == 2 * sum(v.size for v in moved.values())


def test_peft_loads_the_exported_adapter_with_our_logits(tiny_hf, tmp_path):
    """Exported in the HF PEFT format, the adapter loads with `peft` onto the transformers base model and gives
    our logits; the merged export loads in transformers alone with the same logits."""
    import peft
    import transformers

    kind, path, hf = tiny_hf
    base, _ = models.load(path, progress=False)
    tuned = random_b(lora.add_adapters(base, rank=4, alpha=8, seed=0))
    ids = np.random.default_rng(3).integers(3, hf.config.vocab_size, size=(2, 30))
    ours = np.asarray(tuned(jnp.asarray(ids)))
    out = lora.export_peft(tuned, str(tmp_path / "adapter"), base_model=path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    with_adapter = peft.PeftModel.from_pretrained(reference, out).eval()
    assert_same_logits(ours, torch_logits(with_adapter, ids))
    loaded, tokenizer = models.load(out, progress=False)  # the adapter directory: the base it names + adapters
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(ids))), ours)
    models.export_hf(tuned, None, str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"),
                                                               attn_implementation="eager").float().eval()
    assert_same_logits(ours, torch_logits(merged, ids))


def _dir_bytes(path) -> int:
    import os

    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# slow: processes that each compile the LoRA / QLoRA programs cold; the default run keeps within 15 minutes
@pytest.mark.slow
def test_train_cli_writes_a_peft_adapter_and_resumes_its_steps(tiny_chat, tmp_path, capsys):
    """`soft-jax train --lora-rank 4 --adapter`: a PEFT adapter directory; stopped by SIGTERM after step 1 and
    rerun, it writes the same adapter tensors as the run that was not stopped. Its step checkpoint holds the
    adapters and their moments only. `--model ADAPTER_DIR` loads the adapter onto the base it names."""
    import os

    from helpers import pairs_file, run_cli

    from soft_jax.cli import main
    from soft_jax.models import safetensors_io

    argv = ["train", "--model", tiny_chat, "--data", pairs_file(tmp_path), "--batch-size", "2", "--epochs", "2",
            "--lr", "1e-2", "--warmup-steps", "1", "--lora-rank", "4", "--lora-alpha", "8", "--adapter"]
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0  # in this process; the stopped run in another
    assert sorted(os.listdir(tmp_path / "whole")) == ["adapter_config.json", "adapter_model.safetensors"]
    resumable = argv + ["--out", str(tmp_path / "resumed"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    proc = run_cli(*resumable, env={"SOFT_JAX_TERM_AT": "train_step_1"})
    assert proc.returncode == 143, proc.stderr[-2000:]
    base = models.load(tiny_chat, progress=False)[0]
    full = sum(x.nbytes for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
    assert _dir_bytes(tmp_path / "ckpt") < 0.05 * 3 * full  # a full step checkpoint: weights and two moments
    proc = run_cli(*resumable)
    assert proc.returncode == 0, proc.stderr[-2000:]
    whole, resumed = (safetensors_io.read(str(tmp_path / d / "adapter_model.safetensors")) for d in ("whole",
                                                                                                        "resumed"))
    assert sorted(whole) == sorted(resumed) and len(whole) == 2 * 7 * base.config.num_layers
    for name in whole:
        np.testing.assert_allclose(np.asarray(resumed[name]), np.asarray(whole[name]), rtol=1e-6, atol=1e-7,
                                   err_msg=name)
    # --model takes the adapter directory on top of the base it names: exported merged, the same logits
    tuned = lora.load_peft(base, str(tmp_path / "whole"))
    np.testing.assert_array_equal(np.asarray(lora.peft_tensors(tuned)[name]), np.asarray(whole[name]))
    assert main(["export", "--model", str(tmp_path / "whole"), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = models.load(str(tmp_path / "merged"), progress=False)
    ids = jnp.asarray(np.random.default_rng(5).integers(3, base.config.vocab_size, size=(2, 16)))
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(tuned(ids)), rtol=0, atol=1e-5)
    assert main(["train", "--model", tiny_chat, "--data", pairs_file(tmp_path), "--out", str(tmp_path / "x"),
                 "--lora-rank", "4", "--lora-targets", "q_proj,attention"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("soft-jax: error: LoRA targets attention: ") and not (tmp_path / "x").exists()


# slow: processes that each compile the LoRA / QLoRA programs cold; the default run keeps within 15 minutes
@pytest.mark.slow
def test_a_qlora_run_keeps_adapters_per_round_and_resumes_after_sigkill_to_the_same_artifacts(tmp_path):
    """configs/dromedary2.py (QLoRA: an NF4 base, LoRA on top) on the tiny model, two rounds: each round
    checkpoint holds the round's adapters only (under 5% of the model); a run killed by SIGKILL while round 2
    generates (from round 1's adapters, restored onto the base on resume) ends with the artifacts of a run that
    was not killed, byte for byte; round 2's adapters export as a PEFT adapter with the checkpoint's arrays.
    (A LoRA step checkpoint's resume: test_train_cli_writes_a_peft_adapter_and_resumes_its_steps.)"""
    import json
    import os

    from helpers import Workdir, run, run_workdir

    from soft_jax.models import safetensors_io
    from soft_jax.rounds import loop

    extra = ["train.lora_rank=4", "train.lora_alpha=8", "train.learning_rate=1e-2"]
    whole = run("dromedary2.py", tmp_path / "whole", *extra)

    killed = tmp_path / "killed"
    proc = run_workdir(killed, extra, {"SOFT_JAX_KILL_AT": "generate_r2_b0"}, config_file="dromedary2.py")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert json.load(open(killed / "state.json"))["finished"] == [1]
    proc = run_workdir(killed, extra, config_file="dromedary2.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = whole.files(), Workdir(str(killed)).files()
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert a[k] == b[k], k
    whole = whole.path
    from soft_jax.experiment import config as config_lib
    from soft_jax.training.checkpoints import StepCheckpointer

    config = json.load(open(os.path.join(whole, "config.json")))
    from soft_jax.models import presets

    base, _ = presets.load_preset("tiny", seed=config["seed"], progress=False, quant="nf4")
    assert nnx.state(base, quant.Quantized)
    full = sum(x.nbytes for x in jax.tree.leaves(nnx.state(base, nnx.Param)))
    rounds = os.path.join(whole, "checkpoints", "rounds")
    ckpt = StepCheckpointer(rounds, every=0, keep=None)
    model = loop.restore_round_model(ckpt, 2, base, config_lib.from_saved(config).train)
    ckpt.close()
    assert lora.has_adapters(model) and sorted(os.listdir(rounds)) == ["1", "2"]
    for t in os.listdir(rounds):
        assert _dir_bytes(os.path.join(rounds, t)) < 0.05 * full, t
    out = lora.export_peft(model, str(tmp_path / "adapter"))
    exported = safetensors_io.read(os.path.join(out, "adapter_model.safetensors"))
    want = lora.peft_tensors(model)
    assert sorted(exported) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(np.asarray(exported[name]), want[name])


def test_plan_compiles_the_lora_train_step_with_moments_for_the_adapters_only():
    """On a compile-only v5e-8 (FSDP over 8 chips), the LoRA train step takes the base weights, the adapters and
    two Adam moments of the adapters, where full fine-tuning takes the weights and two moments of them all: at
    least 2 x weights - 3 x adapters (per chip) less. (Not exactly that: the TPU compiler pads each small array
    to its (8, 128) tiles.) Decode compiles with the adapters too."""
    import dataclasses

    from helpers import CFG, SHAPES

    from soft_jax.parallel import sharding as shd
    from soft_jax.parallel import topology
    from soft_jax.scale import plan

    mesh = shd.make_mesh((1, 8, 1), topology.devices("v5e-8"))
    shapes = dataclasses.replace(SHAPES, scan_layers=True)
    full = plan.compile_run(CFG, shapes, mesh, TrainConfig(), only=["train_step"])
    lora_config = TrainConfig(lora_rank=2, lora_alpha=4)
    tuned = plan.compile_run(CFG, shapes, mesh, lora_config, only=["train_step", "decode"])
    assert [p.name for p in tuned] == ["train_step", "decode"] and "LoRA rank 2" in tuned[0].shapes
    module = plan.abstract_module(dataclasses.replace(CFG, scan_layers=True), lora_config)
    base_bytes = plan.param_bytes(nnx.state(module, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))), mesh)
    adapter_bytes = plan.param_bytes(nnx.state(module, nnx.LoRAParam), mesh)
    assert 0 < adapter_bytes < base_bytes
    assert full[0].arguments - tuned[0].arguments >= 2 * base_bytes - 3 * adapter_bytes
    assert tuned[0].arguments >= base_bytes + 3 * adapter_bytes
    assert tuned[0].resident == 0  # the base model is the frozen argument; nothing else is kept beside it


# slow: two more train steps compiled for a TPU slice; the default run keeps within 15 minutes
@pytest.mark.slow
def test_plan_compiles_the_lora_dropout_step_with_a_key_per_row():
    """LoRA dropout compiles on a compile-only v5e-8 too: the step takes a key per row besides the LoRA step's
    arguments, and plan's row names the rate."""
    import dataclasses

    from helpers import CFG, SHAPES

    from soft_jax.parallel import sharding as shd
    from soft_jax.parallel import topology
    from soft_jax.scale import plan

    mesh = shd.make_mesh((1, 8, 1), topology.devices("v5e-8"))
    shapes = dataclasses.replace(SHAPES, scan_layers=True)
    lora_config = TrainConfig(lora_rank=2, lora_alpha=4)
    tuned, dropped = (plan.compile_run(CFG, shapes, mesh, c, only=["train_step"])[0]
                      for c in (lora_config, dataclasses.replace(lora_config, lora_dropout=0.1)))
    assert "dropout 0.1" in dropped.shapes and "dropout" not in tuned.shapes
    assert 0 < dropped.arguments - tuned.arguments <= 64 * 1024  # bytes: the keys, padded to tiles


def test_under_fsdp_every_adapter_array_is_split_over_the_chips():
    """Pure FSDP (1, 8, 1): a and b of every adapter hold 1/8 of their elements per chip, as the weights do; b's
    output axis maps to tensor (size 1 here), so its rank axis takes fsdp."""
    import dataclasses

    from helpers import CFG

    from soft_jax.parallel import sharding as shd
    from soft_jax.parallel import topology
    from soft_jax.scale import plan

    mesh = shd.make_mesh((1, 8, 1), topology.devices("v5e-8"))
    module = plan.abstract_module(dataclasses.replace(CFG, scan_layers=True), TrainConfig(lora_rank=8, lora_alpha=16))
    state = nnx.state(module, nnx.LoRAParam)
    arrays = jax.tree.leaves(state)
    assert len(arrays) == 2 * 7  # a and b of seven projections, stacked over the layers
    for array, sharding in zip(arrays, jax.tree.leaves(shd.tree_shardings(state, mesh))):
        assert np.prod(sharding.shard_shape(array.shape)) * 8 == np.prod(array.shape), (array.shape, sharding.spec)


def test_under_fsdp_the_quantized_base_is_gathered_as_codes_not_as_float_kernels():
    """QLoRA's train step on a compile-only v5e-8 under pure FSDP: every all-gather of a quantized projection moves
    its uint8 codes (half a byte a weight), none moves the dequantized float kernel (2-4 bytes a weight)."""
    import dataclasses

    from helpers import SHAPES

    from soft_jax.models.config import ModelConfig
    from soft_jax.parallel import hlo, topology
    from soft_jax.parallel import sharding as shd
    from soft_jax.scale import plan

    cfg = ModelConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, tie_word_embeddings=True, scan_layers=True, quant="nf4",
                      dtype="bfloat16")
    mesh = shd.make_mesh((1, 8, 1), topology.devices("v5e-8"))
    (step,) = plan.compile_run(cfg, dataclasses.replace(SHAPES, scan_layers=True), mesh,
                               TrainConfig(lora_rank=8, lora_alpha=16), only=["train_step"])
    gathers = [c for c in hlo.traffic(step.compiled.as_text()).collectives if c.kind == "all-gather"]
    kernels = {(128, 128), (128, 64), (128, 256), (256, 128)}  # q / o, k / v, gate / up, down: [in, out]
    codes = {(i // 2, o) for i, o in kernels}
    dims = [(dtype, tuple(d for d in shape if d != 1)) for c in gathers for dtype, shape in hlo.array_dims(c.shape)]
    assert not [(t, d) for t, d in dims if t in ("f32", "bf16") and d in kernels]
    assert {d for t, d in dims if t == "u8"} == codes


def test_dromedary2_config_is_salmons_engraving():
    """configs/dromedary2.py: QLoRA on an NF4 base, rank 64, lr 1e-4 (SALMON's 70B engraving script); the run on
    the tiny model is test_a_qlora_run_keeps_adapters_per_round_and_resumes_after_sigkill_to_the_same_artifacts."""
    import os

    from helpers import CONFIGS, config

    from soft_jax.experiment import config as config_lib

    c = config_lib.load(os.path.join(CONFIGS, "dromedary2.py"))
    assert (c.model.quant, c.train.lora_rank, c.train.lora_alpha, c.train.learning_rate) == ("nf4", 64, 16.0, 1e-4)
    assert (c.train.max_prompt_len, c.train.max_response_len, c.train.batch_size, c.train.epochs) == (512, 512, 128, 1)
    with pytest.raises(Exception, match="needs LoRA adapters"):
        config("dromedary2.py", "train.lora_rank=0")


def test_lora_dropout_zeroes_the_adapters_input_and_scales_the_rest_as_peft():
    """PEFT's lora_dropout is torch's Dropout on the adapter's input: each entry zeroed with probability p, the
    others multiplied by 1 / (1 - p). An identity adapter shows the dropped input itself."""
    from soft_jax.models.llama import Adapter, DropoutKeys

    eye = jnp.eye(16, dtype=jnp.float32)
    adapter = Adapter(nnx.LoRAParam(eye), nnx.LoRAParam(eye), scale=1.0)
    x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, size=(4 * 256, 16)), jnp.float32)  # 4 rows of 256 tokens
    np.testing.assert_array_equal(np.asarray(adapter(x)), np.asarray(x))  # off until set_dropout switches it on
    adapter.dropout, adapter.keys = 0.25, DropoutKeys(jnp.asarray([[0, i] for i in range(4)], jnp.uint32))
    out = np.asarray(adapter(x))
    kept = out != 0
    assert abs(1 - kept.mean() - 0.25) < 0.02, kept.mean()
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(adapter(x)), out)  # the same keys draw the same masks
    rows = kept.reshape(4, 256, 16)
    assert all((rows[0] != rows[i]).mean() > 0.2 for i in (1, 2, 3))  # each row its own mask


@LAYOUTS
def test_lora_dropout_leaves_the_base_path_whole_and_is_the_same_stacked_or_not(tiny_chat, tmp_path, scan_layers):
    """With dropout on, a new adapter (B = 0) still gives the base model's logits exactly: only the adapters' input
    is dropped. With B drawn, dropout changes the logits, the same keys give the same logits, a row gives the
    same logits in a batch of its own (as on a mesh, where each device holds some of the rows), and the loop and
    the stacked layers (the same adapters, carried over through the PEFT format) draw the same masks."""
    base, _ = models.load(tiny_chat, progress=False, scan_layers=scan_layers)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, base.config.vocab_size, size=(3, 20)))
    keys = jnp.asarray([[7, 0], [7, 1], [7, 2]], jnp.uint32)

    def with_dropout(model):
        copy = nnx.merge(*nnx.split(model), copy=True)
        lora.set_dropout(copy, 0.3, keys)
        return np.asarray(copy(ids))

    tuned = lora.add_adapters(base, rank=4, alpha=8, seed=0)
    np.testing.assert_array_equal(with_dropout(tuned), np.asarray(base(ids)))
    random_b(tuned)
    plain, dropped = np.asarray(tuned(ids)), with_dropout(tuned)
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(with_dropout(tuned), dropped)
    # a row's masks come with its key, whatever else is in the batch: rows split as devices split them draw alike
    for rows in ([0], [1, 2]):
        part = nnx.merge(*nnx.split(tuned), copy=True)
        lora.set_dropout(part, 0.3, keys[jnp.asarray(rows)])
        np.testing.assert_allclose(np.asarray(part(ids[jnp.asarray(rows)])), dropped[rows], rtol=0, atol=1e-5)
    lora.export_peft(tuned, str(tmp_path / "adapter"))
    other, _ = models.load(tiny_chat, progress=False, scan_layers=not scan_layers)
    other = lora.load_peft(other, str(tmp_path / "adapter"))
    np.testing.assert_allclose(with_dropout(other), dropped, rtol=0, atol=1e-5)


def test_training_with_lora_dropout_is_seeded_and_differs_from_none(tiny_chat):
    """lora_dropout in training: two runs with the same seed give the same adapters array by array (a resumed run
    draws the same masks: each row's key is the seed and its place in the run); without dropout they differ; a
    full fine-tune refuses it in one line."""
    base, tok = models.load(tiny_chat, progress=False)
    common = dict(max_prompt_len=64, max_response_len=64, batch_size=2, epochs=1, learning_rate=1e-2,
                  warmup_steps=0, order="given", pack=False, lora_rank=4, lora_alpha=8)
    runs = {}
    for name, dropout in (("a", 0.3), ("again", 0.3), ("none", 0.0)):
        model, result = training.train(base, tok, PAIRS, TrainConfig(**common, lora_dropout=dropout), progress=False)
        runs[name] = adapters(model)
        assert result.steps == 2
    for key in runs["a"]:
        np.testing.assert_array_equal(runs["again"][key], runs["a"][key], err_msg=key)
    assert max(np.abs(runs["none"][k] - runs["a"][k]).max() for k in runs["a"]) > 1e-4
    with pytest.raises(UserError, match="lora_dropout"):
        training.train(base, tok, PAIRS, TrainConfig(**{**common, "lora_rank": 0}, lora_dropout=0.1), progress=False)
