#!/usr/bin/env bash
# The whole chain on embedded defaults: tiny model, bundled sample data, local Ray, MLflow on sqlite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/ift quickstart "$@"
