"""Shared fixtures: tiny random checkpoints written by transformers itself, the embedded SmolLM2."""

import os
import shutil
import tempfile

import pytest

from soft_jax.core import compile_cache

# Tests compare float32 numerics with PyTorch; keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# libtpu is installed (the TPU compile tests), but tests and their subprocesses run on the CPU: without this
# every process would load libtpu, print its warnings and contend for its machine-wide lock file.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the test sessions on this machine, kept between them in
# $SOFT_JAX_CACHE/jax-tests (~/.cache/soft_jax/jax-tests): the pytest process, its pytest-xdist workers (they
# inherit this variable from the controller, which imports this file before it starts them) and every CLI run a
# test starts, kills and restarts read back what any earlier process compiled (the tiny model's train step,
# prefill, decode, scoring) instead of compiling it again. A program's key holds its HLO, compile options, XLA
# flags and the jax and jaxlib versions: a changed program compiles afresh, never reads another's entry.
# SOFT_JAX_TEST_COLD_CACHE=1: a fresh cache for this session only, removed at its end (a first run's times).
# The controller keeps the shared cache under TEST_CACHE_BYTES (soft_jax.core.compile_cache.prune).
os.environ.setdefault("SOFT_JAX_TEST_SESSION", str(os.getpid()))
TEST_CACHE_BYTES = 2 * 2**30
COLD_CACHE = os.environ.get("SOFT_JAX_TEST_COLD_CACHE", "0") == "1"
JAX_CACHE = (os.path.join(tempfile.gettempdir(), f"soft-jax-tests-jax-cache-{os.environ['SOFT_JAX_TEST_SESSION']}")
             if COLD_CACHE else os.path.join(os.environ.get("SOFT_JAX_CACHE", os.path.expanduser("~/.cache/soft_jax")),
                                             "jax-tests"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from helpers import INHOUSE_BIGBENCH  # noqa: E402 - imports jax: after the environment above


@pytest.fixture
def inhouse_bigbench(monkeypatch):
    """$SOFT_JAX_BIGBENCH_DIR at the in-house items (in this process and the subprocesses a test starts)."""
    monkeypatch.delenv("SOFT_JAX_BIGBENCH_ARCHIVE", raising=False)
    monkeypatch.setenv("SOFT_JAX_BIGBENCH_DIR", INHOUSE_BIGBENCH)
    return INHOUSE_BIGBENCH


@pytest.fixture
def real_bigbench():
    """The real BIG-bench task files from wherever soft-jax finds them (evaluation.sources.locate); the test skips,
    with the reason, where there are none (the package index may not serve the archive any more)."""
    from soft_jax.core.errors import UserError
    from soft_jax.data import sources

    try:
        source = sources.locate()
    except UserError as e:
        pytest.skip(f"no BIG-bench task files here: {e}")
    if os.path.samefile(source.root, INHOUSE_BIGBENCH):
        pytest.skip("$SOFT_JAX_BIGBENCH_DIR names the in-house test items, not BIG-bench")
    return source


def pytest_sessionfinish(session, exitstatus):
    if COLD_CACHE and not hasattr(session.config, "workerinput"):  # the controller (or a run without workers)
        shutil.rmtree(JAX_CACHE, ignore_errors=True)

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# name -> (transformers config class name, extra config keys)
TINY_ARCHS = {
    "llama": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama3": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", dict(sliding_window=8, rope_parameters={"rope_type": "default",
                                                                         "rope_theta": 10000.0})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 1000000.0})),
}


# End-to-end files (`pytestmark = pytest.mark.e2e`: whole runs, CLI processes, runs killed and restarted, several
# processes on one mesh) run first, the unit files after them. With `-n 2 --dist loadfile` a file runs whole on one
# worker, in this order when xdist is told to keep it (`--no-loadscope-reorder`, as the README runs the tests; by
# default xdist sorts the files by their number of tests): the long files start first and the short unit files
# fill the workers at the end, instead of a long file starting last and finishing alone.
# `-m "not slow and not e2e"` runs the unit tests alone.
def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)  # stable: the order within a file stays


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: whole runs, CLI processes, runs killed and restarted, several processes "
                                       "(the default run starts them first)")
    config.addinivalue_line("markers", "slow: loads SmolLM2-135M, reads the real BIG-bench files, runs processes "
                                       "that each compile LoRA / QLoRA programs cold, or compiles a whole round for a "
                                       "TPU slice with `soft-jax plan` (run in CI too)")
    if os.environ["JAX_COMPILATION_CACHE_DIR"] == JAX_CACHE and not COLD_CACHE and not hasattr(config, "workerinput"):
        compile_cache.prune(JAX_CACHE, TEST_CACHE_BYTES)  # the controller, before its workers start


def make_tiny_hf(kind: str, out_dir: str, seed: int = 0, **overrides):
    """Saves a randomly initialised transformers model of the given family; returns the torch model."""
    import torch
    import transformers

    cls_name, extra = TINY_ARCHS[kind]
    config = getattr(transformers, cls_name)(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # non-trivial norms and biases, so every tensor's loading is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session", params=sorted(TINY_ARCHS))
def tiny_hf(request, tmp_path_factory):
    """(kind, checkpoint dir, torch model) for each tiny architecture."""
    out = str(tmp_path_factory.mktemp(f"tiny-{request.param}"))
    return request.param, out, make_tiny_hf(request.param, out)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama checkpoint directory, for tests that need one architecture only."""
    out = str(tmp_path_factory.mktemp("tiny-llama-only"))
    make_tiny_hf("llama", out)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer (with its chat template), built from the embedded GGUF's metadata once per machine and
    read back from its cache, as the `tiny` preset reads it, without parsing the GGUF again (seconds per worker).
    test_models checks the built and the cached tokenizer against transformers."""
    from soft_jax.models import presets

    return presets._smollm2_tokenizer()


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer saved beside it: a directory path."""
    out = str(tmp_path_factory.mktemp("tiny-chat"))
    make_tiny_hf("llama", out, vocab_size=len(smollm2_tokenizer), eos_token_id=smollm2_tokenizer.eos_token_id,
                 bos_token_id=smollm2_tokenizer.bos_token_id)
    smollm2_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2():
    """(soft-jax model, tokenizer) for the embedded SmolLM2-135M GGUF, float32."""
    from soft_jax import models

    return models.load(models.SMOLLM2, progress=False)


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own float32 load of the same GGUF (its GGUF loader dequantizes and un-permutes)."""
    import torch
    import transformers

    from soft_jax.models.weights import smollm2_path

    path = smollm2_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_base():
    """The `tiny` preset's random model (seed 0): what every tiny test run starts from."""
    from soft_jax.models import presets

    return presets.load_preset("tiny", seed=0)[0]


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real GCS server (fake-gcs-server) on 127.0.0.1 for this test process, stopped at its end; this process and
    the subprocesses a test starts (helpers.subprocess_env copies os.environ) reach it through
    STORAGE_EMULATOR_HOST, as a user trying a bucket layout would."""
    from helpers import GCSServer

    server = GCSServer(str(tmp_path_factory.mktemp("gcs"))).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(gcs_server):
    """A new, empty bucket on the test server: gs://NAME."""
    return gcs_server.bucket()
