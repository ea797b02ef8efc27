"""launch/tpu_pod.sh, printed and not run (DRY_RUN=1): a gs:// work dir and model reach every worker's command
as given; a work dir no host could share is refused with one line."""

import os
import subprocess

import pytest
from helpers import ROOT

POD = [os.path.join(ROOT, "launch", "tpu_pod.sh"), "soft-v4", "us-central2-b", "v4-32", "configs/tiny.py"]


def pod(workdir, *extra):
    return subprocess.run(["bash", *POD, workdir, *extra], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env=dict(os.environ, DRY_RUN="1", SKIP_PLAN="1"))


def test_the_pod_launcher_takes_a_bucket_work_dir_and_model():
    p = pod("gs://my-bucket/runs/a", "--config.model.path=gs://my-bucket/models/llama")
    assert p.returncode == 0, p.stderr
    run = [line for line in p.stdout.splitlines() if line.startswith("+ ") and "soft-jax run" in line]
    assert len(run) == 1 and "--workdir gs://my-bucket/runs/a" in run[0], p.stdout
    assert "--config.model.path=gs://my-bucket/models/llama" in run[0] and "mkdir" not in run[0]
    p = pod("/mnt/shared/runs/a")  # a shared filesystem still works; the launcher creates the folder
    assert p.returncode == 0 and "mkdir -p /mnt/shared/runs/a && " in p.stdout, p.stderr


@pytest.mark.parametrize("workdir, says", [("gs:///runs/a", "give gs://BUCKET/PREFIX"),
                                           ("s3://b/runs/a", "s3:// is not supported"),
                                           ("runs/a", "give gs://BUCKET/PREFIX or an absolute path")])
def test_the_pod_launcher_refuses_a_work_dir_hosts_cannot_share(workdir, says):
    p = pod(workdir)
    assert p.returncode == 2 and p.stdout == "", p.stdout
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"tpu_pod.sh: WORKDIR {workdir}: ") and says in p.stderr
