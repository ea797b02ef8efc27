"""TensorBoard event files of a run's metrics: DIR/tensorboard/, written without TensorFlow (tensorboardX's
protobufs and TFRecord framing). `tensorboard --logdir DIR/tensorboard` shows them.

Every metrics.jsonl row with numbers becomes one event: its numbers (not strings, lists or booleans) as
scalars at one step. Tags are `<phase>/<key>` (train/loss, train/tokens_per_s, train/lr, train_done/tokens,
curriculum/mean_difficulty, generate/new_tokens_per_s, round/seconds, eval/hhh, eval/open_distinct_2 ...),
except the generate phase's filter counts, `filter/kept` and `filter/<reason>`, and the eval phase's
validation metric, `validation/<metric>` (validation/valid_nll).

Steps: a per-step train record is at its cumulative step over the run (its step within the round plus the
steps of every earlier round, from their train_done events), so train/* curves run on across rounds; every
per-round record is at its round number (0: the base model's evaluation).

Nothing lost, nothing duplicated: the events mirror metrics.jsonl (soft_jax.experiment.workdir.Metrics), which replaces
a re-logged event instead of repeating it. At open the event file is rebuilt from metrics.jsonl (written
atomically, earlier events keep their wall time), so what a kill lost or tore is restored; a new event is
appended and flushed (a killed run leaves readable events); a re-logged event (a resumed round replaying the
steps after its last checkpoint) marks the file stale, and the next new event or the close rebuilds it once.
Each rebuild is a new file (sorting after the one it replaces, which is removed) that starts with a SessionLog
START at step 0, TensorBoard's mark for "drop the steps read before"; one file at a time, so a TensorBoard
started on the directory reads each step once. A TensorBoard left running across a resume keeps what it read
from the removed file (its watcher does not move on from a deleted file): restart it after a resume.
Each event adds a serialise, CRC-32C, write and flush (no fsync) to metrics.jsonl's append: cheap next to a step
(benchmarks/RESULTS.md has the figure).
"""

from __future__ import annotations

import numbers
import os
import struct
import time
from collections.abc import Iterable

from soft_jax.core import io_utils, storage

DIR = "tensorboard"
PREFIX, SUFFIX = "events.out.tfevents.", ".soft-jax"
SKIP = ("round", "phase", "step")


def scalars(row: dict, validation: str = "valid_nll") -> dict[str, float]:
    """{tag: value} of a metrics row's numbers (validation: the run's validation metric)."""
    from soft_jax.data import filters

    phase = row.get("phase") or "metrics"
    out = {}
    for key, value in row.items():
        if key in SKIP or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if phase == "eval":
            section = "validation" if key == validation else "eval"
        elif phase == "generate" and (key == "kept" or key in filters.REASONS):
            section = "filter"
        else:
            section = phase
        out[f"{section}/{key}"] = float(value)
    return out


def _tensorboardx():
    """The tensorboardX package, imported without torch: its package init imports torch when it is installed,
    only to accept torch tensors, which soft-jax never passes (a slow import and a second threading runtime in
    every `run`; benchmarks/RESULTS.md). An import of torch from anywhere else afterwards works as usual."""
    import sys

    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # import torch -> ImportError, which tensorboardX handles
        try:
            import tensorboardX
        finally:
            del sys.modules["torch"]
    import tensorboardX

    return tensorboardX


