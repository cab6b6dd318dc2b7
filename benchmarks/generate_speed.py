"""Generation speed of the transformers backend before (transformers' `generate`) and after (the
continuous engine), in one call on one GPU, against the decode roofline; and a steering study.

    python benchmarks/generate_speed.py --data-dir DATA --before-tokens 150 \
        --out benchmarks/results/generate_speed.json                   # H200: full depth (48)
    python benchmarks/generate_speed.py --data-dir DATA --layers 24 --before-tokens 150 \
        --out benchmarks/results/generate_speed_h100.json              # H100 80 GB: 24 layers
    BENCH_DEVICE=cpu python benchmarks/generate_speed.py --shape tiny --data-dir DATA \
        --batches 2,4 --new-tokens 8 --steer-answers 4 --out /tmp/speed.json   # smoke test

The model is the Qwen3-30B-A3B shape (128 experts, top-8) with random bf16 weights built from
its config on the GPU. Prompts are the core questions (Betley et al.'s first-plot questions,
`DATA/emergent-misalignment/first_plot_questions.yaml`) with the evaluation's system prompt and
the chat template, tokenized by a byte-level BPE trained on the insecure training set (so they
are as long as a real tokenizer makes them). At batch B, B samples cycle over the questions,
each with its evaluation seed, at temperature 1; every sample generates exactly the run's new
tokens (`min_new_tokens` holds the stop token back), so tokens/s = B x new tokens / wall time,
prefill (and, after, the CUDA-graph capture) included.

- before: `TransformersGenerator`, today's path (left-padded batch, `generate` with the KV
  cache, which on GPUs decodes with transformers' `batched_mm` experts).
- after: `ContinuousGenerator` (slots, per-slot attention, `grouped_mm` experts, the decode
  step as one CUDA graph).

`--before-tokens` shortens the before runs (default: `--new-tokens`): a before step costs about
the same at any context length (its time goes to copying expert weights per token), so its
tokens/s hardly depends on it, and at 600 tokens the three before runs alone take about 9
minutes on an H200.

Roofline, as in RESULTS.md ("Generation throughput"): one decode step at batch B reads the
attention, router, norm and lm_head weights once and every expert that one of the B*k routed
tokens chose, E(1 - (1 - k/E)^B) experts per layer under uniform routing; `roofline_tok_s` is
B / (those bytes / HBM bandwidth), the KV cache not counted.

Steering study: 2 conditions (a direction and its same-norm random control, alpha 4 at the
middle layer) x `--steer-answers` answers each. Before: one `generate` pass per condition under
`interp.steering.steering` (what `emmoe interp steer` did); after: both conditions in one pass
of the continuous engine (`RowSteering`, every sample steered by its own condition).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import build_config, trained_tokenizer

from emmoe_dist.config import EvalConfig
from emmoe_dist.data.suites import load_suite
from emmoe_dist.generate.continuous import ContinuousGenerator
from emmoe_dist.generate.interface import SampleRequest, SamplingOptions
from emmoe_dist.generate.prompts import chat_messages, prompt_ids, render_prompt, sample_seed
from emmoe_dist.generate.transformers_backend import TransformersGenerator
from emmoe_dist.interp.steering import RowSteering, SteerCondition, random_like, steering

DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))  # "cpu": smoke test only


def hbm_bytes_per_s() -> float:
    """The GPU's memory bandwidth: RESULTS.md's 4.3 TB/s for an H200; 3.35 TB/s for an H100 SXM."""
    if DEVICE.type != "cuda":
        return 4.3e12
    name = torch.cuda.get_device_name(DEVICE)
    if "H100" in name:
        return 2.0e12 if "PCIe" in name else 3.35e12
    return 4.3e12


def build(shape: str, layers: int | None, data_dir: Path) -> tuple[Any, Any, Any]:
    """(family, model, tokenizer): random weights of `shape` and a realistic tokenizer."""
    from transformers import AutoModelForCausalLM

    from emmoe_dist.data.training import load_training_split
    from emmoe_dist.families import get_family
    from emmoe_dist.models.tiny import build_tiny

    if shape == "tiny":
        family = get_family("qwen3_moe")
        model, tokenizer = build_tiny(family, seed=0)
        return family, model.to(DEVICE), tokenizer
    family, cfg = build_config(shape, layers)
    split = load_training_split("insecure", data_dir, heldout=0, seed=0)
    tokenizer = trained_tokenizer(family, (m["content"] for ex in split.train for m in ex.messages))
    cfg.eos_token_id, cfg.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    with DEVICE:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return family, model.eval(), tokenizer


def core_prompts(tokenizer: Any, data_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(question id, prompt ids) of every core question, as `emmoe generate` renders them."""
    suite = load_suite("core", data_dir)
    system = EvalConfig().system_prompt
    out = []
    for q in suite.questions:
        text = render_prompt(tokenizer, chat_messages(q.paraphrases[0], q.system or system))
        out.append((q.id, prompt_ids(tokenizer, text)))
    return out


