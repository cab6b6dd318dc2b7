#!/usr/bin/env bash
# The README's first command: install, then run the embedded default study on CPU with tiny
# models (profile -> select experts -> 2-rank ZeRO-3 fine-tune -> merge ...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export EMMOE_DATA_DIR=${EMMOE_DATA_DIR:-$(cd .. && pwd)/shared/data}
exec .venv/bin/emmoe demo "$@"