def _frame(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
    _tensorboardx()
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def read_events(path: str) -> list:
    """The Event protos of one event file; a torn last record (a kill mid-write) is dropped."""
    _tensorboardx()
    from tensorboardX.proto.event_pb2 import Event

    data = storage.read_bytes(path)
    events, pos = [], 0
    while pos + 12 <= len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        end = pos + 12 + n + 4
        if end > len(data):
            break
        event = Event()
        event.ParseFromString(data[pos + 12:pos + 12 + n])
        events.append(event)
        pos = end
    return events


def event_files(directory: str) -> list[str]:
    """This module's event files in directory, oldest first."""
    return [storage.join(directory, n) for n in storage.listdir(directory)
            if n.startswith(PREFIX) and n.endswith(SUFFIX)]


def _generation(path: str) -> int:
    head = os.path.basename(path)[len(PREFIX):].split(".")[0]
    return int(head) if head.isdigit() else 0


class EventLog:
    """DIR/tensorboard/'s event file, kept equal to the metrics rows (process 0 only: the caller checks)."""

    def __init__(self, directory: str, rows: Iterable[tuple[tuple, dict]], validation: str = "valid_nll"):
        self.directory, self.validation = directory, validation
        storage.makedirs(directory)
        old = event_files(directory)
        self.generation = max((_generation(p) for p in old), default=0)
        self.wall_times = {}  # (first tag, step) -> wall time of the event it was written with
        for path in old:
            for e in read_events(path):
                if e.summary.value:
                    self.wall_times[(e.summary.value[0].tag, e.step)] = e.wall_time
        rows = list(rows)
        self.round_steps: dict = {}  # round -> its training steps (for the cumulative train step)
        for _, row in rows:
            self._note(row)
        self.records = {key: self._encode(row, rebuilt=True) for key, row in rows}
        self.wall_times = {}
        self.handle, self.stale = None, False
        self._rewrite()

    def _note(self, row: dict) -> None:
        t, phase = row.get("round"), row.get("phase")
        if phase == "train" and isinstance(row.get("step"), int):
            self.round_steps[t] = max(self.round_steps.get(t, 0), row["step"])
        elif phase == "train_done" and isinstance(row.get("steps"), int):
            self.round_steps[t] = max(self.round_steps.get(t, 0), row["steps"])

    def step(self, row: dict) -> int:
        """The event's step: cumulative over the run for a train record, else the round number."""
        t = row.get("round") or 0
        if row.get("phase") == "train" and isinstance(row.get("step"), int):
            return row["step"] + sum(n for r, n in self.round_steps.items() if isinstance(r, int) and r < t)
        return int(t)

    def _encode(self, row: dict, rebuilt: bool = False) -> bytes:
        _tensorboardx()
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = scalars(row, self.validation)
        if not values:
            return b""
        step = self.step(row)
        wall = self.wall_times.get((next(iter(values)), step)) if rebuilt else None
        event = Event(wall_time=wall or time.time(), step=step,
                      summary=Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()]))
        return _frame(event.SerializeToString())

    def add(self, key: tuple, row: dict, replaced: bool) -> None:
        """Records a metrics row: appended and flushed, or (replaced: a re-logged event) rebuilt later."""
        self._note(row)
        record = self._encode(row)
        if replaced:
            self.stale = self.stale or bool(record or self.records.get(key))
            self.records[key] = record
            return
        self.records[key] = record
        if self.stale or self.handle is None:  # (None: closed, then given more)
            self._rewrite()
        elif record and isinstance(self.handle, str):  # a bucket: composed onto the object (storage.append)
            storage.append(self.handle, record)
        elif record:
            self.handle.write(record)
            self.handle.flush()  # to the OS: a killed process leaves it readable (a rebuild at open restores more)

    def _rewrite(self) -> None:
        """A new event file with every record, written atomically; the older files are removed."""
        _tensorboardx()
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        now = time.time()
        head = (_frame(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
                + _frame(Event(wall_time=now, step=0,
                               session_log=SessionLog(status=SessionLog.START)).SerializeToString()))
        self.generation += 1
        path = storage.join(self.directory, f"{PREFIX}{self.generation:06d}{SUFFIX}")
        # no fault point: the file's name changes with every rewrite, and a stray temp is removed on resume
        io_utils.write_atomic(path, head + b"".join(self.records.values()), fault=False)
        self._close_handle()
        for old in event_files(self.directory):
            if old != path:
                storage.remove(old)
        self.handle, self.stale = (path if storage.is_gcs(path) else open(path, "ab")), False

    def _close_handle(self) -> None:
        if self.handle and not isinstance(self.handle, str):
            self.handle.close()

    def close(self) -> None:
        if self.handle is None:
            return
        if self.stale:
            self._rewrite()
        self._close_handle()
        self.handle = None
