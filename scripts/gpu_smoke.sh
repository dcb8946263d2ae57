#!/usr/bin/env bash
# GPU smoke checks: one line per check (PASS/FAIL/SKIP), under 10 minutes on one GPU.
#   bash scripts/gpu_smoke.sh                 # every check, on the GPUs of this machine
#   bash scripts/gpu_smoke.sh --cpu           # the checks that have a CPU form
#   bash scripts/gpu_smoke.sh --only fsdp-lora,packed-flash
# Needs the project's venv (scripts/setup.sh); vLLM and flash-attn checks are skipped
# unless those packages are installed (pip install 'ift[vllm]' flash-attn).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_V2_ENABLED=1
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
exec "$PY" scripts/gpu_smoke.py "$@"
