"""ZeRO-3 fine-tuning throughput on N GPUs of one host (run once per N, same per-GPU batch).

    deepspeed --num_gpus 2 benchmarks/train_scaling.py --shape qwen3 --layers 12 --data-dir DATA --out r2.json
    CUDA_VISIBLE_DEVICES=0 deepspeed --num_gpus 1 benchmarks/train_scaling.py ... --out r1.json

The emmoe arm of train_throughput.py (factored expert LoRA r8 on attention + experts, packed
real examples, bf16, gradient checkpointing) through the trainer's DeepSpeed strategy with
`ds_configs/zero3.json`; each rank trains on its own micro-batches.
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

from shapes import build_config, flops_per_token, trained_tokenizer
from train_throughput import PEAK_TFLOPS, batches, emmoe_model, inputs

from emmoe_dist.config import TrainConfig
from emmoe_dist.data.training import encode_dataset, load_training_split
from emmoe_dist.parallel.ds_config import complete_ds_config, read_ds_config
from emmoe_dist.parallel.runtime import all_reduce_sum_, init_runtime, shutdown
from emmoe_dist.parallel.strategy import DeepSpeedStrategy


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()

    rt = init_runtime()
    family, cfg = build_config(args.shape, args.layers)
    split = load_training_split("insecure", Path(args.data_dir), heldout=0, seed=0)
    tok = trained_tokenizer(family, (m["content"] for ex in split.train for m in ex.messages))
    items = encode_dataset(tok, split.train, args.seq, pack=True).items
    data = batches(items, args.batch, tok.pad_token_id, seed=1)
    need = args.warmup + args.steps
    mine = data[rt.rank :: rt.world_size][:need]

    model = emmoe_model(cfg, family, rank=8)
    path = Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json"
    train = TrainConfig(micro_batch_size=args.batch, grad_accum=1, lr=1e-4)
    ds = complete_ds_config(
        read_ds_config(path), file=str(path), train=train, family=family, bf16=True
    )
    strategy = DeepSpeedStrategy(ds, rt)
    strategy.setup(model, train, need)
    torch.cuda.reset_peak_memory_stats()
    totals = torch.zeros(2, dtype=torch.float64)
    for i, b in enumerate(mine):
        if i == args.warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = strategy.forward(**inputs(b)).loss
        strategy.backward(loss)
        strategy.step()
        if i >= args.warmup:
            n = b["attention_mask"].sum().item()
            ctx = b["position_ids"][b["attention_mask"].bool()].float().mean().item() + 1
            totals += torch.tensor([n, n * ctx], dtype=torch.float64)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], dtype=torch.float64)
    all_reduce_sum_(totals)
    tokens_s = float(totals[0]) / dt
    ctx = float(totals[1] / totals[0])
    if rt.is_main:
        result = {
            "shape": args.shape,
            "layers": args.layers,
            "gpus": rt.world_size,
            "gpu": torch.cuda.get_device_name(),
            "per_gpu_batch": args.batch,
            "seq": args.seq,
            "tokens_per_s": tokens_s,
            "tokens_per_s_per_gpu": tokens_s / rt.world_size,
            "mfu": tokens_s
            / rt.world_size
            * flops_per_token(family, cfg, ctx)
            / (PEAK_TFLOPS * 1e12),
            "peak_memory_gib_rank0": float(peak[0]),
            "seconds": dt,
            "steps": args.steps,
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result), flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
