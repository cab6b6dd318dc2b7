#!/usr/bin/env bash
# Every adapter mode x family through the real entry point on GPUs: `launch/ft.py` under the
# DeepSpeed launcher, tiny models, a slice of insecure.jsonl, a few steps each; prints each
# run's final loss and checks the artifacts exist. Usage (from the repo root, on a GPU host):
#   benchmarks/train_modes_gpu.sh DATA_DIR OUT_DIR [NUM_GPUS]
#   CUDA_VISIBLE_DEVICES=2,3 FAMILIES="mixtral qwen3_moe" benchmarks/train_modes_gpu.sh DATA OUT
# With CUDA_VISIBLE_DEVICES set and no NUM_GPUS, the runs use exactly those GPUs (the DeepSpeed
# launcher ignores CUDA_VISIBLE_DEVICES once --num_gpus is given).
set -euo pipefail
data=$1; out=$2
if [[ -n ${3:-} || -z ${CUDA_VISIBLE_DEVICES:-} ]]; then gpus=(--num_gpus "${3:-2}"); else gpus=(); fi
run() {  # name ds_config overrides...
  local name=$1 ds=$2; shift 2
  python -m deepspeed.launcher.runner "${gpus[@]}" --master_port $((29500 + RANDOM % 1000)) \
    launch/ft.py --ds "ds_configs/$ds" "data.dir=$data" "output_dir=$out/$name" "name=$name" \
    data.limit=64 data.max_length=512 train.steps=8 train.micro_batch_size=2 tracking.backend=none "$@" \
    > "$out/$name.log" 2>&1 || { echo "FAILED $name (see $out/$name.log)"; tail -5 "$out/$name.log"; failed=$((failed + 1)); return 0; }
  python - "$out/$name" <<'PY' || failed=$((failed + 1))
import json, sys, pathlib
run = pathlib.Path(sys.argv[1]); m = json.loads((run / "manifest.json").read_text())
assert (run / m["artifact"]).is_dir(), m["artifact"]
print(f"{run.name:28s} loss {m['final_loss']:.4f}  artifact {m['artifact']}  world {m['world_size']}  device {m['device']}")
PY
}
mkdir -p "$out"
failed=0  # every run is tried; the exit status counts the failures
for fam in ${FAMILIES:-mixtral qwen3_moe gpt_oss}; do
  m="model.name_or_path=tiny:$fam"
  run "$fam-lora-all" zero3.json "$m" adapter.targets=attention+experts
  run "$fam-experts-single" zero3.json "$m" adapter.targets=experts selection.rule=single selection.expert=1
  run "$fam-full-experts" zero3.json "$m" adapter.mode=full_experts selection.rule=explicit "selection.experts={0: [1, 5]}"
  run "$fam-qlora" zero2_qlora.json "$m" adapter.quantize=nf4
  run "$fam-lora-ep" zero3_ep.json "$m" adapter.targets=attention+experts
done
exit "$failed"
