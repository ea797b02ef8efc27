"""The storage layer against a real GCS server on 127.0.0.1 (fake-gcs-server; no mock of the layer): whole objects,
appends by compose, the lease, listing by prefix, copies of models, retries through a flaky link, bad URLs."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from helpers import subprocess_env

from soft_jax.core import io_utils, storage
from soft_jax.core.errors import UserError


def test_write_read_list_remove(bucket, tmp_path):
    run = f"{bucket}/runs/a"
    io_utils.write_json(f"{run}/state.json", {"finished": [1]})
    io_utils.write_jsonl(f"{run}/rounds/001/train.jsonl", [{"x": "é\u2028"}, {"x": 2}])
    assert io_utils.read_json(f"{run}/state.json") == {"finished": [1]}
    assert io_utils.read_jsonl(f"{run}/rounds/001/train.jsonl") == [{"x": "é\u2028"}, {"x": 2}]
    io_utils.write_json(f"{run}/state.json", {"finished": [1, 2]})  # a replace
    assert io_utils.read_json(f"{run}/state.json") == {"finished": [1, 2]}
    assert storage.listdir(run) == ["rounds", "state.json"] and storage.listdir(f"{run}/rounds") == ["001"]
    assert storage.isdir(f"{run}/rounds") and not storage.isfile(f"{run}/rounds")
    assert storage.files(run) == ["rounds/001/train.jsonl", "state.json"]
    assert storage.listdir(f"{bucket}/nothing") == [] and io_utils.read_json(f"{run}/none.json", 7) == 7
    storage.remove(f"{run}/rounds")
    assert storage.files(run) == ["state.json"]


def test_appends_compose_onto_one_object_and_survive_a_rewrite(bucket, monkeypatch):
    """Each append is one compose (no temp object left behind); past MAX_COMPONENTS the file is written whole once,
    and the lines are the same either way."""
    monkeypatch.setattr(storage, "MAX_COMPONENTS", 3)
    path = f"{bucket}/run/metrics.jsonl"
    rows = [{"round": i, "phase": "train", "loss": i / 3} for i in range(8)]
    for r in rows:
        io_utils.append_line(path, r)
    assert io_utils.read_appended(path) == rows
    assert storage.files(f"{bucket}/run") == ["metrics.jsonl"]


def test_a_kill_before_the_compose_loses_only_that_line(bucket, tmp_path):
    """SIGKILL between the line's upload and its compose: the file keeps the earlier lines whole; the stray temp
    object is what remove_stray_temps clears at the next start. (A process's first append to a file writes it
    whole: a killed run may have composed it to many components; the second one composes.)"""
    path = f"{bucket}/run/metrics.jsonl"
    io_utils.append_line(path, {"a": 1})
    io_utils.append_line(path, {"a": 2})
    code = "from soft_jax.core import io_utils; io_utils.append_line(%r, {'a': 3}); io_utils.append_line(%r, {'a': 4})"
    p = subprocess.run([sys.executable, "-c", code % (path, path)], capture_output=True, text=True, timeout=120,
                       env=subprocess_env(SOFT_JAX_KILL_AFTER="2", SOFT_JAX_TRACE=str(tmp_path / "trace")))
    assert p.returncode == -9, p.stderr[-2000:]
    assert (tmp_path / "trace").read_text().split() == ["append:metrics.jsonl"] * 2
    assert io_utils.read_appended(path) == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert len(storage.files(f"{bucket}/run")) == 2  # the file and one stray part
    assert io_utils.remove_stray_temps(f"{bucket}/run") == 1
    assert storage.files(f"{bucket}/run") == ["metrics.jsonl"]
    io_utils.append_line(path, {"a": 4})
    assert io_utils.read_appended(path) == [{"a": 1}, {"a": 2}, {"a": 3}, {"a": 4}]


def test_a_kill_during_a_write_leaves_the_old_object(bucket):
    path = f"{bucket}/run/state.json"
    io_utils.write_json(path, {"v": "old"})
    code = f"from soft_jax.core import io_utils; io_utils.write_json({path!r}, {{'v': 'new' * 1000}})"
    p = subprocess.run([sys.executable, "-c", code], env=subprocess_env(SOFT_JAX_KILL_AT="write:state.json"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr[-2000:]
    assert io_utils.read_json(path) == {"v": "old"}


def _lease_record(path, **fields):
    storage.write_atomic(path, json.dumps({"owner": "x", "host": "elsewhere", "pid": 1, **fields}))


def test_the_lease_refuses_a_second_holder_and_expires_when_its_holder_is_gone(bucket, monkeypatch):
    lock = f"{bucket}/run/.lock"
    first = storage.Lease(lock, ttl=30)
    with pytest.raises(UserError, match=r"another soft-jax run \(host .*\) holds this work dir's lease"):
        storage.Lease(lock, ttl=30)
    first.release()
    assert not storage.exists(lock)
    storage.Lease(lock, ttl=30).release()  # free again
    # a live lease of another host: refused until its expiry
    _lease_record(lock, expires=time.time() + 60)
    with pytest.raises(UserError, match="expires within"):
        storage.Lease(lock)
    # the same record, expired: taken over
    _lease_record(lock, expires=time.time() - 1)
    taken = storage.Lease(lock, ttl=30)
    assert json.loads(storage.read_text(lock))["owner"] == taken.owner
    taken.release()
    # a holder on this host whose process is gone (SIGKILL): taken over at once, before its expiry
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lease_record(lock, host=socket.gethostname(), pid=dead.pid, expires=time.time() + 600)
    storage.Lease(lock).release()


def test_the_lease_is_renewed_while_held(bucket):
    lock = f"{bucket}/run/.lock"
    lease = storage.Lease(lock, ttl=1.5)
    first = json.loads(storage.read_text(lock))["expires"]
    time.sleep(1.2)
    assert json.loads(storage.read_text(lock))["expires"] > first
    lease.release()


def test_a_run_whose_lease_was_taken_over_stops_before_its_next_write(bucket):
    """A holder whose lease another run took over (its renewals had failed past the expiry) notices at its next
    renewal, and its work dir refuses the next durable write with one line."""
    from soft_jax.experiment.workdir import WorkDir

    w = f"{bucket}/run"
    wd = WorkDir(w)
    wd.handle = storage.Lease(f"{w}/.lock", ttl=0.9)
    wd.save_state({"finished": []})
    _lease_record(f"{w}/.lock", owner="another", host="elsewhere", pid=1, expires=time.time() + 60)
    time.sleep(0.7)
    assert wd.handle.lost
    with pytest.raises(UserError, match="lost the work dir's lease"):
        wd.save_state({"finished": [1]})
    assert json.loads(storage.read_text(f"{w}/state.json")) == {"finished": []}
    assert json.loads(storage.read_text(f"{w}/.lock"))["owner"] == "another"  # the other run's lease stays
    wd.close()
    assert json.loads(storage.read_text(f"{w}/.lock"))["owner"] == "another"


def test_upload_dir_replaces_a_directory_configs_last(bucket, tmp_path):
    out = f"{bucket}/export"
    for name, text in {"config.json": "{}", "model.safetensors": "w1", "old_only.bin": "x"}.items():
        storage.write_atomic(f"{out}/{name}", text)
    order = []
    real = storage._upload
    storage._upload = lambda path, data: (order.append(os.path.basename(path)), real(path, data))
    try:
        io_utils.write_dir(out, lambda tmp: [open(os.path.join(tmp, n), "w").write(n) for n in
                                             ("adapter_config.json", "config.json", "model.safetensors")])
    finally:
        storage._upload = real
    assert order == ["model.safetensors", "adapter_config.json", "config.json"]
    assert storage.files(out) == ["adapter_config.json", "config.json", "model.safetensors"]
    assert storage.read_text(f"{out}/model.safetensors") == "model.safetensors"


def test_local_copy_fetches_again_only_what_changed(bucket, tmp_path):
    src = f"{bucket}/models/m"
    storage.write_atomic(f"{src}/config.json", "{}")
    storage.write_atomic(f"{src}/sub/w.bin", b"\x00\x01")
    local = storage.local_copy(src, str(tmp_path))
    assert open(os.path.join(local, "sub", "w.bin"), "rb").read() == b"\x00\x01"
    stamp = os.path.getmtime(os.path.join(local, "config.json"))
    storage.write_atomic(f"{src}/sub/w.bin", b"\x02")
    time.sleep(0.01)
    storage.local_copy(src, str(tmp_path))
    assert open(os.path.join(local, "sub", "w.bin"), "rb").read() == b"\x02"
    assert os.path.getmtime(os.path.join(local, "config.json")) == stamp  # unchanged: not fetched again
    with pytest.raises(UserError, match="no such object"):
        storage.local_copy(f"{bucket}/models/none", str(tmp_path))


def test_bad_urls_are_one_line_user_errors(bucket, gcs_server):
    with pytest.raises(UserError, match=r"s3:// is not supported; give a local path or a gs://bucket/prefix URL"):
        io_utils.read_jsonl("s3://b/x.jsonl")
    with pytest.raises(UserError, match="no bucket"):
        storage.check("gs:///x")
    with pytest.raises(UserError, match=r"the bucket gs://no-such-bucket-x does not exist"):
        io_utils.write_json("gs://no-such-bucket-x/run/state.json", {})
    with pytest.raises(UserError, match=r"^--out gs://no-such-bucket-x/a: the bucket gs://no-such-bucket-x does not"):
        storage.check_bucket("gs://no-such-bucket-x/a", "--out")  # an output, before any work
    with pytest.raises(UserError, match="no such file"):
        io_utils.read_jsonl(f"{bucket}/absent.jsonl")


class _Flaky(http.server.BaseHTTPRequestHandler):
    """A link to the server that answers each client's (gcsfs's, TensorStore's) 3rd request and every `every`-th
    after it 503, or drops the connection, before passing it on. Counted per client, so that each meets failures
    however the two interleave."""

    upstream = ""
    counts: dict = {}
    every = 4
    failed_agents: list = []

    def _any(self):
        agent = self.headers.get("User-Agent", "")
        client = "tensorstore" if "tensorstore" in agent.lower() else "other"
        n = type(self).counts[client] = type(self).counts.get(client, 0) + 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if n % self.every == 3 % self.every:
            type(self).failed_agents.append(agent)
            if len(type(self).failed_agents) % 2 == 0:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        req = urllib.request.Request(self.upstream + self.path, data=body if body else None, method=self.command,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, out, hdrs = r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            status, out, hdrs = e.code, e.read(), e.headers
        self.send_response(status)
        for k, v in hdrs.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v.replace(self.upstream, f"http://127.0.0.1:{self.server.server_port}"))
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _any

    def log_message(self, *args):
        pass


def test_transient_errors_are_retried(bucket, gcs_server, monkeypatch):
    """Through a link where every fourth request of a client fails (503 or a dropped connection), writes, appends,
    listing and the lease go through; and an Orbax checkpoint (TensorStore's own retries) with every tenth failing,
    which keeps its backoff (one second, doubling) to seconds."""
    import jax.numpy as jnp
    import numpy as np

    from soft_jax.training.checkpoints import StepCheckpointer

    _Flaky.upstream, _Flaky.counts, _Flaky.every, _Flaky.failed_agents = gcs_server.url, {}, 4, []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{proxy.server_port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    try:
        run = f"{bucket}/flaky"
        io_utils.write_json(f"{run}/state.json", {"a": 1})
        for i in range(3):
            io_utils.append_line(f"{run}/metrics.jsonl", {"i": i})
        assert io_utils.read_appended(f"{run}/metrics.jsonl") == [{"i": 0}, {"i": 1}, {"i": 2}]
        storage.Lease(f"{run}/.lock", ttl=30).release()
        _Flaky.every = 10
        ckpt = StepCheckpointer(f"{run}/checkpoints", every=1)
        ckpt.save(1, {"w": jnp.arange(6.0)}, {"step": 1})
        tree, meta = ckpt.restore(1, {"w": jnp.zeros(6)})
        np.testing.assert_array_equal(np.asarray(tree["w"]), np.arange(6.0))
        assert meta == {"step": 1} and storage.listdir(run) == ["checkpoints", "metrics.jsonl", "state.json"]
        agents = " ".join(_Flaky.failed_agents).lower()
        assert "gcsfs" in agents and "tensorstore" in agents, agents  # both clients met failures and retried
    finally:
        proxy.shutdown()
