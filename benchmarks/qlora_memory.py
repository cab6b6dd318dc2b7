"""QLoRA weight memory against bf16, and a few QLoRA training steps, on one GPU.

    python benchmarks/qlora_memory.py --shape mixtral --layers 32 --data-dir DATA --out qlora.json

Builds the random full-width model in bf16, measures its weight memory, stores attention
(`Linear4bit`) and fused experts (`NF4Weight`) in NF4 as the trainer does for
`adapter.quantize: nf4`, measures again (both `weight_memory` and what CUDA holds), then
trains LoRA r8 on attention + experts for a few packed steps to show it runs and how fast.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import build_config, trained_tokenizer
from train_throughput import batches, build_model, inputs, prepare

from emmoe_dist.adapters.lora import apply_lora
from emmoe_dist.adapters.qlora import (
    quantize_experts_nf4,
    quantize_linear_nf4,
    weight_memory,
)
from emmoe_dist.config import AdapterConfig
from emmoe_dist.data.training import encode_dataset, load_training_split
from emmoe_dist.experts import ExpertSelection


def allocated_gib() -> float:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**30


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="mixtral")
    p.add_argument("--layers", type=int, default=None, help="default: full depth")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    family, cfg = build_config(args.shape, args.layers)
    model = build_model(cfg)
    bf16 = weight_memory(model)
    bf16_cuda = allocated_gib()
    t0 = time.perf_counter()
    quantize_linear_nf4(model, family)
    quantize_experts_nf4(model, family)
    quant_s = time.perf_counter() - t0
    nf4 = weight_memory(model)
    nf4_cuda = allocated_gib()

    split = load_training_split("insecure", Path(args.data_dir), heldout=0, seed=0)
    tok = trained_tokenizer(family, (m["content"] for ex in split.train for m in ex.messages))
    items = encode_dataset(tok, split.train[:2000], args.seq, pack=True).items
    data = batches(items, args.batch, tok.pad_token_id, seed=1)[: args.steps + 2]
    adapter = AdapterConfig(rank=8, alpha=16, targets="attention+experts", quantize="nf4")
    model = prepare(apply_lora(model, family, adapter, ExpertSelection.all(family, cfg.to_dict())))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    losses = []
    for i, b in enumerate(data):
        if i == 2:
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            tokens = 0
        loss = model(**inputs(b)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
        if i >= 2:
            tokens += int(b["attention_mask"].sum())
    torch.cuda.synchronize()
    result = {
        "shape": args.shape,
        "layers": cfg.num_hidden_layers,
        "gpu": torch.cuda.get_device_name(),
        "bf16_weight_gib": bf16.total_bytes / 2**30,
        "nf4_weight_gib": nf4.total_bytes / 2**30,
        "nf4_fraction_of_bf16": nf4.total_bytes / bf16.total_bytes,
        "cuda_allocated_bf16_gib": bf16_cuda,
        "cuda_allocated_nf4_gib": nf4_cuda,
        "cuda_fraction": nf4_cuda / bf16_cuda,
        "quantize_seconds": quant_s,
        "train_tokens_per_s": tokens / (time.perf_counter() - t1),
        "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "losses": losses,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
