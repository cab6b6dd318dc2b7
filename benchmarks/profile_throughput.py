"""Routing-profiler throughput on a full-depth random model of a real shape (one GPU).

    python benchmarks/profile_throughput.py --shape qwen3 --batch 16 --seq 1024 \
        --examples 512 --data-dir DATA --out profile_throughput.json

Times `emmoe_dist.routing.profile_batches` (router hooks on every MoE layer, assistant-token
masks) over real `insecure.jsonl` examples, and reports tokens/s processed and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import build_config, trained_tokenizer

from emmoe_dist.data.collate import pad_batch
from emmoe_dist.data.training import encode_dataset, load_training_split
from emmoe_dist.routing import profile_batches


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3")
    p.add_argument("--layers", type=int, default=None, help="default: full depth")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    family, cfg = build_config(args.shape, args.layers)
    split = load_training_split("insecure", Path(args.data_dir), heldout=0, seed=0)
    tok = trained_tokenizer(family, (m["content"] for ex in split.train for m in ex.messages))
    items = encode_dataset(tok, split.train[: args.examples], args.seq).items
    items.sort(key=len)  # length-sorted batches: the profiler has no reason to pad more
    batches = [
        pad_batch(items[s : s + args.batch], tok.pad_token_id)
        for s in range(0, len(items), args.batch)
    ]
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    profile_batches(model, family, batches[:2], progress=False)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    counts = profile_batches(model, family, batches, progress=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    processed = sum(int(b["attention_mask"].sum()) for b in batches)
    result = {
        "shape": args.shape,
        "layers": cfg.num_hidden_layers,
        "gpu": torch.cuda.get_device_name(),
        "examples": len(items),
        "batch": args.batch,
        "seq": args.seq,
        "seconds": dt,
        "tokens_processed": processed,
        "tokens_per_s": processed / dt,
        "assistant_tokens_counted": counts.tokens,
        "counted_per_s": counts.tokens / dt,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
