#!/usr/bin/env bash
# When misalignment emerges, on CPU (examples/sweep_dynamics_tiny.yaml): a pilot (the tiny base
# model's answers, judged, and its misalignment direction), two mock judges, the sweep (2 arms x
# 2 seeds, snapshots and the monitor on), then the report over every trial and snapshot.
# The mock judges' scores are hashes, not judgments: every stage runs for real, no number means
# anything.
set -euo pipefail
cd "$(dirname "$0")/.."
export EMMOE_DATA_DIR=${EMMOE_DATA_DIR:-$(cd .. && pwd)/shared/data}
PY=${PYTHON:-.venv/bin/python}
PILOT=runs/dynamics-pilot
OUT=runs/sweeps/dynamics-tiny
A=${JUDGE_PORT_A:-8000}  # the two mock judges' ports
B=${JUDGE_PORT_B:-8001}

"$PY" -m emmoe_dist.judge.scripted_server --port "$A" &
FIRST=$!
"$PY" -m emmoe_dist.judge.scripted_server --port "$B" --jitter 15 &
SECOND=$!
trap 'kill $FIRST $SECOND' EXIT

# the pilot: 8 core questions x 16 answers of the base model, judged, and the direction from them
"$PY" -m emmoe_dist.cli.main generate --config examples/demo_tiny.yaml --suites core \
    --out "$PILOT/generations.jsonl" --no-progress \
    eval.samples_per_question=16 eval.max_new_tokens=16 eval.batch_size=32
"$PY" -m emmoe_dist.cli.main judge --records "$PILOT/generations.jsonl" --out "$PILOT/judged.jsonl" \
    --base-url "http://127.0.0.1:$A/v1" --model scripted-judge --name mock-a --no-progress
"$PY" -m emmoe_dist.cli.main interp direction --model tiny:qwen3_moe --records "$PILOT/judged.jsonl" \
    --rule betley --no-base --device cpu --out "$PILOT/interp" --no-progress

"$PY" ray_jobs/sweep_experts.py --config examples/sweep_dynamics_tiny.yaml \
    "patch.judge.base_url=http://127.0.0.1:$A/v1" \
    "patch.more_judges=[{name: mock-b, model: scripted-judge, base_url: 'http://127.0.0.1:$B/v1', concurrency: 8}]"
"$PY" -m emmoe_dist.cli.main report "$OUT/trials" --out "$OUT/report" --alignment-suites core
