"""Where soft-jax reads and writes: a local path, or a Cloud Storage URL `gs://bucket/prefix`, through one API.

Cloud Storage is reached with gcsfs, the fsspec backend that etils.epath (and so Orbax) itself uses for gs://
when TensorFlow is absent: one client library, one set of credentials and retries for our files and Orbax's
directory operations; TensorStore writes the checkpoint arrays. A bucket is not a filesystem, so:

- Atomic replace: a file is one object, uploaded in one request; an object is whole or absent, so a kill at
  any point leaves the old object (or none), never half a file. A directory (an export) is written file by
  file with its `*config.json` last, after the old one is removed: a reader sees the old export, one that
  does not load (no config), or the new one.
- Append (metrics.jsonl, TensorBoard events): an object cannot grow. The line is uploaded as a small temp
  object and composed onto the file server-side (GCS compose), then the temp object is removed: each append
  moves the line's bytes, not the file's, and the file stays one object. A kill before the compose leaves a
  temp object (removed at the next start) and the file without the line, as a torn local line is dropped.
  A composite object may have 1,024 components: every 512 appends the file is rewritten once.
- Lock: `flock` means nothing on a bucket. `Lease` creates the lock object only if absent (a generation-0
  precondition), renews it from a thread, and deletes it at the end; a holder killed by SIGKILL stops renewing,
  and its lease expires after `SOFT_JAX_LEASE_SECONDS` (one on this host whose process is gone, at once).
- Listing is by prefix: a "directory" exists when an object has its name as a prefix.
- Transient errors (HTTP 408 / 429 / 5xx, a dropped connection) are retried with exponential backoff by gcsfs
  (6 tries) and TensorStore; one that outlasts them is a `StorageError`: one line, and the rerun resumes.

`STORAGE_EMULATOR_HOST=http://host:port` points everything at that server with no credentials (`configure`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

from soft_jax.core import faults
from soft_jax.core.errors import UserError

GCS = "gs://"
MAX_COMPONENTS = 512  # appends composed onto one object before it is rewritten whole (GCS allows 1,024)


class StorageError(Exception):
    """A Cloud Storage request that failed for good (after the client's retries); the run stops and resumes."""


def is_gcs(path) -> bool:
    return str(path).startswith(GCS)


def check(path: str, what: str = "path") -> str:
    """The path, or a UserError when it names a scheme other than gs://."""
    path = str(path)
    if "://" in path and not is_gcs(path):
        raise UserError(f"{what} {path}: {path.split('://')[0]}:// is not supported; give a local path or a "
                        "gs://bucket/prefix URL")
    if is_gcs(path) and not path[len(GCS):].split("/")[0]:
        raise UserError(f"{what} {path}: no bucket; write gs://BUCKET/PREFIX")
    return path


def check_bucket(path: str, what: str = "path") -> str:
    """check(path), and for a gs:// URL one request that its bucket exists: an output's bad bucket is refused
    before any work, not when the first file is written."""
    check(path, what)
    if is_gcs(path):
        try:
            found = _fs().exists(_bucket(path))
        except Exception as e:  # gcsfs raises HttpError, aiohttp and OS errors once retries are spent
            raise StorageError(f"{what} {path}: Cloud Storage request failed ({type(e).__name__})") from e
        if not found:
            raise _no_bucket(f"{what} {path}")
    return path


def _no_bucket(where: str) -> UserError:
    return UserError(f"{where}: the bucket gs://{_bucket(where.split()[-1])} does not exist (or this account may not "
                     "see it); create it or fix the URL")


def configure() -> None:
    """With STORAGE_EMULATOR_HOST set (the variable google-cloud-storage and gcsfs read), points TensorStore at
    the same server without credentials and keeps gcsfs on the JSON API (its gRPC bucket probe cannot reach an
    emulator). Idempotent; explicit settings win."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    host = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_fs_cache: dict = {}


def _fs():
    """The gcsfs filesystem of this process (one per process and emulator; no listing cache: other hosts write)."""
    configure()
    key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
    if key not in _fs_cache:
        from gcsfs.core import GCSFileSystem

        # gcsfs logs each request that ran out of retries with its traceback; _call turns it into one line
        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)

        _fs_cache[key] = GCSFileSystem(use_listings_cache=False, skip_instance_cache=True)
    return _fs_cache[key]


def _key(path: str) -> str:
    return str(path)[len(GCS):].rstrip("/")


def _bucket(path: str) -> str:
    return _key(path).split("/")[0]


def _call(path: str, fn: Callable, *args, **kwargs):
    """fn(*args) on the bucket; a missing bucket is a UserError, a request that failed for good a StorageError.
    FileNotFoundError and FileExistsError pass through: callers decide what an absent object means."""
    try:
        return fn(*args, **kwargs)
    except (FileNotFoundError, FileExistsError) as e:
        if not _fs().exists(_bucket(path)):
            raise _no_bucket(path) from None
        raise e
    except (UserError, StorageError):
        raise
    except Exception as e:  # gcsfs raises HttpError, aiohttp and OS errors once retries are spent
        raise StorageError(f"{path}: Cloud Storage request failed ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else 'no message'})") from e


def join(*parts: str) -> str:
    return os.path.join(*parts)


def abspath(path: str) -> str:
    return path if is_gcs(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    if not is_gcs(path):
        return os.path.exists(path)
    return bool(_key(path)) and _call(path, _fs().exists, _key(path))


def isfile(path: str) -> bool:
    if not is_gcs(path):
        return os.path.isfile(path)
    return _call(path, _fs().isfile, _key(path))


def isdir(path: str) -> bool:
    if not is_gcs(path):
        return os.path.isdir(path)
    return _call(path, _fs().isdir, _key(path))


def listdir(path: str) -> list[str]:
    """The names directly under a directory (a prefix on a bucket); [] when there is none."""
    if not is_gcs(path):
        return os.listdir(path) if os.path.isdir(path) else []
    try:
        entries = _call(path, _fs().ls, _key(path), detail=False)
    except FileNotFoundError:
        return []
    prefix = _key(path) + "/"
    return sorted({e.rstrip("/")[len(prefix):] for e in entries if e.startswith(prefix)} - {""})


def files(path: str) -> list[str]:
    """Every file under a directory, as paths relative to it (sorted)."""
    if not is_gcs(path):
        return sorted(os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names)
    prefix = _key(path) + "/"
    try:
        found = _call(path, _fs().find, _key(path))
    except FileNotFoundError:
        return []
    return sorted(f[len(prefix):] for f in found if f.startswith(prefix))


def size(path: str) -> int:
    if not is_gcs(path):
        return os.path.getsize(path)
    return int(_call(path, _fs().info, _key(path))["size"])


def read_bytes(path: str) -> bytes:
    if not is_gcs(path):
        with open(path, "rb") as f:
            return f.read()
    return _call(path, _fs().cat_file, _key(path))


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def makedirs(path: str) -> None:
    """Creates a local directory; a no-op on a bucket, where a prefix exists once an object is under it."""
    if not is_gcs(path):
        os.makedirs(path, exist_ok=True)


def _upload(path: str, data: bytes) -> None:
    _call(path, _fs().pipe_file, _key(path), data)


def write_atomic(path: str, data: str | bytes, fault: bool = True) -> None:
    """Writes text (UTF-8) or bytes so that a reader sees the old file or the new one, never half of one.

    Local: a temp file in the same directory, synced, then renamed over the path (a kill before the rename
    leaves a stray `.NAME.*.tmp`: remove_stray_temps). A bucket: one upload (objects are whole or absent).
    fault: a fault-injection point halfway (`write:NAME`, soft_jax.core.faults)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    name = os.path.basename(path)
    if is_gcs(path):
        if fault:
            faults.point(f"write:{name}")
        _upload(path, raw)
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw[:len(raw) // 2])
            if fault:
                faults.point(f"write:{name}")
            f.write(raw[len(raw) // 2:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_appends: dict[str, int] = {}  # composed appends per object since this process last wrote it whole


def append(path: str, data: bytes, fault: str = "") -> None:
    """Appends bytes durably. Local: written, flushed and synced, with a fault point halfway (a kill there leaves
    a torn last line). A bucket: composed on (see the module docstring), with the fault point between the temp
    object's upload and the compose."""
    if not is_gcs(path):
        with open(path, "ab") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            if fault:
                faults.point(fault)
            f.write(data[len(data) // 2:])
            f.flush()
            os.fsync(f.fileno())
        return
    fs = _fs()
    # written whole at this process's first append to it (an object a killed run composed onto may hold many
    # components already; GCS allows 1,024) and every MAX_COMPONENTS appends after that
    if path not in _appends or _appends[path] >= MAX_COMPONENTS or not exists(path):
        old = read_bytes(path) if exists(path) else b""
        if fault:
            faults.point(fault)
        _upload(path, old + data)
        _appends[path] = 0
        return
    part = join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    _upload(part, data)
    if fault:
        faults.point(fault)
    _call(path, fs.merge, _key(path), [_key(path), _key(part)])
    _call(part, fs.rm_file, _key(part))
    _appends[path] = _appends.get(path, 0) + 1


def remove(path: str) -> None:
    """Removes a file or a directory tree (a prefix on a bucket) if it exists."""
    if not is_gcs(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
        return
    _appends.pop(path, None)
    for rel in files(path):
        _call(path, _fs().rm_file, _key(join(path, rel)))
    if isfile(path):
        _call(path, _fs().rm_file, _key(path))


def _config_last(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (n.endswith("config.json"), n))


def upload_dir(local: str, path: str) -> None:
    """Replaces the directory at `path` (a bucket prefix) with the local directory's files, so that it is never a
    loadable mix of both: the old `*config.json` go first, the new ones last (see the module docstring)."""
    old = set(files(path))
    new = files(local)
    for rel in _config_last(list(old)):
        if rel.endswith("config.json"):
            _call(path, _fs().rm_file, _key(join(path, rel)))
    for rel in _config_last(new):
        if rel.endswith("config.json"):
            for stale in sorted(old - set(new)):
                _call(path, _fs().rm_file, _key(join(path, stale)))
            old = set(new)
        with open(os.path.join(local, rel), "rb") as f:
            _upload(join(path, rel), f.read())
    for stale in sorted(old - set(new)):
        _call(path, _fs().rm_file, _key(join(path, stale)))


def local_copy(path: str, cache: str, keep: Callable[[str], bool] | None = None) -> str:
    """A local path with the content of `path`: the path itself when local; for a bucket object or prefix, a copy
    under `cache` (by bucket and name) that is downloaded again only for objects whose generation changed.
    keep: for a prefix, which relative names to fetch (the rest stay in the bucket; a later call may fetch them)."""
    if not is_gcs(path):
        return path
    dest = os.path.join(cache, _key(path))
    single = isfile(path)
    names = [""] if single else files(path)
    if not names:
        raise UserError(f"{path}: no such object or directory in the bucket; check the URL")
    if keep is not None and not single:
        names = [n for n in names if keep(n)]
        os.makedirs(dest, exist_ok=True)
    for rel in names:
        src = path if single else join(path, rel)
        target = dest if single else os.path.join(dest, rel)
        generation = str(_call(src, _fs().info, _key(src)).get("generation"))
        stamp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.generation")
        if os.path.isfile(target) and os.path.isfile(stamp) and open(stamp).read() == generation:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{os.getpid()}.download"
        _call(src, _fs().get_file, _key(src), tmp)
        os.replace(tmp, target)
        write_atomic(stamp, generation, fault=False)
    return dest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """An exclusive lease on a bucket prefix: the object `path` (JSON: owner, host, pid, expiry), created only if
    absent, renewed every third of `ttl` by a daemon thread, deleted by `release`.

    A lease whose expiry has passed, or whose holder ran on this host and is gone, is taken over: deleted under a
    generation precondition, then created as above, so of two contenders one wins.

    Raises:
        UserError: When another live holder has it.
    """

    def __init__(self, path: str, ttl: float | None = None):
        self.path = path
        self.ttl = float(ttl or os.environ.get("SOFT_JAX_LEASE_SECONDS", 60))
        self.owner = uuid.uuid4().hex
        self.lost = False
        self._stop = threading.Event()
        self._acquire()
        self._thread = threading.Thread(target=self._renew, name="soft-jax-lease", daemon=True)
        self._thread.start()

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.ttl}).encode()

    def _held_by(self) -> tuple[dict, str] | None:
        try:
            info = _call(self.path, _fs().info, _key(self.path))
            return json.loads(read_bytes(self.path)), str(info.get("generation"))
        except FileNotFoundError:
            return None
        except ValueError:  # a damaged record: treat it as expired
            return {"expires": 0}, ""

    def _acquire(self) -> None:
        for _ in range(3):
            try:
                _call(self.path, _fs().pipe_file, _key(self.path), self._record(), mode="create")
                return
            except FileExistsError:
                pass
            held = self._held_by()
            if held is None:
                continue
            record, generation = held
            gone = record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", 0)))
            if record.get("expires", 0) > time.time() and not gone:
                left = record["expires"] - time.time()
                raise UserError(f"{os.path.dirname(self.path)}: another soft-jax run (host {record.get('host')}, pid "
                                f"{record.get('pid')}) holds this work dir's lease; wait for it to finish or stop it, "
                                f"or use another --workdir (a killed run's lease expires within {left:.0f} s)")
            try:
                _call(self.path, _fs().call, "DELETE", "b/{}/o/{}", _bucket(self.path),
                      _key(self.path).split("/", 1)[1], **({"ifGenerationMatch": generation} if generation else {}))
            except FileNotFoundError:
                pass
        raise UserError(f"{self.path}: could not take the work dir's lease (another run is taking it); rerun")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                held = self._held_by()
                if held is None or held[0].get("owner") != self.owner:
                    self.lost = True
                    return
                _upload(self.path, self._record())
            except Exception:  # noqa: BLE001 - a failed renewal is retried at the next tick; expiry is the limit
                continue

    def release(self, wait: float = 5.0) -> None:
        """Deletes the lease if it is still ours. Waits at most `wait` s: with the bucket unreachable (the run is
        stopping because of it) the client's retries would hold the exit for a minute, and the lease expires by
        itself."""
        self._stop.set()
        self._thread.join(timeout=1.0)  # idle between renewals; a renewal in flight may rewrite a lease that expires

        def drop():
            try:
                held = self._held_by()
                if held and held[0].get("owner") == self.owner:
                    _call(self.path, _fs().rm_file, _key(self.path))
            except (FileNotFoundError, StorageError):
                pass

        dropper = threading.Thread(target=drop, name="soft-jax-lease-release", daemon=True)
        dropper.start()
        dropper.join(timeout=wait)

    close = release
