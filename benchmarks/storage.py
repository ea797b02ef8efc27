"""A bucket against local disk: the same checkpoint and the same run, written to each, timed in one process.

The bucket is a real GCS server on 127.0.0.1 (fake-gcs-server from the `test` extra, storing its objects on the
same disk as the local side), reached as a pod reaches Cloud Storage: gcsfs for our files, TensorStore's GCS
driver for Orbax's arrays. What it measures is soft-jax's own overhead on a bucket (requests, uploads whole,
composes for appends, the lease), not a network: a real bucket adds its latency and bandwidth on top.

1. A round checkpoint of SmolLM2-135M (float32, 135M parameters, what `soft-jax run` saves after each round):
   `StepCheckpointer.save` and `.restore`, `--repeat` times each way, alternating disk and bucket; medians.
2. A whole tiny round (configs/tiny.py, rounds=1: generation, scoring, SFT with step checkpoints, evaluation,
   metrics, TensorBoard events, report), in this process, the programs compiled by a first untimed run;
   `--repeat` runs alternating disk and bucket; medians.

Prints the seconds and the ratio bucket / disk (target: at most 1.5).

    JAX_PLATFORMS=cpu python benchmarks/storage.py [--repeat 3]
    JAX_PLATFORMS=cpu python benchmarks/storage.py --skip-round --data-file-mib 0,16,32,64   # Orbax's data files
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from common import cpu_model, markdown_table  # noqa: E402 - beside this file (sys.path above)
from helpers import GCSServer  # noqa: E402 - the tests' GCS server (fake-gcs-server binary from the test extra)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def checkpoint_rows(local: str, bucket: str, repeat: int, data_file_mib: int) -> list[dict]:
    import jax
    import numpy as np

    from soft_jax import models
    from soft_jax.rounds.loop import round_state
    from soft_jax.training import checkpoints
    from soft_jax.training.checkpoints import StepCheckpointer

    if data_file_mib >= 0:  # 0: Orbax's own default (2 GiB on disk, 400 MiB on GCS)
        checkpoints.DATA_FILE_BYTES = data_file_mib * 2**20 or None
    files = f"{data_file_mib} MiB data files" if data_file_mib > 0 else "Orbax's default data files" \
        if data_file_mib == 0 else f"{checkpoints.DATA_FILE_BYTES >> 20} MiB data files"

    model, _ = models.load("smollm2-135m", dtype="float32", progress=False)
    state = round_state(model)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    times = {(where, op): [] for where in ("disk", "bucket") for op in ("save", "restore")}
    for i in range(repeat + 1):  # the first pair warms both paths (Orbax's and TensorStore's setup); not counted
        for where, root in (("disk", local), ("bucket", bucket)):
            ckpt = StepCheckpointer(f"{root}/ckpt{data_file_mib}-{i}", every=0, keep=None)
            save = timed(lambda: ckpt.save(1, state, {"round": 1}))
            restored = []
            restore = timed(lambda: restored.append(ckpt.restore(1, state)))
            leaf = jax.tree.leaves(state)[0]
            np.testing.assert_array_equal(np.asarray(jax.tree.leaves(restored[0][0])[0]), np.asarray(leaf))
            ckpt.manager.close()
            if i:
                times[(where, "save")].append(save)
                times[(where, "restore")].append(restore)
    rows = []
    for op in ("save", "restore"):
        disk, gcs = statistics.median(times[("disk", op)]), statistics.median(times[("bucket", op)])
        rows.append({"what": f"SmolLM2-135M round checkpoint {op} ({nbytes / 2**20:.0f} MiB; {files})",
                     "disk s": f"{disk:.2f}", "bucket s": f"{gcs:.2f}", "bucket / disk": f"{gcs / disk:.2f}",
                     "MiB/s disk / bucket": f"{nbytes / 2**20 / disk:.0f} / {nbytes / 2**20 / gcs:.0f}"})
    return rows


def round_rows(local: str, bucket: str, repeat: int) -> list[dict]:
    from soft_jax.experiment import config as config_lib
    from soft_jax.rounds import loop

    configs = os.path.join(os.path.dirname(HERE), "configs")
    config = config_lib.load(os.path.join(configs, "tiny.py"), ["rounds=1", "check_contamination=false",
                                                                "train.checkpoint_every=2", "progress=false"])
    loop.run(config, f"{local}/warm", log=lambda _: None)  # compiles every program once
    times = {"disk": [], "bucket": []}
    for i in range(repeat):
        for where, root in (("disk", local), ("bucket", bucket)):
            times[where].append(timed(lambda: loop.run(config, f"{root}/run{i}", log=lambda _: None)))
    disk, gcs = statistics.median(times["disk"]), statistics.median(times["bucket"])
    return [{"what": "a whole tiny round (configs/tiny.py, rounds=1), compiled", "disk s": f"{disk:.2f}",
             "bucket s": f"{gcs:.2f}", "bucket / disk": f"{gcs / disk:.2f}", "MiB/s disk / bucket": "-"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-round", action="store_true")
    parser.add_argument("--data-file-mib", default="-1", help="comma-separated OCDBT data file sizes to time the "
                        "checkpoint with (0: Orbax's default; -1: soft-jax's, StepCheckpointer)")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="soft-jax-storage-bench-")
    server = GCSServer(os.path.join(scratch, "gcs")).start()
    os.environ.update(server.env())
    try:
        bucket = server.bucket()
        local = os.path.join(scratch, "disk")
        os.makedirs(local)
        rows = [r for mib in args.data_file_mib.split(",") for r in checkpoint_rows(local, bucket, args.repeat,
                                                                                    int(mib))]
        if not args.skip_round:
            rows += round_rows(local, bucket, args.repeat)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"device: CPU ({cpu_model()}); medians of {args.repeat} runs, disk and bucket alternating")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