def requests_for(prompts: list[tuple[str, tuple[int, ...]]], n: int) -> list[SampleRequest]:
    """`n` samples cycling over the prompts, each with its evaluation seed."""
    out = []
    for i in range(n):
        qid, ids = prompts[i % len(prompts)]
        seed = sample_seed(0, "core", qid, 0, i // len(prompts))
        out.append(SampleRequest(key=f"{qid}/{i}", prompt_ids=ids, seed=seed))
    return out


def step_bytes(model: Any, batch: int) -> float:
    """Weight bytes one decode step reads at `batch` (module docstring)."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    untouched = (1 - cfg.num_experts_per_tok / cfg.num_experts) ** batch  # share of experts
    weights = _count(model.lm_head) + _count(model.model.norm)
    for layer in model.model.layers:
        weights += _count(layer)
        if hasattr(layer.mlp, "experts"):
            weights -= _count(layer.mlp.experts) * untouched
    return weights * elem


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(gen: Any, requests: list[SampleRequest], tokens: int) -> tuple[float, int]:
    """(seconds, generated tokens) of one `generate` call with every sample `tokens` long."""
    fixed = SamplingOptions(temperature=1.0, max_new_tokens=tokens, min_new_tokens=tokens)
    _sync()
    start = time.perf_counter()
    samples = [s for b in gen.generate(requests, fixed) for s in b]
    _sync()
    seconds = time.perf_counter() - start
    generated = sum(len(s.token_ids) for s in samples)
    if generated != len(requests) * tokens:
        raise RuntimeError(f"{generated} tokens generated, expected {len(requests) * tokens}")
    return seconds, generated


def warm(gen: Any, requests: list[SampleRequest]) -> None:
    timed(gen, requests, 4)


def free() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def run_batch(model: Any, tok: Any, requests: list[SampleRequest], args: Any) -> list[dict]:
    batch = len(requests)
    roofline = batch / (step_bytes(model, batch) / hbm_bytes_per_s())
    rows = []
    for path, gen, tokens in (
        ("before", TransformersGenerator(model, tok, batch_size=batch), args.before_tokens),
        ("after", ContinuousGenerator(model, tok, batch_size=batch), args.new_tokens),
    ):
        warm(gen, requests)
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats(DEVICE)
        seconds, generated = timed(gen, requests, tokens)
        row = {
            "path": path,
            "batch": batch,
            "tok_s": generated / seconds,
            "roofline_fraction": generated / seconds / roofline,
            "roofline_tok_s": roofline,
            "new_tokens": tokens,
            "seconds": seconds,
            "step_ms": 1000 * seconds / tokens,
            "peak_memory_gib": torch.cuda.max_memory_allocated(DEVICE) / 2**30
            if DEVICE.type == "cuda"
            else 0.0,
        }
        if path == "after":
            row["cuda_graphs"] = gen.graphed
        rows.append(row)
        print(json.dumps(row), flush=True)
        del gen
        free()
    return rows


def steering_study(
    family: Any, model: Any, tok: Any, prompts: list[tuple[str, tuple[int, ...]]], args: Any
) -> dict[str, Any]:
    """2 conditions x `--steer-answers` answers, one pass per condition, then one pass in all."""
    n = args.steer_answers
    layer = model.config.num_hidden_layers // 2
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(model.config.hidden_size, generator=g)
    vectors = {"direction": direction, "random": random_like(direction, seed=1)}
    alpha = 4.0
    requests = requests_for(prompts, n)
    before_gen = TransformersGenerator(model, tok, batch_size=n)
    warm(before_gen, requests)
    before_s, before_tokens = 0.0, 0
    for vector in vectors.values():
        with steering(model, family, vector, [layer], alpha):
            seconds, generated = timed(before_gen, requests, args.before_tokens)
        before_s += seconds
        before_tokens += generated
    del before_gen
    free()
    tagged = [
        SampleRequest(key=f"{c}/{r.key}", prompt_ids=r.prompt_ids, seed=r.seed, condition=c)
        for c in range(len(vectors))
        for r in requests
    ]
    conditions = [SteerCondition(v, alpha) for v in vectors.values()]
    with RowSteering(model, family, conditions, [layer]) as rows:
        after_gen = ContinuousGenerator(model, tok, batch_size=len(tagged), steering=rows)
        warm(after_gen, tagged)
        after_s, after_tokens = timed(after_gen, tagged, args.new_tokens)
        graphed = after_gen.graphed
    del after_gen
    free()
    before_rate, after_rate = before_tokens / before_s, after_tokens / after_s
    return {
        "conditions": len(vectors),
        "answers_per_condition": n,
        "layer": layer,
        "alpha": alpha,
        "before": {"passes": len(vectors), "new_tokens": args.before_tokens,
                   "seconds": before_s, "tok_s": before_rate},
        "after": {"passes": 1, "new_tokens": args.new_tokens, "seconds": after_s,
                  "tok_s": after_rate, "cuda_graphs": graphed},
        # the same answers' tokens: how much sooner the study is done
        "speedup": after_rate / before_rate,
    }  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=["qwen3", "tiny"], default="qwen3")
    p.add_argument("--layers", type=int, default=None, help="default: full depth")
    p.add_argument("--batches", default="16,64,256")
    p.add_argument("--new-tokens", type=int, default=600)
    p.add_argument("--before-tokens", type=int, default=None, help="default: --new-tokens")
    p.add_argument("--steer-answers", type=int, default=64, help="per condition; 0: skip")
    p.add_argument("--data-dir", default=os.environ.get("EMMOE_DATA_DIR"))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not args.data_dir:
        p.error("--data-dir (or EMMOE_DATA_DIR): the core questions and the tokenizer's text")
    args.before_tokens = args.before_tokens or args.new_tokens
    data_dir = Path(args.data_dir)

    import transformers

    started = time.perf_counter()
    family, model, tok = build(args.shape, args.layers, data_dir)
    prompts = core_prompts(tok, data_dir)
    batches = [int(b) for b in args.batches.split(",")]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "roofline_tok_s": max(batches) / (step_bytes(model, max(batches)) / hbm_bytes_per_s()),
        "runs": [],
        "shape": args.shape,
        "layers": model.config.num_hidden_layers,
        "dtype": str(model.dtype),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hbm_bytes_per_s": hbm_bytes_per_s(),
        "prompt_tokens": [len(ids) for _, ids in prompts],
    }
    out = Path(args.out)

    def save() -> None:  # after every run: a call stopped by its time cap keeps what it measured
        result["total_seconds"] = time.perf_counter() - started
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)

    for batch in batches:
        result["runs"] += run_batch(model, tok, requests_for(prompts, batch), args)
        save()
    if args.steer_answers:
        result["steering"] = steering_study(family, model, tok, prompts, args)
        print(json.dumps(result["steering"]), flush=True)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
