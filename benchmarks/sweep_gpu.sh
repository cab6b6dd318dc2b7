#!/usr/bin/env bash
# The CPU test's 2-trial sweep on GPUs: the tiny Qwen3-MoE's routing profile -> top-1 and top-2
# expert selections -> each a 2-GPU DeepSpeed ZeRO-3 fine-tune -> generation -> the scripted
# judge on 127.0.0.1 -> metrics and the sweep summary. Ray starts locally and sees the GPUs
# in CUDA_VISIBLE_DEVICES. Usage (repo root; EMMOE_DATA_DIR set):
#   CUDA_VISIBLE_DEVICES=2,3 benchmarks/sweep_gpu.sh OUT_DIR
set -euo pipefail
out=$1
mkdir -p "$out"
python -m emmoe_dist.judge.scripted_server --port 8000 > "$out/judge_server.log" 2>&1 &
server=$!
trap 'kill $server' EXIT
python -m emmoe_dist.cli.main profile --model tiny:qwen3_moe --data insecure --limit 64 \
  --out "$out/profile_tiny.json"
start=$(date +%s)
python ray_jobs/sweep_experts.py --config examples/sweep_tiny.yaml "output_dir=$out/sweep" \
  "profiles.insecure=$out/profile_tiny.json" patch.judge.base_url=http://127.0.0.1:8000/v1 \
  "${@:2}"
echo "sweep: $(( $(date +%s) - start )) s"
