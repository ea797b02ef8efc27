#!/usr/bin/env bash
# soft-jax on this machine's CPU: a thin wrapper around `soft-jax run`.
#
#   launch/cpu.sh configs/tiny.py runs/tiny
#   CPU_DEVICES=8 launch/cpu.sh configs/tiny.py runs/tiny8 --config.mesh.fsdp=8 --config.mesh.data=1
#
# Environment: DRY_RUN=1 prints the command and stops; CPU_DEVICES=N splits the CPU into N XLA devices
# (to try a mesh before renting one); XLA_FLAGS is kept and added to.
set -euo pipefail

usage() {
  echo "usage: ${0##*/} CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]   (DRY_RUN=1: print only; CPU_DEVICES=N)" >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
config=$1 workdir=$2
shift 2
[[ -f ${config%%:*} ]] || { echo "${0##*/}: no config file ${config%%:*}; give one like configs/tiny.py" >&2; exit 2; }
for arg in "$@"; do
  [[ $arg == --config.*=* ]] || { echo "${0##*/}: override '$arg' is not --config.KEY=VALUE" >&2; exit 2; }
done
if [[ -n ${CPU_DEVICES:-} ]]; then
  [[ $CPU_DEVICES =~ ^[1-9][0-9]*$ ]] || { echo "${0##*/}: CPU_DEVICES=$CPU_DEVICES is not a positive integer" >&2; exit 2; }
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$CPU_DEVICES"
fi
export JAX_PLATFORMS=cpu

cmd=(soft-jax run --config "$config" --workdir "$workdir" "$@")
printf '+ JAX_PLATFORMS=cpu%s' "${XLA_FLAGS:+ XLA_FLAGS=$(printf '%q' "$XLA_FLAGS")}"
printf ' %q' "${cmd[@]}"
printf '\n'
[[ ${DRY_RUN:-0} == 1 ]] && exit 0
command -v soft-jax >/dev/null || { echo "${0##*/}: soft-jax is not installed here; run: pip install ." >&2; exit 2; }
exec "${cmd[@]}"
