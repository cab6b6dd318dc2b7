#!/usr/bin/env bash
# One call on one GPU: the fast paths against their references, then train_speed.py arm by arm
# (each in its own process), in the order given, with profiles of the torch-loop and launch arms.
#   benchmarks/train_speed_gpu.sh DATA OUT "qwen3:12:torch,launch_ft mixtral:4:launch_ft,qlora qwen3:12:before,plain" [BEFORE_SRC]
# BEFORE_SRC: a checkout of the revision the "before" arm measures (its emmoe_dist/ folder).
# ARM_TIMEOUT (seconds, default 240) caps each arm, so one stuck arm cannot cost the others.
# SKIP_CHECK=1 leaves out the fast-path check (benchmarks/fast_paths_check.py) when it has run already.
# OUT/launches/ keeps each launch's log and metrics.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
data=$1 out=$2 specs=$3 before=${4:-}
mkdir -p "$out/profiles"
[[ ${SKIP_CHECK:-0} == 1 ]] || python3 benchmarks/fast_paths_check.py --out "$out/fast_paths_check.json"
for spec in $specs; do
  IFS=: read -r shape layers arms <<<"$spec"
  for arm in ${arms//,/ }; do
    echo "=== $shape $layers layers: $arm ($(date +%T))"
    if [[ $arm == before ]]; then export EMMOE_BEFORE_SRC=$before; else unset EMMOE_BEFORE_SRC; fi
    timeout "${ARM_TIMEOUT:-240}" python3 benchmarks/train_speed.py --shape "$shape" --layers "$layers" \
      --data-dir "$data" --arms "$arm" --profile "$out/profiles" --out "$out/train_speed.json"
    if [[ $arm == launch_ft || $arm == qlora ]]; then
      tail -n 25 /tmp/emmoe_bench/"${shape}"_*/launch.log 2>/dev/null | grep -v -i warn
      # Kept with the results: a launch stopped by its cap still leaves its log and the steps
      # it finished (the arm's row is then missing from train_speed.json).
      mkdir -p "$out/launches"
      for run in /tmp/emmoe_bench/"${shape}"_*/; do
        name=$(basename "$run")
        cp "$run/launch.log" "$out/launches/$name.log" 2>/dev/null
        cp "$run/run/metrics.jsonl" "$out/launches/$name.metrics.jsonl" 2>/dev/null
      done
    fi
  done
done
cat "$out"/profiles/*.md > "$out/profiles.md" 2>/dev/null && rm -r "$out/profiles"
python3 - "$out/train_speed.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["runs"]:
    print(f"{r['shape']:8} {r['layers']:3} {r['arm']:12} tok/s {r.get('tok_s', 0):9.0f}  MFU {100 * r.get('mfu', 0):5.1f}%  peak {r.get('peak_gib', 0):5.1f} GiB  {r.get('error', '')}")
PY
