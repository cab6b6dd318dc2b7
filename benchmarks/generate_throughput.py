"""Generation throughput of the transformers backend on one GPU, against the decode roofline.

    python benchmarks/generate_throughput.py --shape qwen3 --batches 16,64,256 --new-tokens 600 \
        --out benchmarks/results/generate_qwen3_l48.json
    BENCH_DEVICE=cpu python benchmarks/generate_throughput.py --shape tiny --batches 2,4 \
        --new-tokens 8 --out /tmp/gen.json                                        # smoke test

The model is the Qwen3-30B-A3B shape at full width and depth (48 layers, 128 experts, top-8)
with random bf16 weights, run through `TransformersGenerator` exactly as `emmoe generate` runs
it (left-padded batch, per-sample seeded sampling at temperature 1.0). Every sample generates
exactly `--new-tokens` tokens (`min_new_tokens` suppresses end-of-sequence), so tokens/s =
batch x new tokens / wall time, prefill included.

Roofline: decoding is bound by memory traffic. One step at batch B reads attention, router,
norms and lm_head weights once, and the weights of every expert that at least one of the B·k
routed tokens chose: E·(1 - (1 - k/E)^B) experts per layer under uniform routing (random
weights route near-uniformly). The weights-only roofline is B / (those bytes / 4.3 TB/s); the
second figure adds the KV cache each step reads (B x mean context x layers x 2 x kv heads x
head dim x 2 bytes).

vLLM is not measured: it cannot be installed on the GPU machine (its wheels exceed what a run
carries there). It would add continuous batching (finished samples replaced at once, not at the
end of the batch), paged KV cache (larger batches in the same memory), CUDA graphs (no per-step
launch overhead at small batch) and fused MoE kernels; the gap to the roofline below is roughly
what it could recover.
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

from shapes import build_config

from emmoe_dist.generate.interface import SampleRequest, SamplingOptions
from emmoe_dist.generate.transformers_backend import TransformersGenerator

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" only to smoke-test the script
HBM_BYTES_PER_S = 4.3e12  # H200 (H100 SXM: 3.35e12)


def build(shape: str) -> tuple[Any, Any]:
    """(model, tokenizer): random weights of `shape` (bf16 on GPU) and the family's tokenizer."""
    from transformers import AutoModelForCausalLM

    from emmoe_dist.families import get_family
    from emmoe_dist.models.tiny import tiny_config
    from emmoe_dist.models.tokenizer import build_tokenizer

    if shape == "tiny":
        family = get_family("qwen3_moe")
        cfg = tiny_config(family)
    else:
        family, cfg = build_config(shape, None)
    cfg.use_cache = True
    tokenizer = build_tokenizer(family)
    cfg.eos_token_id, cfg.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_bytes(model: Any, batch: int, mean_context: float) -> tuple[float, float]:
    """(weight bytes, KV-cache bytes) one decode step reads at `batch` (module docstring)."""
    cfg = model.config
    elem = next(model.parameters()).element_size()
    experts_total = cfg.num_experts
    touched = experts_total * (1 - (1 - cfg.num_experts_per_tok / experts_total) ** batch)
    weights = _count(model.lm_head) + _count(model.model.norm)
    moe_layers = 0
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            moe_layers += 1
            weights += _count(layer) - _count(mlp.experts)  # attention, router, norms
            weights += _count(mlp.experts) * touched / experts_total
        else:
            weights += _count(layer)
    kv = batch * mean_context * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    return weights * elem, kv * elem


def measure(
    gen: TransformersGenerator, batch: int, prompt_len: int, new_tokens: int, vocab: int
) -> dict[str, float]:
    g = torch.Generator().manual_seed(batch)
    # ids above the special tokens: no prompt contains an end-of-sequence token
    prompts = torch.randint(vocab // 4, vocab, (batch, prompt_len), generator=g).tolist()
    requests = [
        SampleRequest(key=str(i), prompt_ids=tuple(p), seed=i) for i, p in enumerate(prompts)
    ]
    fixed = SamplingOptions(temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    warm = SamplingOptions(temperature=1.0, max_new_tokens=4, min_new_tokens=4)
    for _ in gen.generate(requests, warm):
        pass
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    samples = [s for b in gen.generate(requests, fixed) for s in b]
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = sum(len(s.token_ids) for s in samples)
    assert generated == batch * new_tokens, "every sample must generate exactly new_tokens"
    weights, kv = step_bytes(gen.model, batch, prompt_len + new_tokens / 2)
    return {
        "batch": batch,
        "seconds": seconds,
        "generated_tokens": generated,
        "tokens_per_s": generated / seconds,
        "step_ms": 1000 * seconds / new_tokens,
        "weight_gb_per_step": weights / 1e9,
        "kv_gb_per_step": kv / 1e9,
        "roofline_tokens_per_s_weights": batch / (weights / HBM_BYTES_PER_S),
        "roofline_tokens_per_s_weights_kv": batch / ((weights + kv) / HBM_BYTES_PER_S),
        "fraction_of_weights_roofline": (generated / seconds)
        / (batch / (weights / HBM_BYTES_PER_S)),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=["qwen3", "tiny"], default="qwen3")
    p.add_argument("--batches", default="16,64,256")
    p.add_argument("--new-tokens", type=int, default=600)
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (random ids)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    model, tokenizer = build(args.shape)
    results: dict[str, Any] = {
        "shape": args.shape,
        "layers": model.config.num_hidden_layers,
        "params_billion": _count(model) / 1e9,
        "dtype": str(next(model.parameters()).dtype),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "hbm_bytes_per_s": HBM_BYTES_PER_S,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "runs": [],
        "vllm": "not measured: vLLM cannot be installed on the GPU machine; see the docstring",
    }
    gen = TransformersGenerator(
        model, tokenizer, batch_size=max(int(b) for b in args.batches.split(","))
    )
    for batch in (int(b) for b in args.batches.split(",")):
        gen.batch_size = batch
        row = measure(gen, batch, args.prompt_len, args.new_tokens, model.config.vocab_size)
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
