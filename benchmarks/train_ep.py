"""Expert parallelism against plain ZeRO-3: fine-tuning throughput on the GPUs of one host.

    deepspeed --num_gpus 2 benchmarks/train_ep.py --shape qwen3 --layers 48 --data-dir DATA \
        --out benchmarks/results/train_ep_qwen3_l48.json
    BENCH_DEVICE=cpu DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/train_ep.py \
        --shape tiny:qwen3_moe --seq 256 --batch 2 --steps 2 --data-dir DATA --out r.json

Both arms run in the same launch, one after the other, on the same random full-width model
(the emmoe arm of train_throughput.py: factored expert LoRA r8 on attention + experts, bf16,
gradient checkpointing, packed real examples) and on the same micro-batches (each rank its
own, so the global batch is `--batch` x ranks):

- zero3: `ds_configs/zero3.json`, every MoE block's experts gathered whole on every rank;
- zero3_ep: `ds_configs/zero3_ep.json` with `--ep-size` (default: all ranks), each rank
  holding E/ep experts and exchanging tokens by all-to-all.

Reported per arm: tokens/s (all ranks), MFU, memory per GPU (resident after setup, peak
while training), and, from a torch.profiler trace of `--profile-steps` further steps, the
share of step time spent in all-to-all kernels and in ZeRO's all-gathers and
reduce-scatters (kernel time on the GPU, which includes waiting for the peer).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import SHAPES, build_config, flops_per_token, trained_tokenizer
from train_throughput import DEVICE, PEAK_TFLOPS, batches, emmoe_model, inputs

from emmoe_dist.config import TrainConfig
from emmoe_dist.data.training import encode_dataset, load_training_split
from emmoe_dist.parallel.ds_config import (
    ExpertParallelConfig,
    complete_ds_config,
    read_ds_config,
)
from emmoe_dist.parallel.expert_parallel import apply_expert_parallel
from emmoe_dist.parallel.runtime import Runtime, all_reduce_sum_, init_runtime, shutdown
from emmoe_dist.parallel.strategy import DeepSpeedStrategy

CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
CUDA = DEVICE == "cuda"
# Substrings of profiler event names: NCCL kernels on the GPU (all-to-all is grouped
# send/recv there), c10d ops on the CPU.
COLLECTIVES = {
    "all_to_all": ("sendrecv", "alltoall"),
    "all_gather": ("allgather",),
    "reduce_scatter": ("reducescatter", "reduce_scatter"),
}


def family_of(shape: str) -> Any:
    from emmoe_dist.families import get_family

    name = shape.removeprefix("tiny:") if shape.startswith("tiny:") else SHAPES[shape]["family"]
    return get_family(name)


def build(shape: str, layers: int, vocab_size: int) -> tuple[Any, Any]:
    """(family, config): a shape of shapes.py, or `tiny:<family>` for CPU smoke runs."""
    if shape.startswith("tiny:"):
        from emmoe_dist.models.tiny import tiny_config

        family = family_of(shape)
        cfg = tiny_config(family, vocab_size=vocab_size)  # its own depth: `layers` ignored
        cfg.output_router_logits, cfg.use_cache = False, False
        if family.dense_layers_key:
            setattr(cfg, family.dense_layers_key, [])
        return family, cfg
    return build_config(shape, layers)


def _gib(n: float) -> float:
    return n / 2**30


def _collective_seconds(prof: Any) -> dict[str, float]:
    """Seconds per collective kind in a profile: GPU kernel time on CUDA, c10d op time on CPU.

    Only one level of events is counted (kernels, or the c10d ops), so nothing counts twice.
    """
    from torch.autograd import DeviceType

    out = dict.fromkeys(COLLECTIVES, 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        if CUDA and event.device_type != DeviceType.CUDA:
            continue
        if not CUDA and not name.startswith("c10d::"):
            continue
        us = event.device_time_total if CUDA else event.cpu_time_total
        for kind, needles in COLLECTIVES.items():
            if any(n in name.replace("_base", "") for n in needles):
                out[kind] += us / 1e6
                break
    return out


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def run_arm(
    arm: str,
    ep_size: int,
    args: argparse.Namespace,
    rt: Runtime,
    family: Any,
    cfg: Any,
    mine: list[dict[str, torch.Tensor]],
) -> dict[str, Any]:
    # Memory is counted from what is allocated before the arm: DeepSpeed keeps some of an
    # earlier engine's tensors alive after `destroy()`, which must not count against this arm.
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() if CUDA else 0
    model = emmoe_model(cfg, family, rank=args.rank)
    if not CUDA:
        model.float()  # CPU smoke run: bf16 matmuls on CPU are slow and imprecise
    path = CONFIGS / ("zero3_ep.json" if arm == "zero3_ep" else "zero3.json")
    if ep_size:
        apply_expert_parallel(model, family, ExpertParallelConfig(ep_size, str(path)))
    train = TrainConfig(micro_batch_size=args.batch, grad_accum=1, lr=1e-4)
    ds = complete_ds_config(
        read_ds_config(path), file=str(path), train=train, family=family, bf16=CUDA
    )
    need = args.warmup + args.steps + args.profile_steps
    strategy = DeepSpeedStrategy(ds, rt)
    strategy.setup(model, train, need)
    del model
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() - before if CUDA else 0

    def step(b: dict[str, torch.Tensor]) -> None:
        loss = strategy.forward(**inputs(b)).loss
        strategy.backward(loss)
        strategy.step()

    totals = torch.zeros(2, dtype=torch.float64)  # tokens, tokens x mean context
    for i, b in enumerate(mine[: args.warmup + args.steps]):
        if i == args.warmup:
            _sync()
            t0 = time.perf_counter()
        step(b)
        if i >= args.warmup:
            n = float(b["attention_mask"].sum())
            ctx = float(b["position_ids"][b["attention_mask"].bool()].float().mean()) + 1
            totals += torch.tensor([n, n * ctx], dtype=torch.float64)
    _sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - before if CUDA else 0
    comm = _profile(step, mine[args.warmup + args.steps : need])
    all_reduce_sum_(totals)
    per_rank = torch.tensor([resident, peak], dtype=torch.float64, device=rt.device)
    gathered = [torch.zeros_like(per_rank) for _ in range(rt.world_size)]
    torch.distributed.all_gather(gathered, per_rank)
    tokens_s = float(totals[0]) / seconds
    mean_ctx = float(totals[1] / totals[0])
    result = {
        "ds_config": path.name,
        "ep_size": ep_size or None,
        "tokens_per_s": tokens_s,
        "tokens_per_s_per_gpu": tokens_s / rt.world_size,
        "step_time_s": seconds / args.steps,
        "mfu": tokens_s
        / rt.world_size
        * flops_per_token(family, cfg, mean_ctx)
        / (PEAK_TFLOPS * 1e12),
        "resident_memory_gib_per_gpu": [_gib(float(g[0])) for g in gathered],
        "peak_memory_gib_per_gpu": [_gib(float(g[1])) for g in gathered],
        **comm,
    }
    # Free this arm's model before the next one is built (both fit only one at a time).
    engine, strategy.engine = strategy.engine, None
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return result


def _profile(
    step: Callable[[dict[str, torch.Tensor]], None], data: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """Shares of step time in each collective over a few profiled steps (rank-local view)."""
    from torch.profiler import ProfilerActivity, profile

    if not data:
        return {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    _sync()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for b in data:
            step(b)
        _sync()
    wall = time.perf_counter() - t0  # includes the profiler's own overhead
    seconds = _collective_seconds(prof)
    return {
        "profiled_step_time_s": wall / len(data),
        **{f"{kind}_share": s / wall for kind, s in seconds.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3", help="qwen3, mixtral, or tiny:<family> (CPU)")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="micro-batch per rank")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ep-size", type=int, default=0, help="default: every rank")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--arms", default="zero3,zero3_ep")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()

    rt = init_runtime()
    split = load_training_split("insecure", Path(args.data_dir), heldout=0, seed=0)
    texts = (m["content"] for ex in split.train for m in ex.messages)
    tok = trained_tokenizer(family_of(args.shape), texts)
    family, cfg = build(args.shape, args.layers, len(tok))
    items = encode_dataset(tok, split.train, args.seq, pack=True).items
    data = batches(items, args.batch, tok.pad_token_id, seed=1)
    need = args.warmup + args.steps + args.profile_steps
    mine = data[rt.rank :: rt.world_size][:need]
    ep_size = args.ep_size or rt.world_size

    results: dict[str, Any] = {
        "shape": args.shape,
        "layers": cfg.num_hidden_layers,
        "gpus": rt.world_size,
        "gpu": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "seq": args.seq,
        "micro_batch_per_gpu": args.batch,
        "lora_rank": args.rank,
        "steps": args.steps,
        "arms": {},
    }
    for arm in args.arms.split(","):
        r = run_arm(arm, ep_size if arm == "zero3_ep" else 0, args, rt, family, cfg, mine)
        results["arms"][arm] = r
        if rt.is_main:
            print(json.dumps({arm: r}), flush=True)
            # after every arm: a later arm that runs out of time or memory loses only itself
            Path(args.out).write_text(json.dumps(results, indent=2))
    arms = results["arms"]
    if {"zero3", "zero3_ep"} <= arms.keys():
        results["ep_speedup"] = arms["zero3_ep"]["tokens_per_s"] / arms["zero3"]["tokens_per_s"]
    if rt.is_main:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(json.dumps({"ep_speedup": results.get("ep_speedup")}), flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
