#!/usr/bin/env bash
# soft-jax on one NVIDIA GPU: a thin wrapper around `soft-jax run` with XLA's GPU settings.
#
#   pip install . "jax[cuda12]>=0.10,<0.11"      # or jax[cuda13] with a CUDA 13 driver
#   launch/gpu.sh configs/soft_plus.py runs/sp7b --config.model.name=llama2-7b \
#       --config.model.path=/ckpt/Llama-2-7b-hf --config.model.dtype=bfloat16 --config.train.remat=true
#
# Environment: DRY_RUN=1 prints the command and stops; GPU=N picks the device (default: $CUDA_VISIBLE_DEVICES,
# else 0); XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9: the share of GPU memory jax preallocates);
# XLA_FLAGS is added to.
set -euo pipefail

usage() {
  echo "usage: ${0##*/} CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]   (DRY_RUN=1: print only; GPU=N)" >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
config=$1 workdir=$2
shift 2
[[ -f ${config%%:*} ]] || { echo "${0##*/}: no config file ${config%%:*}; give one like configs/soft_plus.py" >&2; exit 2; }
for arg in "$@"; do
  [[ $arg == --config.*=* ]] || { echo "${0##*/}: override '$arg' is not --config.KEY=VALUE" >&2; exit 2; }
done
gpu=${GPU:-${CUDA_VISIBLE_DEVICES:-0}}
[[ $gpu =~ ^[0-9]+$ ]] || { echo "${0##*/}: one GPU only: GPU=$gpu is not a device index" >&2; exit 2; }

export CUDA_VISIBLE_DEVICES=$gpu
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# Overlaps collectives with compute (a no-op on one device, kept so a multi-GPU edit starts right).
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"

cmd=(soft-jax run --config "$config" --workdir "$workdir" "$@")
printf '+ CUDA_VISIBLE_DEVICES=%s XLA_PYTHON_CLIENT_MEM_FRACTION=%s XLA_FLAGS=%q' "$CUDA_VISIBLE_DEVICES" \
  "$XLA_PYTHON_CLIENT_MEM_FRACTION" "$XLA_FLAGS"
printf ' %q' "${cmd[@]}"
printf '\n'
[[ ${DRY_RUN:-0} == 1 ]] && exit 0
command -v soft-jax >/dev/null || { echo "${0##*/}: soft-jax is not installed here; run: pip install ." >&2; exit 2; }
# the interpreter soft-jax was installed with (its console script's shebang) must see a GPU
py=$(sed -n '1s/^#!//p' "$(command -v soft-jax)")
if [[ $py == *python* ]] && ! "$py" -c 'import sys, jax; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "${0##*/}: jax sees no GPU (device $gpu); install its CUDA build: pip install \"jax[cuda12]>=0.10,<0.11\"" \
    "(or jax[cuda13] for a CUDA 13 driver), and check nvidia-smi" >&2
  exit 2
fi
exec "${cmd[@]}"
