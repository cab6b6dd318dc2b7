"""The three ways to run vLLM for a generation job, on the same engine and samples (CPU):

    .venv-vllm/bin/python benchmarks/generate_routes_cpu.py --data-dir DATA --out routes.json

- in-process: `emmoe generate --backend vllm` (one `vllm.LLM` in the calling process);
- Ray Data: `--ray-data-replicas 1` (rows through an engine actor, results streamed back);
- Ray Serve: `emmoe serve`'s OpenAI route, one chat completion per sample with its seed, sent
  by the `openai` client with `--concurrency` requests in flight.

A tiny random Qwen3-MoE saved to disk (vLLM's CPU build), the core questions, `--samples`
per question, at most `--new-tokens` each, the same seeds on every route. Reported per route:
seconds to start (engine, endpoint), seconds, samples/s and generated tokens/s to generate
once started (the Ray Data route starts its engine actor inside that time). Each route runs alone; the numbers compare routing
overheads on one engine replica, not what a cluster of replicas would reach.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENGINE = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "seed": 0}


def _cfg(model: Path, args: argparse.Namespace) -> Any:
    from emmoe_dist.config import load_config

    return load_config(
        None,
        [
            f"model.name_or_path={model}",
            f"data.dir={args.data_dir}",
            f"eval.limit={args.questions}",
            f"eval.samples_per_question={args.samples}",
            f"eval.max_new_tokens={args.new_tokens}",
            "eval.backend=vllm",
        ],
    )


def _run_generator(make: Any, model: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from emmoe_dist.generate.runner import load_suites, run_generation
    from emmoe_dist.generate.sources import resolve_source

    cfg = _cfg(model, args)
    t0 = time.perf_counter()
    gen = make()
    started = time.perf_counter() - t0
    arrivals: list[tuple[float, int]] = []  # (time, samples) of every batch handed back
    inner = gen.generate

    def timed(requests: Any, options: Any) -> Any:
        for batch in inner(requests, options):
            arrivals.append((time.perf_counter(), len(batch)))
            yield batch

    gen.generate = timed  # type: ignore[method-assign]
    try:
        summary = run_generation(
            cfg,
            gen,
            gen.tokenizer,
            resolve_source(cfg),
            load_suites(cfg, ["core"]),
            out,
            progress=False,
        )
    finally:
        gen.close()
    from emmoe_dist.files import read_jsonl
    from emmoe_dist.records import GenerationRecord

    tokens = sum(r.n_answer_tokens for r in read_jsonl(out, GenerationRecord))
    result = {
        "start_s": started,
        "generate_s": summary.seconds,
        "samples": summary.written,
        "tokens": tokens,
        "batches": len(arrivals),
    }
    if len(arrivals) > 1:  # the rate once the first batch is back (engines started)
        after = sum(n for _, n in arrivals[1:])
        result["after_first_batch_samples_per_s"] = after / (arrivals[-1][0] - arrivals[0][0])
    return result


async def _serve_requests(url: str, prompts: list[tuple[list[dict[str, str]], int]], args: Any):
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(args.concurrency)

    async def one(messages: list[dict[str, str]], seed: int) -> int:
        async with gate:
            reply = await client.chat.completions.create(
                model="tiny",
                messages=messages,  # type: ignore[arg-type]
                n=1,
                temperature=1.0,
                max_tokens=args.new_tokens,
                seed=seed,
            )
            return reply.usage.completion_tokens if reply.usage else 0

    tokens = await asyncio.gather(*(one(m, s) for m, s in prompts))
    await client.close()
    return sum(tokens)


def _serve(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    from emmoe_dist.generate.prompts import chat_messages, effective_system_prompt, sample_seed
    from emmoe_dist.generate.runner import load_suites
    from emmoe_dist.generate.vllm_backend import VllmEngineOptions
    from emmoe_dist.serve.app import ServedModel, ServeOptions, serving

    cfg = _cfg(model, args)
    (suite,) = load_suites(cfg, ["core"]).suites
    prompts = []
    for q in suite.questions[: args.questions]:
        system = effective_system_prompt(q.system, cfg.eval.system_prompt)
        for p, text in enumerate(q.paraphrases):
            for s in range(args.samples):
                seed = sample_seed(cfg.seed, "core", q.id, p, s)
                prompts.append((chat_messages(text, system), seed))
    options = ServeOptions(port=args.port, engine=VllmEngineOptions(**ENGINE))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    with serving([ServedModel(name="tiny", path=str(model))], options, num_cpus=4) as url:
        started = time.perf_counter() - t0
        t1 = time.perf_counter()
        tokens = asyncio.run(_serve_requests(url, prompts, args))
        seconds = time.perf_counter() - t1
    return {"start_s": started, "generate_s": seconds, "samples": len(prompts), "tokens": tokens}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--routes", default="in_process,ray_data,serve")
    p.add_argument("--batch-rows", type=int, default=128, help="Ray Data rows per engine call")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from emmoe_dist.families import FAMILIES
    from emmoe_dist.generate.ray_data_backend import RayDataGenerator
    from emmoe_dist.generate.vllm_backend import VllmEngineOptions, VllmGenerator
    from emmoe_dist.models.tiny import save_tiny

    engine = VllmEngineOptions(**ENGINE)  # type: ignore[arg-type]
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny(FAMILIES["qwen3_moe"], Path(tmp) / "tiny", seed=0)
        for route in args.routes.split(","):
            out = Path(tmp) / f"{route}.jsonl"
            if route == "in_process":
                r = _run_generator(lambda: VllmGenerator(model, engine=engine), model, args, out)
            elif route == "ray_data":
                ray.init(num_cpus=4, log_to_driver=False)
                try:
                    r = _run_generator(
                        lambda: RayDataGenerator(
                            model, engine=engine, replicas=1, batch_rows=args.batch_rows
                        ),
                        model,
                        args,
                        out,
                    )
                finally:
                    ray.shutdown()
            elif route == "serve":
                r = _serve(model, args)
            else:
                raise SystemExit(f"unknown route {route}")
            r["samples_per_s"] = r["samples"] / r["generate_s"]
            r["tokens_per_s"] = r["tokens"] / r["generate_s"]
            results[route] = r
            print(json.dumps({route: r}), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
