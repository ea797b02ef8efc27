"""SFT: masked loss, packing, order, accumulation, remat, resume after SIGKILL, 8-device mesh, bad input."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from soft_jax import models, training
from soft_jax.errors import UserError
from soft_jax.training import TrainConfig

PAIRS = [("What is the capital of France?", "Paris is the capital of France."),
         ("Name a primary colour.", "Red is a primary colour."),
         ("How many legs does a spider have?", "A spider has eight legs."),
         ("What is 2 + 2?", "2 + 2 equals 4.")]


def test_prompt_tokens_carry_no_loss(smollm2_tokenizer):
    tok = smollm2_tokenizer
    config = TrainConfig(max_prompt_len=64, max_response_len=64)
    ex, cut_p, cut_r = training.render(tok, *PAIRS[0], config)
    assert not cut_p and not cut_r
    n_prompt = ex.is_response.index(True)
    assert not any(ex.is_response[:n_prompt]) and all(ex.is_response[n_prompt:])
    assert tok.decode(ex.ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert tok.decode(ex.ids[n_prompt:]).startswith(PAIRS[0][1] + "<|im_end|>")
    rows = training.pack([ex], 128)
    # Target t is token t + 1: weights are on exactly the response tokens.
    np.testing.assert_array_equal(rows["weights"][0, :len(ex.ids) - 1], np.asarray(ex.is_response[1:], np.float32))
    assert rows["weights"].sum() == len(ex.ids) - n_prompt


def test_truncation_is_counted_and_left_right(smollm2_tokenizer):
    config = TrainConfig(max_prompt_len=40, max_response_len=20)
    ex, cut_p, cut_r = training.render(smollm2_tokenizer, "word " * 100, "answer " * 100, config)
    assert cut_p and cut_r and len(ex.ids) == 60
    assert smollm2_tokenizer.decode(ex.ids[:40]).endswith("word <|im_end|>\n<|im_start|>assistant\n")  # end kept
    assert smollm2_tokenizer.decode(ex.ids[40:]).startswith("answer answer")  # start kept


def _examples(tok, config=TrainConfig(max_prompt_len=64, max_response_len=64)):
    return [training.render(tok, p, r, config)[0] for p, r in PAIRS]


def test_packed_loss_and_gradients_equal_unpacked(tiny_chat, smollm2_tokenizer):
    model, _ = models.load(tiny_chat, progress=False)
    examples = _examples(smollm2_tokenizer)
    packed, unpacked = training.pack(examples, 256), training.pack(examples, 256, pack_rows=False)
    assert packed["inputs"].shape[0] == 1 and unpacked["inputs"].shape[0] == 4
    assert set(np.unique(packed["segment_ids"])) == {0, 1, 2, 3, 4}
    graphdef, state = nnx.split(model)

    def mean_loss(state, rows):
        nll, count = training.loss_sums(nnx.merge(graphdef, state), jax.tree.map(jnp.asarray, rows))
        return nll / count

    (a, ga), (b, gb) = (jax.value_and_grad(mean_loss)(state, r) for r in (packed, unpacked))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


def test_remat_gives_the_same_gradients(tiny_chat, smollm2_tokenizer):
    model, _ = models.load(tiny_chat, progress=False)
    rows = jax.tree.map(jnp.asarray, training.pack(_examples(smollm2_tokenizer), 256))
    graphdef, state = nnx.split(model)
    grads = [jax.grad(lambda s: training.loss_sums(nnx.merge(graphdef, s), rows, remat)[0])(state)
             for remat in (False, True)]
    for x, y in zip(*(jax.tree.leaves(g) for g in grads)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_layers_give_the_same_loss_and_gradients(tiny_chat, smollm2_tokenizer, remat):
    """model.scan_layers runs the layers as one lax.scan over stacked weights: same loss, same gradient of every
    parameter (each layer's own, not a stacked one), with and without remat."""
    model, _ = models.load(tiny_chat, progress=False)
    rows = jax.tree.map(jnp.asarray, training.pack(_examples(smollm2_tokenizer), 256))
    graphdef, state = nnx.split(model)
    loss, grads = {}, {}
    for scan in (False, True):
        fn = jax.jit(jax.value_and_grad(lambda s: training.loss_sums(nnx.merge(graphdef, s), rows, remat, scan)[0]))
        loss[scan], grads[scan] = fn(state)
    np.testing.assert_allclose(loss[True], loss[False], rtol=1e-6)
    a, b = _leaves(grads[False]), _leaves(grads[True])
    assert sorted(a) == sorted(b) and any("layers'][1]" in k for k in a)
    for key in a:  # float32 sums in another order: differences of ~1e-7 of the tensor's largest entry
        scale = np.abs(a[key]).max()
        assert scale > 0, key
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6 * scale, err_msg=key)


