"""Fine-tuning throughput on one GPU: emmoe-dist's path against plain transformers + PEFT.

    python benchmarks/train_throughput.py --shape qwen3 --layers 12 --seq 512 --batch 16 \
        --data-dir DATA --out results.json

Both arms train LoRA r8 on attention + every expert of the same random full-width model
(bf16, gradient checkpointing, AdamW) on the same real `insecure.jsonl` examples with the
same tokenizer, and count effective (non-padding) tokens per second:

- plain: PEFT `target_parameters` on the fused experts, random example order, each batch
  padded to its longest example (what a straightforward transformers + PEFT script does);
- emmoe: factored expert LoRA (`GroupedLoraExperts`, no ΔW materialised) and packed
  sequences, once in a plain torch loop and once through the DeepSpeed ZeRO-3 engine the
  trainer uses (`ds_configs/zero3.json`, one rank).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import build_config, flops_per_token, trained_tokenizer

from emmoe_dist.adapters.lora import apply_lora, attention_regex
from emmoe_dist.config import AdapterConfig, TrainConfig
from emmoe_dist.data.collate import pad_batch
from emmoe_dist.data.training import encode_dataset, load_training_split
from emmoe_dist.experts import ExpertSelection

PEAK_TFLOPS = 790.0  # dense bf16 reference used throughout benchmarks/RESULTS.md
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" only to smoke-test the script


def build_model(cfg: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    return model


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def plain_model(cfg: Any, family: Any, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = build_model(cfg)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=attention_regex(family),
        target_parameters=list(family.expert_param_paths()),
        lora_dropout=0.0,
    )
    return prepare(get_peft_model(model, lora))


def emmoe_model(cfg: Any, family: Any, rank: int) -> torch.nn.Module:
    model = build_model(cfg)
    adapter = AdapterConfig(rank=rank, alpha=2 * rank, targets="attention+experts")
    selection = ExpertSelection.all(family, cfg.to_dict())
    return prepare(apply_lora(model, family, adapter, selection))


def batches(items: list[Any], batch: int, pad_id: int, seed: int) -> list[dict[str, torch.Tensor]]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [
        pad_batch([items[i] for i in order[s : s + batch]], pad_id)
        for s in range(0, len(order) - batch + 1, batch)
    ]


def inputs(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    b = {k: v.to(DEVICE, non_blocking=True) for k, v in b.items()}
    if "position_ids" in b:  # packed: per-example positions, no mask, no cache
        return {
            "input_ids": b["input_ids"],
            "labels": b["labels"],
            "position_ids": b["position_ids"],
            "use_cache": False,
        }
    return {
        "input_ids": b["input_ids"],
        "attention_mask": b["attention_mask"],
        "labels": b["labels"],
        "use_cache": False,
    }


def run_torch(
    model: torch.nn.Module, data: list[dict[str, torch.Tensor]], warmup: int, steps: int
) -> dict[str, float]:
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=DEVICE == "cuda"
    )
    return _timed(
        data,
        warmup,
        steps,
        lambda b: (model(**inputs(b)).loss.backward(), opt.step(), opt.zero_grad()),
    )


def run_deepspeed(
    model: torch.nn.Module,
    family: Any,
    data: list[dict[str, torch.Tensor]],
    warmup: int,
    steps: int,
    batch: int,
) -> dict[str, float]:
    from emmoe_dist.parallel.ds_config import complete_ds_config, read_ds_config
    from emmoe_dist.parallel.runtime import Runtime
    from emmoe_dist.parallel.strategy import DeepSpeedStrategy

    path = Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json"
    train = TrainConfig(micro_batch_size=batch, grad_accum=1, lr=1e-4)
    ds = complete_ds_config(
        read_ds_config(path), file=str(path), train=train, family=family, bf16=True
    )
    strategy = DeepSpeedStrategy(ds, Runtime(0, 1, 0, torch.device("cuda", 0)))
    strategy.setup(model, train, warmup + steps)

    def step(b: dict[str, torch.Tensor]) -> None:
        loss = strategy.forward(**inputs(b)).loss
        strategy.backward(loss)
        strategy.step()

    return _timed(data, warmup, steps, step)


def _timed(
    data: list[dict[str, torch.Tensor]], warmup: int, steps: int, step: Any
) -> dict[str, float]:
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for b in data[:warmup]:
        step(b)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = padded = 0
    ctx = 0.0
    for b in data[warmup : warmup + steps]:
        step(b)
        n = int(b["attention_mask"].sum())
        tokens += n
        padded += b["input_ids"].numel()
        ctx += _mean_context(b) * n
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {
        "tokens_per_s": tokens / dt,
        "padding_fraction": 1 - tokens / padded,
        "mean_context": ctx / tokens,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "seconds": dt,
        "steps": steps,
    }


def _mean_context(b: dict[str, torch.Tensor]) -> float:
    """Mean attended context per token (causal: (len+1)/2 per example)."""
    if "position_ids" in b:
        pos = b["position_ids"][b["attention_mask"].bool()].float()
        return float(pos.mean()) + 1
    lengths = b["attention_mask"].sum(1).float()
    return float(((lengths + 1) / 2 * lengths).sum() / lengths.sum())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=["qwen3", "mixtral"], required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--arms", default="plain,emmoe,emmoe-zero3")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    family, cfg = build_config(args.shape, args.layers)
    split = load_training_split("insecure", Path(args.data_dir), heldout=0, seed=0)
    texts = (m["content"] for ex in split.train for m in ex.messages)
    tok = trained_tokenizer(family, texts)
    plain_items = encode_dataset(tok, split.train, args.seq).items
    packed_items = encode_dataset(tok, split.train, args.seq, pack=True).items
    need = args.warmup + args.steps
    results: dict[str, Any] = {
        "shape": args.shape,
        "layers": args.layers,
        "seq": args.seq,
        "batch": args.batch,
        "rank": args.rank,
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "examples": len(plain_items),
        "mean_example_tokens": sum(len(i) for i in plain_items) / len(plain_items),
        "arms": {},
    }
    for arm in args.arms.split(","):
        data = batches(
            plain_items if arm == "plain" else packed_items, args.batch, tok.pad_token_id, seed=1
        )[:need]
        model = (
            plain_model(cfg, family, args.rank)
            if arm == "plain"
            else emmoe_model(cfg, family, args.rank)
        )
        if arm == "emmoe-zero3":
            os.environ.update(
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT="29511",
            )
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl")
            r = run_deepspeed(model, family, data, args.warmup, args.steps, args.batch)
        else:
            r = run_torch(model, data, args.warmup, args.steps)
        r["mfu"] = (
            r["tokens_per_s"]
            * flops_per_token(family, cfg, r["mean_context"])
            / (PEAK_TFLOPS * 1e12)
        )
        results["arms"][arm] = r
        print(json.dumps({arm: r}), flush=True)
        del model
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    base = results["arms"].get("plain", {}).get("tokens_per_s")
    if base:
        results["speedup_vs_plain"] = {
            a: r["tokens_per_s"] / base for a, r in results["arms"].items()
        }
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results.get("speedup_vs_plain", {})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
