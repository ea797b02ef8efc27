"""The command line: info on real checkpoints, and bad input -> exit 2 with one clear line, no traceback."""

import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import TINY
from helpers import CONFIGS, run_cli

from soft_jax.core import compile_cache

pytestmark = pytest.mark.e2e  # whole runs, CLI processes, killed and restarted runs (conftest.py)


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_info_on_tiny_checkpoint(tiny_hf):
    kind, path, hf = tiny_hf
    proc = run_cli("info", "--model", path)
    assert proc.returncode == 0, proc.stderr
    n = sum(p.numel() for p in hf.parameters())
    assert f"parameters   {n:,}" in proc.stdout
    assert f"{TINY['num_hidden_layers']} layers, hidden {TINY['hidden_size']}" in proc.stdout


def test_config_param_count_matches_loaded_model(tiny_hf):
    from flax import nnx

    from soft_jax import models

    kind, path, hf = tiny_hf
    model, _ = models.load(path, progress=False)
    assert model.config.num_params == sum(v.size for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param))
    assert model.config.num_params == sum(p.numel() for p in hf.parameters())


@pytest.mark.slow
def test_info_on_smollm2():
    proc = run_cli("info", "--model", "smollm2-135m")
    assert proc.returncode == 0, proc.stderr
    assert "30 layers, hidden 576, mlp 1536, 9 heads / 3 kv heads x 64, vocab 49152" in proc.stdout
    assert "parameters   134,515,008" in proc.stdout and "template present" in proc.stdout


def test_missing_path(tmp_path):
    assert_user_error(run_cli("info", "--model", str(tmp_path / "nope")), "no such file", "smollm2-135m")


def test_unsupported_architecture_gpt2(tmp_path):
    import transformers

    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    assert_user_error(run_cli("info", "--model", str(tmp_path)), "gpt2", "supported: llama, mistral, qwen2")


def broken_copy(src, tmp_path, edit_config=None):
    """A copy of a checkpoint directory, with config.json passed through `edit_config` (a dict -> None)."""
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    if edit_config:
        cfg = json.loads((broken / "config.json").read_text())
        edit_config(cfg)
        (broken / "config.json").write_text(json.dumps(cfg))
    return broken


def test_config_missing_key(tiny_llama, tmp_path):
    broken = broken_copy(tiny_llama, tmp_path, lambda cfg: cfg.pop("hidden_size"))
    assert_user_error(run_cli("info", "--model", str(broken)), "missing key(s) hidden_size", "config.json")


def test_truncated_safetensors(tiny_llama, tmp_path):
    weights = broken_copy(tiny_llama, tmp_path) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_user_error(run_cli("info", "--model", str(weights.parent)), "truncated", "model.safetensors")


def test_weights_config_shape_mismatch(tiny_llama, tmp_path):
    broken = broken_copy(tiny_llama, tmp_path, lambda cfg: cfg.update(intermediate_size=cfg["intermediate_size"] + 8))
    assert_user_error(run_cli("info", "--model", str(broken)), "shape", "disagree")


def _write_gguf(path, tensor):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_unsupported_tensor_type(tmp_path):
    path = tmp_path / "int.gguf"
    _write_gguf(path, np.zeros((4, 8), np.int32))
    assert_user_error(run_cli("info", "--model", str(path)), "unsupported GGUF tensor type", "I32", "Q4_1")


def test_gguf_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_user_error(run_cli("info", "--model", str(path)), "unsupported GGUF architecture 'gpt2'")


def test_not_a_checkpoint_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 64)
    assert_user_error(run_cli("info", "--model", str(path)), "not an HF checkpoint directory nor a GGUF file")


def test_bad_dtype(tiny_llama):
    path = tiny_llama
    assert_user_error(run_cli("info", "--model", path, "--dtype", "int8"), "int8", "bfloat16")


