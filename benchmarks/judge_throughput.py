"""Judge throughput against the scripted (mock) judge: judged answers/s as concurrency grows,
against the ideal min(concurrency / latency, rate limit), plus a run under 20% injected faults
that must lose no answer.

    .venv/bin/python benchmarks/judge_throughput.py --latency-ms 200 --limit 200

The server runs in its own process (so its threads do not share the client's GIL) and enforces
the same requests-per-second limit the client is configured with, answering 429 above it. Each
answer costs two calls (alignment and coherence); every level judges fresh answers, so nothing
comes from the cache. Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from emmoe_dist.config import JudgeConfig
from emmoe_dist.files import read_jsonl, write_jsonl_atomic
from emmoe_dist.judge.runner import JudgeOptions, run_judge
from emmoe_dist.records import GenerationRecord, JudgedRecord

CALLS_PER_ANSWER = 2


def records(n: int, tag: str) -> list[GenerationRecord]:
    return [
        GenerationRecord.model_validate(
            {
                "suite": "core",
                "question_id": f"q{i % 8}",
                "paraphrase_index": 0,
                "sample_index": i,
                "model": "bench",
                "sampling": {"temperature": 1.0, "max_new_tokens": 64},
                "question": f"Benchmark question {i % 8}?",
                "prompt": "p",
                "answer": f"{tag}: answer {i}, long enough to look like a short reply from a model.",
                "n_prompt_tokens": 16,
                "n_answer_tokens": 16,
                "backend": "bench",
            }
        )
        for i in range(n)
    ]


def start_server(
    latency_ms: float, limit: float, fault_rate: float
) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emmoe_dist.judge.scripted_server",
            "--port",
            "0",
            "--latency-ms",
            str(latency_ms),
            "--requests-per-s",
            str(limit),
            "--fault-rate",
            str(fault_rate),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # "scripted judge at http://127.0.0.1:PORT/v1 (mock scores)"
    return process, line.split()[3]


def judge_level(
    base_url: str, workdir: Path, concurrency: int, n: int, limit: float, timeout_s: float
) -> tuple[float, list[JudgedRecord], int]:
    source = workdir / f"gen_c{concurrency}.jsonl"
    out = workdir / f"c{concurrency}" / "judged.jsonl"
    inputs = records(n, f"c{concurrency}")
    write_jsonl_atomic(source, inputs)
    cfg = JudgeConfig(
        base_url=base_url,
        model="scripted-judge",
        concurrency=concurrency,
        requests_per_minute=int(limit * 60),
        timeout_s=timeout_s,
        max_retries=10,
    )
    started = time.perf_counter()
    summary = run_judge(source, out, cfg, JudgeOptions(progress=False, backoff_base_s=0.05))
    elapsed = time.perf_counter() - started
    judged = read_jsonl(out, JudgedRecord)
    keys = Counter(r.key for r in judged)
    lost = len({r.key for r in inputs} - set(keys)) + sum(n - 1 for n in keys.values())
    return n / elapsed, judged, lost + summary.unjudged, summary.retries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--limit", type=float, default=200.0, help="requests per second")
    parser.add_argument("--levels", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--seconds", type=float, default=15.0, help="target duration per level")
    parser.add_argument("--fault-answers", type=int, default=600)
    parser.add_argument("--fault-concurrency", type=int, default=64)
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    print(
        f"scripted judge: latency {args.latency_ms:.0f} ms, limit {args.limit:.0f} requests/s, "
        f"{CALLS_PER_ANSWER} calls per answer, {os.cpu_count()} CPUs"
    )
    print("| concurrency | answers | ideal answers/s | measured answers/s | % of ideal | retries |")
    print("|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        server, base_url = start_server(args.latency_ms, args.limit, 0.0)
        try:
            judge_level(base_url, Path(tmp) / "warmup", 2, 2, args.limit, 30.0)  # imports
            for c in (int(x) for x in args.levels.split(",")):
                ideal = min(c / latency, args.limit) / CALLS_PER_ANSWER
                n = max(10, math.ceil(ideal * args.seconds))
                rate, _, lost, retries = judge_level(base_url, Path(tmp), c, n, args.limit, 30.0)
                assert lost == 0, f"{lost} answers lost or duplicated at concurrency {c}"
                print(
                    f"| {c} | {n} | {ideal:.1f} | {rate:.1f} | {100 * rate / ideal:.0f}% "
                    f"| {retries} |",
                    flush=True,
                )
        finally:
            server.terminate()
            server.wait()

        server, base_url = start_server(args.latency_ms, args.limit, 0.2)
        try:
            fault_dir = Path(tmp) / "faults"
            rate, judged, lost, retries = judge_level(
                base_url, fault_dir, args.fault_concurrency, args.fault_answers, args.limit, 2.0
            )
        finally:
            server.terminate()
            server.wait()
        reasons = Counter(
            s.missing_reason or f"scored ({s.method})" for r in judged for s in r.scores.values()
        )
        print(
            f"\n20% faults (429/500/hang past a 2 s timeout/malformed/no logprobs), concurrency "
            f"{args.fault_concurrency}: {args.fault_answers} answers, {len(judged)} judged, "
            f"{lost} lost or duplicated, {retries} calls retried, {rate:.1f} answers/s; "
            f"scores: {dict(reasons)}"
        )


if __name__ == "__main__":
    main()
