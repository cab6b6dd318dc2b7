#!/usr/bin/env bash
# ZeRO-3 against ZeRO-3 + expert parallelism at full depth and width (Qwen3-30B-A3B: 48 layers;
# Mixtral-8x7B: 32 layers), the same global batch of 32 sequences x 512 tokens on every GPU
# count (micro-batch 32 / GPUs), ep_size = GPUs. One `benchmarks/train_ep.py` launch per shape
# and count; both arms run in the same launch. Usage (repo root, one host with >= max GPUs):
#   benchmarks/train_ep_scaling.sh DATA_DIR OUT_DIR [GPU_COUNTS]      # default "2 4"
set -euo pipefail
data=$1; out=$2; counts=${3:-2 4}
mkdir -p "$out"
for n in $counts; do
  for spec in "qwen3 48" "mixtral 32"; do
    set -- $spec
    tag="$1_l$2_${n}gpu"
    python -m deepspeed.launcher.runner --num_gpus "$n" --master_port $((28600 + RANDOM % 100)) \
      benchmarks/train_ep.py --shape "$1" --layers "$2" --batch $((32 / n)) \
      --warmup 2 --steps 5 --profile-steps 1 --data-dir "$data" --out "$out/ep_scaling_$tag.json" \
      > "$out/ep_scaling_$tag.log" 2>&1 || echo "FAILED $tag (see $out/ep_scaling_$tag.log)"
    grep -h '"ep_speedup"' "$out/ep_scaling_$tag.log" | sed "s/^/$tag /" || true
  done
done
