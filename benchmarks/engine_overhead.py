"""What the DeepSpeed engine adds to a LoRA step on the host, by phase, against a plain loop.

    DS_ACCELERATOR=cpu python benchmarks/engine_overhead.py --out engine_overhead.json \
        [--ds ds_configs/zero2_ep.json ...]

A narrow model (hidden 64) with the real structure of the Qwen3-30B-A3B shape at `--layers`
depth (128 experts a layer, LoRA r8 on attention + every expert: the real count of trainable
tensors) trains a few steps on random tokens, once in a plain torch loop (AdamW over the
trainable tensors) and once per DeepSpeed config through `DeepSpeedStrategy`, one rank. The
arithmetic is tiny, so each phase's time (forward, backward, optimizer step; host clock) is
what the framework costs per step, whatever the GPU; on a GPU that cost shows as idle time
whenever a step's kernels finish before the host has launched them. Also counted: the ATen
operators each phase dispatches (each one launches at least one kernel on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import build_config, narrow  # noqa: E402

PHASES = ("forward", "backward", "step")


def narrow_model(layers: int, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from emmoe_dist.adapters.lora import apply_lora
    from emmoe_dist.config import AdapterConfig
    from emmoe_dist.experts import ExpertSelection

    family, cfg = build_config("qwen3", layers)
    narrow(cfg, vocab_size=512)
    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.config.use_cache = False
    adapter = AdapterConfig(rank=8, alpha=16, targets="attention+experts")
    model = apply_lora(model, family, adapter, ExpertSelection.all(family, cfg.to_dict()))
    model.enable_input_require_grads()
    from emmoe_dist.train.fast_paths import apply_fast_paths

    # the trainer's model: one fused pass over the experts, not a Python loop over them
    wrapper, _ = apply_fast_paths(
        model,
        family,
        kernels="auto",
        compile=False,
        device=torch.device("cpu"),
        packed=False,
        zero3=False,
    )
    return family, wrapper


def count_ops(fn: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def outermost(e: Any) -> bool:
        parent = e.cpu_parent
        return parent is None or not parent.name.startswith("aten::")

    return sum(1 for e in prof.events() if e.name.startswith("aten::") and outermost(e))


def measure(
    forward: Any, backward: Any, step: Any, batches: list[torch.Tensor], warmup: int
) -> dict[str, Any]:
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    ops: dict[str, int] = {}
    for i, ids in enumerate(batches):
        t0 = time.perf_counter()
        loss = forward(ids)
        t1 = time.perf_counter()
        backward(loss)
        t2 = time.perf_counter()
        step()
        t3 = time.perf_counter()
        if i >= warmup:
            for p, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[p].append(dt)
    ids = batches[-1]
    holder: list[torch.Tensor] = []
    ops["forward"] = count_ops(lambda: holder.append(forward(ids)))
    ops["backward"] = count_ops(lambda: backward(holder[0]))
    ops["step"] = count_ops(step)
    return {
        "ms": {p: 1000 * statistics.median(v) for p, v in times.items()},
        "aten_ops": ops,
    }


def plain_arm(model: Any, batches: list[torch.Tensor], warmup: int) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return measure(
        lambda ids: model(input_ids=ids, labels=ids),
        lambda loss: loss.backward(),
        step,
        batches,
        warmup,
    )


def deepspeed_arm(
    family: Any, model: Any, ds_path: Path, batches: list[torch.Tensor], warmup: int, bf16: bool
) -> dict[str, Any]:
    from emmoe_dist.config import TrainConfig
    from emmoe_dist.parallel.ds_config import complete_ds_config
    from emmoe_dist.parallel.runtime import Runtime
    from emmoe_dist.parallel.strategy import DeepSpeedStrategy

    train = TrainConfig(micro_batch_size=batches[0].shape[0], lr=1e-4)
    raw = json.loads(ds_path.read_text())
    ds = complete_ds_config(raw, file=str(ds_path), train=train, family=family, bf16=bf16)
    runtime = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    strategy = DeepSpeedStrategy(ds, runtime)
    strategy.setup(model, train, total_steps=len(batches) + 4)
    return measure(
        lambda ids: strategy.forward(input_ids=ids, labels=ids),
        strategy.backward,
        strategy.step,
        batches,
        warmup,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ds", nargs="*", default=[str(ROOT / "ds_configs" / "zero2_ep.json")])
    p.add_argument("--bf16", action="store_true", help="bf16 weights and DeepSpeed's bf16 mode")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29711")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 64), generator=g) for _ in range(args.steps)]
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    family, model = narrow_model(args.layers, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result: dict[str, Any] = {
        "layers": args.layers,
        "bf16": args.bf16,
        "trainable_tensors": len(trainable),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "arms": {"plain": plain_arm(model, batches, args.warmup)},
    }
    print("plain", json.dumps(result["arms"]["plain"]), flush=True)
    for path in args.ds:
        _, model = narrow_model(args.layers, dtype)
        arm = deepspeed_arm(family, model, Path(path), batches, args.warmup, args.bf16)
        result["arms"][Path(path).stem] = arm
        print(Path(path).stem, json.dumps(arm), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
