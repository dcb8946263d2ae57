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
exec .venv/bin/python -m pytest tests/unit tests/integration tests/real_model -p no:cacheprovider --durations=15 "$@"
