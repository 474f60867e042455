#!/usr/bin/env bash
# The first-GPU check (docs/PERFORMANCE.md#gpu): our training step on the card (fp32 / bf16, SDPA / eager /
# FlashAttention, length buckets / token budget / padding-free packing, samples/s, MFU against the card's
# dense bf16 peak) and a 300-step quickstart in bf16, written to one JSON. < 8 minutes on an H100/H200.
#   scripts/gpu_check.sh [OUT.json] [options of python -m gist.analysis.gpu_check]
# Without CUDA it says what it skips and writes the machine's description only (--device cpu runs it all
# on the CPU). Uses .venv if present (make setup), else python3 with the project installed.
set -euo pipefail
OUT=$(realpath -m "${1:-gpu_check.json}")
shift || true
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} WANDB_MODE=${WANDB_MODE:-disabled} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m gist.analysis.gpu_check --out "$OUT" "$@"
