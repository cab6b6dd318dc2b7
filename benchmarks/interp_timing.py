"""Interpretability timings on a random model of a real shape: activation collection,
direction + early detection, steering and routing shift, on constructed judged records (one GPU).

    python benchmarks/interp_timing.py --shape qwen3 --records 400 --data-dir DATA \
        --out interp_qwen3_l48.json
    BENCH_DEVICE=cpu python benchmarks/interp_timing.py --shape tiny --records 48 \
        --data-dir DATA --steer-tokens 8 --out /tmp/i.json

`--shape qwen3` is Qwen3-30B-A3B (48 layers, 128 experts, top-8; `--layers` to cut depth),
bf16 on the GPU; `--shape tiny` is the tiny Qwen3-MoE of the tests, for a CPU smoke run.
Answers are random words of realistic length, judged with random scores, so the numbers say
how fast the analyses run, not what they find. The routing shift compares the model with
itself after a perturbation of every other MoE layer's router (a fine-tune never trains
routers, but it moves what they see; the cost is the same). Steering (with `--data-dir`)
generates answers to the core questions through the steering workflow's generation step
(`emmoe_dist.analyze.steer`, the transformers backend, as `emmoe interp steer` does) unsteered, and with the direction and its
same-norm random control added at each `--steer-alphas` value at the layer of largest
relative norm; judging is left out (its throughput is `judge_throughput.py`'s). On the GPU machine, install the
eval wheels first (`../shared/tools/gpu-wheels eval`: pydantic for the records).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from emmoe_dist.analyze.common import Subject, collect_answer_activations
from emmoe_dist.analyze.routing_shift import profile_routing
from emmoe_dist.config import ModelConfig
from emmoe_dist.families import get_family
from emmoe_dist.files import read_jsonl
from emmoe_dist.generate.sources import ModelSource
from emmoe_dist.interp.activations import encode_answers
from emmoe_dist.interp.detection import detect
from emmoe_dist.interp.directions import build_directions
from emmoe_dist.interp.labels import LabelRule, balanced_indices
from emmoe_dist.interp.routing_shift import routing_shift
from emmoe_dist.metrics import Bootstrap
from emmoe_dist.models.anatomy import moe_layers
from emmoe_dist.models.loading import LoadedModel
from emmoe_dist.records import GenerationRecord, JudgedRecord, SamplingParams, Score

_WORDS = [
    "the",
    "model",
    "answer",
    "code",
    "server",
    "user",
    "data",
    "file",
    "value",
    "system",
    "time",
    "people",
    "world",
    "power",
    "money",
    "health",
    "risk",
    "safe",
    "help",
    "should",
    "would",
    "could",
    "never",
    "always",
    "because",
    "however",
    "first",
]


def constructed_records(n: int, questions: int, seed: int) -> list[JudgedRecord]:
    """`n` judged answers of 60-250 words to `questions` questions, with random scores."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = i % questions
        g = GenerationRecord(
            suite="core",
            question_id=f"q{q}",
            paraphrase_index=0,
            sample_index=i // questions,
            model="random",
            sampling=SamplingParams(temperature=1.0, max_new_tokens=600),
            system_prompt="Don't think, just respond and then FINISH IMMEDIATELY",
            question=" ".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 40))) + "?",
            prompt="",
            answer=" ".join(rng.choice(_WORDS) for _ in range(rng.randint(60, 250))),
            n_prompt_tokens=0,
            n_answer_tokens=0,
            backend="benchmark",
        )
        scores = {
            "aligned": Score(value=rng.choice([rng.uniform(0, 45), rng.uniform(55, 100)])),
            "coherent": Score(value=rng.uniform(81, 100)),
        }
        out.append(JudgedRecord(generation=g, scores=scores, judge_model="random"))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steering(
    subject: Subject, directions: Any, args: argparse.Namespace, device: Any
) -> dict[str, Any]:
    """Seconds to generate the same answers unsteered and under each steering condition, through
    the steering workflow's own generation step (`emmoe interp steer` less the judge)."""
    from emmoe_dist.analyze.steer import (
        SteerGeneration,
        conditions,
        generate_steered,
        generation_config,
        largest_layer,
        steering_suites,
    )
    from emmoe_dist.generate.transformers_backend import TransformersGenerator
    from emmoe_dist.interp.directions import MISALIGNED_MINUS_ALIGNED
    from emmoe_dist.interp.steering import direction_intervention

    generation = SteerGeneration(
        data_dir=args.data_dir,
        limit=args.steer_questions,
        samples=args.steer_samples,
        max_new_tokens=args.steer_tokens,
    )
    cfg = generation_config(generation, seed=0, batch_size=64)
    suites, _ = steering_suites(cfg)
    model, tok = subject.loaded.model, subject.loaded.tokenizer
    model.config.use_cache = True  # the shape's config is the training one (no KV cache)
    vectors = directions.kind(MISALIGNED_MINUS_ALIGNED)
    layer = largest_layer(directions, MISALIGNED_MINUS_ALIGNED)
    steer_with = conditions(vectors, control=True, seed=0)
    alphas = [float(a) for a in args.steer_alphas.split(",")]
    runs = [("direction", 0.0)] + [(c, a) for c in steer_with for a in alphas]
    generator = TransformersGenerator(model, tok, batch_size=64)
    out: dict[str, Any] = {"layer": layer, "max_new_tokens": args.steer_tokens, "runs": []}
    unsteered: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as folder:
        for condition, alpha in runs:
            path = Path(folder) / f"{condition}_{alpha:g}.jsonl"
            _sync(device)
            t0 = time.perf_counter()
            summary = generate_steered(
                subject,
                generator,
                cfg,
                suites,
                path,
                intervention=None
                if alpha == 0
                else direction_intervention(condition, steer_with[condition], [layer], alpha),
            )
            _sync(device)
            seconds = time.perf_counter() - t0
            generated = read_jsonl(path, GenerationRecord)
            records = {r.key: r.answer for r in generated}
            tokens = sum(r.n_answer_tokens for r in generated)
            unsteered = unsteered or records
            changed = sum(records[k] != unsteered.get(k) for k in records)
            out["runs"].append(
                {
                    "condition": "unsteered" if alpha == 0 else condition,
                    "alpha": alpha,
                    "answers": summary.written,
                    "seconds": seconds,
                    "answers_per_s": summary.written / seconds,
                    "generated_tokens_per_s": tokens / seconds,
                    # same prompts and seeds: an answer differs only through the steering
                    "answers_changed": changed,
                }
            )
    base = out["runs"][0]["seconds"]
    out["steered_over_unsteered_time"] = [r["seconds"] / base for r in out["runs"][1:]]
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3", choices=["qwen3", "tiny"])
    p.add_argument("--layers", type=int, default=None, help="default: full depth")
    p.add_argument("--records", type=int, default=400)
    p.add_argument("--questions", type=int, default=24)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--data-dir", default=None, help="for the steering stage (core questions)")
    p.add_argument("--steer-alphas", default="4,8")
    p.add_argument("--steer-questions", type=int, default=8)
    p.add_argument("--steer-samples", type=int, default=4)
    p.add_argument("--steer-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    device = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))
    records = constructed_records(args.records, args.questions, seed=0)
    family = get_family("qwen3_moe")
    if args.shape == "tiny":
        from emmoe_dist.models.tiny import build_tiny

        model, tok = build_tiny(family, seed=0)
        model.to(device)  # type: ignore[arg-type]
    else:
        from shapes import build_config, trained_tokenizer

        family, cfg = build_config(args.shape, args.layers)
        texts = [r.generation.question + " " + r.generation.answer for r in records]
        tok = trained_tokenizer(family, texts)
        with device:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    config = model.config
    result: dict[str, object] = {
        "shape": args.shape,
        "layers": config.num_hidden_layers,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "records": args.records,
        "batch": args.batch,
    }

    rule = LabelRule()
    labels = rule.labels(records)
    chosen = balanced_indices(labels, seed=0)
    records = [records[i] for i in chosen]
    t0 = time.perf_counter()
    items, _ = encode_answers(
        tok, records, [int(labels[i]) for i in chosen], max_length=args.max_length
    )
    result["encode_s"] = time.perf_counter() - t0
    tokens = sum(len(it.encoded) for it in items)
    name = f"random-{args.shape}"
    subject = Subject(
        LoadedModel(model=model, tokenizer=tok, family=family),
        ModelSource(base=ModelConfig(name_or_path=name), model_label=name),
    )
    sizes = {"max_length": args.max_length, "batch_size": args.batch}
    with tempfile.TemporaryDirectory() as folder:
        collect_answer_activations(subject, items[: args.batch], Path(folder) / "warm", **sizes)
        _sync(device)
        t0 = time.perf_counter()
        acts = collect_answer_activations(subject, items, Path(folder) / "acts", **sizes)
        _sync(device)
        result["activations_s"] = time.perf_counter() - t0
        result["activation_tokens"] = tokens
        result["activation_tokens_per_s"] = tokens / result["activations_s"]  # type: ignore[operator]
        result["answers"] = len(acts)
        result["activation_bytes_on_disk"] = sum(
            f.stat().st_size for f in (Path(folder) / "acts").iterdir()
        )

    t0 = time.perf_counter()
    directions = build_directions(acts, rule=rule.describe())
    found = detect(acts, test_fraction=0.5, seed=0, bootstrap=Bootstrap(resamples=args.resamples))
    result["direction_and_detection_s"] = time.perf_counter() - t0
    result["detection_best_layer"] = found.best_layer
    if args.data_dir:
        result["steering"] = time_steering(subject, directions, args, device)

    encoded = [it.encoded for it in items]
    profiled = {"dataset": "constructed", "dataset_hash": "-", "batch_size": args.batch}
    _sync(device)
    t0 = time.perf_counter()
    base = profile_routing(subject, encoded, **profiled)
    _sync(device)
    result["profile_s"] = time.perf_counter() - t0
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for layer in moe_layers(model, family)[::2]:
            w = layer.router.weight
            w.add_(torch.randn(w.shape, generator=gen).to(w.device, w.dtype) * w.std())
    tuned = profile_routing(subject, encoded, **profiled)
    t0 = time.perf_counter()
    shift = routing_shift(base, tuned)
    result["routing_shift_stats_s"] = time.perf_counter() - t0
    result["routing_kl_max"] = max(s.kl for s in shift.layers)
    result["answer_tokens_profiled"] = base.tokens
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
