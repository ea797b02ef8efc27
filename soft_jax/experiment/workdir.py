"""A run's work dir: where each artifact lives, process-0 writes, the lock, metrics, and the phase runner.

    DIR/config.json                    the run's config (a rerun with a changed config is checked against it)
    DIR/state.json                     finished rounds, validation scores, the guard's comparisons, best round, stop
    DIR/metrics.jsonl                  one object per event: round, phase, numbers (deduplicated on resume)
    DIR/tensorboard/                   the same numbers as TensorBoard events (soft_jax.experiment.tensorboard_events)
    DIR/wandb_id, DIR/wandb/           with log.wandb.project: the W&B run's id and the next round to log; W&B's
                                       local files (soft_jax.experiment.tracking)
    DIR/curriculum.json                per-prompt difficulty of the pool (across-rounds curriculum only)
    DIR/rounds/NNN/prompts.jsonl       the round's prompt slice
    DIR/rounds/NNN/generations.jsonl   raw self-aligned outputs, exemplar ids, finish reason, answer, filter verdict
    DIR/rounds/NNN/train.jsonl         kept (prompt, response) pairs in training order, with difficulty
    DIR/rounds/NNN/eval.json           validation score with per-item scores, eval tasks, open-ended signals
    DIR/checkpoints/rounds/N           Orbax: the parameters after round N
    DIR/checkpoints/train/NNN          Orbax: training-step checkpoints of the round in progress

DIR may be a local path or gs://bucket/prefix (soft_jax.core.storage). On a multi-host run every host
reads; only process 0 writes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import numpy as np

from soft_jax import evaluation
from soft_jax.core import faults, io_utils, preemption, storage
from soft_jax.core.errors import UserError
from soft_jax.core.io_utils import read_json, read_jsonl
from soft_jax.experiment import config as config_lib
from soft_jax.experiment import tensorboard_events
from soft_jax.parallel import distributed

CONFIG, STATE, METRICS, LOCK, CURRICULUM = "config.json", "state.json", "metrics.jsonl", ".lock", "curriculum.json"
LM_EVAL_ITEMS = "lm_eval_items.jsonl"  # a round's lm-eval results per item (eval.lm_eval.tasks)
CONTAMINATION = "contamination.json"  # `soft-jax data check` of the run's inputs, written when it starts
WANDB_ID, WANDB_DIR = "wandb_id", "wandb"  # soft_jax.experiment.tracking's: the W&B run's id, W&B's own files
OPEN_SIGNALS = ("open_distinct_2", "open_repeated_ngram_rate", "open_truncation_rate")  # the round table shows these
NEW_STATE = {"finished": [], "scores": {}, "comparisons": {}, "best_round": None, "stopped": None}


def save_json(path: str, obj) -> None:
    """io_utils.write_json on the writer process only (process 0), as every save_* here: the work dir is shared."""
    if distributed.is_writer():
        io_utils.write_json(path, obj)


def save_jsonl(path: str, rows) -> None:
    if distributed.is_writer():
        io_utils.write_jsonl(path, rows)


def save_line(path: str, row: dict) -> None:
    if distributed.is_writer():
        io_utils.append_line(path, row)


def remove(path: str) -> None:
    """Removes a file or directory tree if it exists (process 0)."""
    if distributed.is_writer():
        storage.remove(path)


class Metrics:
    """metrics.jsonl: one object per event keyed by (round, phase, step); a resumed event replaces, never repeats.

    tensorboard: a directory that gets the same numbers as TensorBoard events, kept equal to metrics.jsonl
    (soft_jax.experiment.tensorboard_events; process 0 only); validation: the run's validation metric (its tag
    section)."""

    def __init__(self, path: str, tensorboard: str | None = None, validation: str = "valid_nll"):
        self.path = path
        self.rows = {self._key(r): r for r in io_utils.read_appended(path)}
        save_jsonl(self.path, self.rows.values())
        self.events = (tensorboard_events.EventLog(tensorboard, self.rows.items(), validation)
                       if tensorboard and distributed.is_writer() else None)

    @staticmethod
    def _key(row: dict) -> tuple:
        return row.get("round"), row.get("phase"), row.get("step")

    def add(self, row: dict) -> None:
        key = self._key(row)
        seen = key in self.rows
        self.rows[key] = row
        if seen:
            save_jsonl(self.path, self.rows.values())
        else:
            save_line(self.path, row)
        if self.events:
            self.events.add(key, row, seen)

    def close(self) -> None:
        if self.events:
            self.events.close()


def round_values(metrics: list[dict], metric: str, tasks: str = "") -> dict[int, dict]:
    """Per round (0: the base model), the numbers the round table shows (soft_jax.reports.report.round_table) and
    W&B logs (soft_jax.experiment.tracking), read from metrics.jsonl's rows: prompts, kept, dropped, cut_by_length,
    exemplars_shown, principles_shown, answer_tokens_mean and _median (of the kept answers), kept_finish (kept answers
    per finish reason: eos, stop, length), irrelevant (dropped by the relevance filter, when it was on), difficulty
    (the mean), train_loss (the mean over the last quarter of the
    round's steps), and under "eval" the validation metric, the eval tasks, lm-eval's metrics ("lm_eval/TASK/METRIC"
    and its "_stderr") and the open-ended signals that were measured; "unavailable": the tasks the run could not
    evaluate. A number the round lacks is absent."""
    by: dict = {}
    for r in metrics:
        by.setdefault(r.get("round"), {}).setdefault(r.get("phase"), []).append(r)
    keys = [metric, *(evaluation.parse_tasks(tasks) if tasks else []), *OPEN_SIGNALS]
    out = {}
    for t in sorted(k for k in by if k is not None):
        ph = by[t]
        gen, cur = (ph.get("generate") or [{}])[0], (ph.get("curriculum") or [{}])[0]
        losses = [r["loss"] for r in sorted(ph.get("train", []), key=lambda r: r["step"])]
        ev = (ph.get("eval") or [{}])[0]
        unavailable = list(ev.get("unavailable", ()))
        v = {"eval": {k: ev[k] for k in ev if (k in keys or k.startswith("lm_eval/")) and k not in unavailable},
             "unavailable": unavailable}
        if gen:
            v.update(prompts=gen["prompts"], kept=gen["kept"], dropped=gen["prompts"] - gen["kept"])
        if gen.get("max_relevance_ratio"):  # the relevance filter was on: its own count
            v["irrelevant"] = gen["irrelevant"]
        for name, key in (("cut_by_length", "truncated_generations"), ("exemplars_shown", "exemplars_shown"),
                          ("principles_shown", "principles_shown"), ("answer_tokens_mean", "answer_tokens_mean"),
                          ("answer_tokens_median", "answer_tokens_median"), ("kept_finish", "kept_finish")):
            if gen.get(key) is not None:
                v[name] = gen[key]
        if cur.get("mean_difficulty") is not None:
            v["difficulty"] = cur["mean_difficulty"]
        if losses:
            v["train_loss"] = float(np.mean(losses[-max(1, len(losses) // 4):]))
        out[t] = v
    return out


def lock(path: str):
    """An exclusive lock on the work dir for this process's lifetime. Locally an flock, which the OS drops when
    the process dies, even by SIGKILL; on a bucket a lease that expires unless renewed (storage.Lease). Either
    way a crashed run never leaves a lock that blocks its rerun."""
    import fcntl

    if storage.is_gcs(path):
        return storage.Lease(storage.join(path, LOCK))
    f = open(os.path.join(path, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{path}: another soft-jax run (pid {owner}) is using this work dir; wait for it to "
                        "finish or stop it, or use another --workdir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def compare_config(path: str, config: config_lib.RunConfig) -> dict | None:
    """The config to write to config.json (None: it is up to date); on a rerun refuses config changes that
    invalidate finished rounds. Reads only, so that every host can check before any host writes."""
    storage.check(path, "--workdir")
    if storage.isfile(path):
        raise UserError(f"--workdir {path}: a file is in the way; give a new or existing run directory")
    new = config_lib.to_dict(config)
    old = read_json(os.path.join(path, CONFIG))
    if old is not None:
        old = config_lib.with_added_keys(old)
    if old is None:
        if set(storage.listdir(path)) - {LOCK}:
            raise UserError(f"{path}: the directory is not empty and holds no soft-jax run ({CONFIG} missing); "
                            "give a new or empty work dir")
        return new
    changed = config_lib.diff(old, new)
    done = len(read_json(os.path.join(path, STATE), NEW_STATE)["finished"])
    bad = [k for k in changed if k not in config_lib.RESUMABLE_CHANGES]
    per_old, per_new = old["prompts"]["per_round"], new["prompts"]["per_round"]
    if isinstance(per_old, list) or isinstance(per_new, list):
        sizes_old = per_old if isinstance(per_old, list) else [per_old] * old["rounds"]
        sizes_new = per_new if isinstance(per_new, list) else [per_new] * new["rounds"]
        if sizes_old[:done + 1] != sizes_new[:done + 1]:
            bad.append("prompts.per_round")
    elif per_old != per_new:
        bad.append("prompts.per_round")
    if bad:
        raise UserError(f"{path} holds a run with another config (changed: {', '.join(sorted(set(bad)))}); "
                        "use a new --workdir, or rerun with the config in its config.json")
    return new if changed else None


class WorkDir:
    """One run's directory. `open()` checks it on every host, then process 0 creates it, takes the lock and
    writes config.json; `close()` releases the lock."""

    def __init__(self, path: str):
        self.path = path
        self.handle = None
        self.metrics: Metrics | None = None

    def file(self, *parts: str) -> str:
        return storage.join(self.path, *parts)

    def round_dir(self, t: int) -> str:
        return self.file("rounds", f"{t:03d}")

    def round_file(self, t: int, name: str) -> str:
        return storage.join(self.round_dir(t), name)

    def train_checkpoints(self, t: int) -> str:
        return self.file("checkpoints", "train", f"{t:03d}")

    def open(self, config: config_lib.RunConfig, log: Callable[[str], None] = print) -> dict:
        """Checks, creates and locks the work dir; returns its state (a new one when the run starts)."""
        # every host compares before any host writes: a late one would see the new files
        update = compare_config(self.path, config)
        distributed.barrier("workdir checked")
        if distributed.is_writer():
            storage.makedirs(self.path)
            self.handle = lock(self.path)
            try:
                if update:
                    save_json(self.file(CONFIG), update)
                if io_utils.remove_stray_temps(self.path, skip=("checkpoints", WANDB_DIR)):
                    log(f"[run] removed temp files that an interrupted write left in {self.path}")
            except BaseException:
                self.close()
                raise
        distributed.barrier("workdir ready")
        self.metrics = Metrics(self.file(METRICS), self.file(tensorboard_events.DIR), config.validation.metric)
        # a deep copy: a fresh run appends to its own lists, not to NEW_STATE's (a sweep runs several in one process)
        return {**copy.deepcopy(NEW_STATE), **read_json(self.file(STATE), {})}

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.handle:
            self.handle.close()
            self.handle = None

    def check_lease(self) -> None:
        """Before each durable write: a run whose lease on a bucket work dir was taken over (its renewals failed
        past the expiry, and another run took the work dir) stops rather than write over the other's files."""
        if getattr(self.handle, "lost", False):
            raise UserError(f"{self.path}: this run lost the work dir's lease (it could not renew it for "
                            f"{self.handle.ttl:.0f} s and another run took the work dir over); it stops here and "
                            "writes nothing more: let the other run finish, or stop it and rerun")

    def save_state(self, state: dict) -> None:
        self.check_lease()
        save_json(self.file(STATE), state)

    def phase(self, path: str, compute: Callable[[], tuple], point: str = "", stop: str = ""):
        """One durable phase: the artifact at `path` when an earlier run finished it; else `compute()` ->
        (value, metrics event or None), the event recorded, the value written (JSON, or JSONL for a list), then
        the fault point and the stop check (a stop after this point resumes past the phase)."""
        if storage.exists(path):
            return read_jsonl(path) if path.endswith(".jsonl") else read_json(path)
        value, event = compute()
        self.check_lease()
        if event:  # first: a kill between the two leaves the event, which the rerun's own replaces; the other
            self.metrics.add(event)  # order would leave the artifact without its event for good
        (save_jsonl if path.endswith(".jsonl") else save_json)(path, value)
        if point:
            faults.point(point)
        if stop:
            preemption.raise_if_stopped(stop)
        return value