def test_training_with_scanned_layers_equals_the_loop(tiny_chat):
    model, tok = models.load(tiny_chat, progress=False)
    trained = {}
    for scan in (False, True):
        config = TrainConfig(max_prompt_len=64, max_response_len=64, batch_size=2, epochs=2, learning_rate=1e-3,
                             warmup_steps=0, order="given", pack=False, scan_layers=scan)
        trained[scan] = _leaves(nnx.state(training.train(model, tok, PAIRS, config, progress=False)[0], nnx.Param))
    before = _leaves(nnx.state(model, nnx.Param))
    for key in before:
        assert np.abs(trained[False][key] - before[key]).max() > 1e-4, key  # training moved every tensor
        np.testing.assert_allclose(trained[True][key], trained[False][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_given_order_is_kept_and_shuffle_is_seeded():
    config = TrainConfig(order="given")
    np.testing.assert_array_equal(training.epoch_order(10, config, 0), np.arange(10))
    shuffled = TrainConfig(order="shuffle", seed=3)
    a, b = training.epoch_order(10, shuffled, 0), training.epoch_order(10, shuffled, 0)
    np.testing.assert_array_equal(a, b)
    assert sorted(a) == list(range(10)) and list(a) != list(range(10))
    examples = [training.Example(ids=[i] * 5, is_response=[True] * 5) for i in range(1, 9)]
    rows = training.pack(examples, 12)  # 4 tokens each: three examples a row, in order
    seen = [int(t) for t, s in zip(rows["inputs"].ravel(), rows["segment_ids"].ravel()) if s]
    assert seen == [i for i in range(1, 9) for _ in range(4)]


def test_tiny_model_memorises_a_handful_of_examples(tiny_chat, smollm2_tokenizer):
    model, tok = models.load(tiny_chat, progress=False)
    config = TrainConfig(max_prompt_len=64, max_response_len=64, batch_size=2, epochs=60, learning_rate=1e-2,
                         warmup_steps=5, order="given", pack=False)
    trained, result = training.train(model, tok, PAIRS, config, progress=False)
    assert result.steps == 120 and result.examples == 4
    assert result.losses[0] > 5 and result.losses[-1] < 0.05, (result.losses[0], result.losses[-1])


def test_gradient_accumulation_equals_one_big_batch(tiny_chat, smollm2_tokenizer):
    model, tok = models.load(tiny_chat, progress=False)
    outs = []
    for accum in (1, 2):
        config = TrainConfig(max_prompt_len=64, max_response_len=64, batch_size=4, grad_accum=accum, epochs=2,
                             learning_rate=1e-3, warmup_steps=1, pack=False, order="given")
        trained, result = training.train(model, tok, PAIRS, config, progress=False)
        outs.append((nnx.state(trained), result.losses))
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5)
    for x, y in zip(*(jax.tree.leaves(o[0]) for o in outs)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


RESUME_SCRIPT = r"""
import json, sys
import numpy as np
from flax import nnx
from soft_jax import models, training
model, tok = models.load(sys.argv[1], progress=False)
pairs = json.loads(sys.argv[2])
config = training.TrainConfig(max_prompt_len=64, max_response_len=64, batch_size=2, epochs=3, learning_rate=1e-3,
                              warmup_steps=2, checkpoint_every=2, seed=1, pack=False)
trained, result = training.train(model, tok, pairs, config, checkpoint_dir=sys.argv[3], progress=False)
flat = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(trained))}
np.savez(sys.argv[4], **flat)
print(json.dumps({"steps": result.steps, "ran": len(result.losses)}))
"""


def _run_resume(tiny_chat, ckpt_dir, out, kill_at=None):
    env = dict(os.environ)
    env.pop("SOFT_JAX_KILL_AT", None)
    if kill_at:
        env["SOFT_JAX_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-c", RESUME_SCRIPT, tiny_chat, json.dumps(PAIRS * 2), str(ckpt_dir),
                           str(out)], env=env, capture_output=True, text=True, timeout=600)


def test_killed_run_resumes_to_identical_parameters(tiny_chat, tmp_path):
    whole = _run_resume(tiny_chat, tmp_path / "ckpt-whole", tmp_path / "whole.npz")
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert json.loads(whole.stdout.splitlines()[-1]) == {"steps": 12, "ran": 12}
    killed = _run_resume(tiny_chat, tmp_path / "ckpt", tmp_path / "resumed.npz", kill_at="train_step_5")
    assert killed.returncode == -9 and not (tmp_path / "resumed.npz").exists()
    resumed = _run_resume(tiny_chat, tmp_path / "ckpt", tmp_path / "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout.splitlines()[-1]) == {"steps": 12, "ran": 8}  # resumed after step 4
    a, b = np.load(tmp_path / "whole.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-6, err_msg=key)


MESH_STEP_SCRIPT = r"""
import json, sys
import numpy as np
import jax
from flax import nnx
from soft_jax import models, sharding, training
pairs = json.loads(sys.argv[2])
mesh = sharding.make_mesh((2, 2, 2)) if sys.argv[3] == "mesh" else None
model, tok = models.load(sys.argv[1], mesh=mesh, progress=False)
# eps 1e-4: Adam's first update g / (|g| + eps) turns reduction-order noise in gradients near a tiny eps into
# visible parameter differences; a larger eps keeps the comparison well conditioned.
config = training.TrainConfig(max_prompt_len=64, max_response_len=64, batch_size=4, pack=False, learning_rate=1e-3,
                              warmup_steps=0, order="given", eps=1e-4)
trained, result = training.train(model, tok, pairs, config, mesh=mesh, progress=False)
kernel = trained.layers[0].mlp.up_proj.kernel[...]
flat = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(trained))}
np.savez(sys.argv[4], **flat)
print(json.dumps({"devices": len(kernel.sharding.device_set), "loss": result.losses}))
"""


def test_train_step_on_8_device_mesh_equals_single_device(tiny_chat, tmp_path):
    outs = {}
    for mode in ("single", "mesh"):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-c", MESH_STEP_SCRIPT, tiny_chat, json.dumps(PAIRS), mode,
                               str(tmp_path / f"{mode}.npz")], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[mode] = json.loads(proc.stdout.splitlines()[-1])
    assert outs["mesh"]["devices"] == 8 and outs["single"]["devices"] == 1
    np.testing.assert_allclose(outs["mesh"]["loss"], outs["single"]["loss"], rtol=1e-6)
    a, b = np.load(tmp_path / "single.npz"), np.load(tmp_path / "mesh.npz")
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_bad_training_input(smollm2_tokenizer, tiny_chat):
    model, tok = models.load(tiny_chat, progress=False)
    with pytest.raises(UserError, match="training set is empty"):
        training.train(model, tok, [], TrainConfig(), progress=False)
    with pytest.raises(UserError, match="the engraving format alone takes"):
        training.train(model, tok, PAIRS, TrainConfig(max_prompt_len=10), progress=False)
    with pytest.raises(UserError, match="schedule has 2 steps but warmup_steps is 5"):
        training.train(model, tok, PAIRS, TrainConfig(batch_size=2, warmup_steps=5, pack=False), progress=False)
    with pytest.raises(UserError, match="multiple of grad_accum"):
        TrainConfig(batch_size=3, grad_accum=2)


def _pairs_file(tmp_path, pairs=PAIRS):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return str(path)


def test_train_cli_writes_a_loadable_checkpoint(tiny_chat, tmp_path):
    from conftest import run_cli

    out = tmp_path / "trained"
    proc = run_cli("train", "--model", tiny_chat, "--data", _pairs_file(tmp_path), "--out", str(out),
                   "--batch-size", "2", "--epochs", "2", "--lr", "1e-3", "--warmup-steps", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trained 2 steps on 4 examples" in proc.stdout  # packed: one row per epoch
    trained, tok = models.load(str(out), progress=False)
    before, _ = models.load(tiny_chat, progress=False)
    assert tok is not None and not np.allclose(trained.layers[0].mlp.up_proj.kernel[...],
                                               before.layers[0].mlp.up_proj.kernel[...])
    # preempted (SIGTERM) after step 1 with --checkpoint-dir: saves that step, says how to resume, exits 143;
    # the same command then finishes with the uninterrupted run's parameters
    argv = ["train", "--model", tiny_chat, "--data", _pairs_file(tmp_path), "--out", str(tmp_path / "resumed"),
            "--batch-size", "2", "--epochs", "2", "--lr", "1e-3", "--warmup-steps", "1",
            "--checkpoint-dir", str(tmp_path / "ckpt")]
    proc = run_cli(*argv, env={"SOFT_JAX_TERM_AT": "train_step_1"})
    assert proc.returncode == 143, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if "soft-jax:" in line]
    assert len(said) == 1 and said[0].startswith("soft-jax: stopped by SIGTERM after training step 1"), said
    assert "resume with: soft-jax train" in said[0] and os.listdir(tmp_path / "ckpt") == ["1"]
    assert not (tmp_path / "resumed").exists()
    proc = run_cli(*argv)
    assert proc.returncode == 0 and "trained 2 steps" in proc.stdout, proc.stderr[-2000:]
    resumed, _ = models.load(str(tmp_path / "resumed"), progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(resumed, nnx.Param)), jax.tree.leaves(nnx.state(trained, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("extra, needle", [
    (["--max-prompt-len", "10"], "the engraving format alone takes"),
    (["--warmup-steps", "5"], "schedule has 1 steps but warmup_steps is 5"),
    (["--batch-size", "3", "--grad-accum", "2"], "multiple of grad_accum"),
    (["--order", "backwards"], "training order 'backwards' is unknown"),
])
def test_train_cli_bad_input(tiny_chat, tmp_path, extra, needle):
    from conftest import run_cli

    proc = run_cli("train", "--model", tiny_chat, "--data", _pairs_file(tmp_path), "--out", str(tmp_path / "o"),
                   *extra)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert needle in proc.stderr and not (tmp_path / "o").exists()