def test_export_cli_writes_loadable_directory(tiny_hf, tmp_path):
    import transformers

    kind, path, _ = tiny_hf
    out = tmp_path / "exported"
    proc = run_cli("export", "--model", path, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    transformers.AutoModelForCausalLM.from_pretrained(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left behind


PLAN = ["plan", "--config", os.path.join(CONFIGS, "tiny.py")]


@pytest.mark.slow  # a whole round compiled for a TPU slice: about a minute
def test_plan_compiles_a_run_for_a_tpu_slice(smollm2_tokenizer, monkeypatch):
    """The tiny run's five programs compiled for a v5e-4 slice (compile-only devices, no TPU): a row each with
    memory per chip, against the chip's 16 GiB. Its round table scores the relevance filter's pairs (two an
    answer) and the eval tasks' (BIG-bench's files in a tree: the in-house items), and names what it leaves out."""
    from helpers import INHOUSE_BIGBENCH

    from soft_jax import evaluation
    from soft_jax.data import sources

    env = {sources.DIR_ENV: INHOUSE_BIGBENCH, sources.ARCHIVE_ENV: ""}
    proc = run_cli(*PLAN, "--topology", "v5e-4", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                   "--config.sampling.batch_size=4", "--config.train.batch_size=4", "--config.eval.tasks=hhh",
                   "--config.filters.max_relevance_ratio=1", "--config.open_ended.limit=3", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "v5e-4 (4 x TPU v5 lite, 16 GiB HBM each, 1 host(s)), mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| program |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    rows = [line.split(" | ") for line in lines[start:end] if not line.startswith("|---")]  # the memory table
    assert [r[0].strip("| ") for r in rows[1:]] == ["train_step", "prefix_prefill", "prefill", "decode", "score"]
    assert all(r[-2] == "yes" for r in rows[1:]), out
    assert out.strip().endswith("[plan] every program fits")
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines if line.startswith("| ")}
    prompts = int(re.search(r"a round at best on TPU v5e \((\d+) prompts", out).group(1))
    monkeypatch.setenv(sources.DIR_ENV, INHOUSE_BIGBENCH)
    pairs = evaluation.request_count(["hhh"], "dromedary", smollm2_tokenizer)[0]
    for phase, n in (("relevance filter", 2 * prompts), ("eval tasks", pairs)):
        calls, rows_a_call = map(int, re.match(r"(\d+) x (\d+) pairs", table[phase][1]).groups())
        assert calls == -(-n // rows_a_call), (phase, table[phase])
    assert table["round"][-1].endswith("| not counted: 3 open-ended answers |"), table["round"]


@pytest.mark.slow  # a whole round compiled for a TPU slice: about a minute
def test_plan_refuses_a_run_that_does_not_fit_the_chip():
    """The same run planned for 1 MiB per chip: the largest program is named, with what to change (exit 2)."""
    proc = run_cli(*PLAN, "--topology", "v5e-4", "--memory-limit", "0.001", "--config.mesh.data=1",
                   "--config.mesh.fsdp=-1", "--config.sampling.batch_size=4", "--config.train.batch_size=4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.startswith("soft-jax:")]
    assert len(err) == 1 and "needs" in err[0] and "more than the 1.0 MiB a device has" in err[0], err
    assert "Traceback" not in proc.stderr and "| **no** |" in proc.stdout


@pytest.mark.parametrize("extra, needle", [
    (["--topology", "v5e-3"], "no v5e slice has 3 chips"),
    (["--topology", "tpu9-8"], "unknown TPU slice 'tpu9-8'"),
    (["--topology", "v5e-4", "--config.sampling.batch_size=6"],
     "sampling.batch_size = 6 is not divisible by the mesh's data x fsdp = 4"),
    (["--topology", "v5e-4", "--gpu-target", "h100"], "give --topology (a TPU slice) or --gpu-target"),
    (["--gpu-target", "/nonexistent.txtpb"], "also give --gpu-memory"),
    (["--topology", "v5e-4", "--bogus"], "unrecognized argument '--bogus'"),
])
def test_plan_bad_input(extra, needle):
    assert_user_error(run_cli(*PLAN, *extra), needle)


def test_the_tests_compilation_cache_is_pruned_least_recently_read_first(tmp_path):
    """compile_cache.prune (the tests' cache, pruned by conftest): past the limit, the least recently read entries go
    until half of it is left."""
    for i in range(6):  # 100 bytes each; read last at 1000 + 5i mod 6: e0 longest ago, then e5, e4, ...
        (tmp_path / f"e{i}").write_bytes(b"x" * 100)
        os.utime(tmp_path / f"e{i}", (1000 + (i * 5) % 6, 1000))
    assert compile_cache.prune(str(tmp_path), 600) == 0 and len(os.listdir(tmp_path)) == 6
    assert compile_cache.prune(str(tmp_path), 500) == 4  # 600 > 500: down to 250 bytes or less (200)
    order = sorted(range(6), key=lambda i: (i * 5) % 6)  # by last read
    assert sorted(os.listdir(tmp_path)) == sorted(f"e{i}" for i in order[4:])


def test_commands_keep_a_persistent_compilation_cache(tiny_chat, tmp_path):
    """`generate` (like `run`, `sweep`, `eval`, `train`) stores its compiled programs in $SOFT_JAX_CACHE/jax when
    JAX_COMPILATION_CACHE_DIR is not set, so the next process reads them back, under a size cap (JAX's
    least-recently-used bookkeeping: an access-time file per program); JAX_COMPILATION_CACHE_MAX_SIZE replaces
    the cap (1 byte: nothing fits); SOFT_JAX_COMPILE_CACHE=0 stores none. A program an uncapped process stored
    (no access-time file) gets one, so the capped cache can still store programs beside it."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n")
    (tmp_path / "on" / "jax").mkdir(parents=True)
    (tmp_path / "on" / "jax" / "jit_old-0123-cache").write_bytes(b"stored by an uncapped process")
    for switch, cache, extra in (("1", tmp_path / "on", {}), ("0", tmp_path / "off", {}),
                                 ("1", tmp_path / "tiny", {"JAX_COMPILATION_CACHE_MAX_SIZE": "1"})):
        proc = run_cli("generate", "--model", tiny_chat, "--prompts", str(prompts),
                       "--out", str(tmp_path / f"{cache.name}.jsonl"), "--max-new-tokens", "4",
                       env=dict(JAX_COMPILATION_CACHE_DIR="", SOFT_JAX_CACHE=str(cache), SOFT_JAX_COMPILE_CACHE=switch,
                                **extra))
        assert proc.returncode == 0, proc.stderr[-2000:]
        stored = os.listdir(cache / "jax") if (cache / "jax").is_dir() else []
        programs = [f for f in stored if f.endswith("-cache")]
        assert (len(programs) >= 2) == (cache.name == "on"), stored  # the prefill and the decode loop at least
        if cache.name == "on":
            assert sorted(f.replace("-cache", "-atime") for f in programs) == sorted(f for f in stored if
                                                                                 f.endswith("-atime"))
