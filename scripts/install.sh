#!/usr/bin/env bash
# Create .venv (if needed) and install emmoe-dist into it, CPU-ready.
#   scripts/install.sh            # runtime + dev tools
#   EXTRAS=dev,qlora,ray scripts/install.sh
# torch goes in first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build
# on machines that have none. Set TORCH_SPEC to choose another build (e.g. on GPU nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,qlora}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}

if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install "$TORCH_SPEC"
# DeepSpeed compiles its CUDA/C++ ops on first use instead of at install time.
DS_BUILD_OPS=0 "${pip[@]}" install -e ".[${EXTRAS}]"
# ... except the CPU communication op every CPU training run needs: built here, once, with a
# message, instead of silently inside the first run (about 3 minutes on 2 cores).
if "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then
  DS_ACCELERATOR=cpu "$VENV/bin/python" -m emmoe_dist.parallel.cpu_ops
fi
echo "installed emmoe-dist into $VENV"
