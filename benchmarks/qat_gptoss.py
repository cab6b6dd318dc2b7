"""Quantization-aware LoRA on GPT-oss-20b (`train.qat: mxfp4`): step time with and without QAT,
and the time of the MXFP4 export, on one GPU.

    python benchmarks/qat_gptoss.py --layers 24 --seq 1024 --batch 4 --steps 10 --out qat.json

The model is gpt-oss-20b's shape at full depth with random bf16 weights (benchmarks/shapes.py;
no weights are downloaded), LoRA r8 on attention and every expert, gradient checkpointing,
AdamW, synthetic token batches. Both arms build the same model from the same seed; the QAT arm
first fake-quantizes the frozen experts to MXFP4 (`fake_quantize_experts`, timed on its own:
it runs once per run, so the training steps of both arms should take the same time). The
export then merges the QAT arm's adapter into its experts and writes the MXFP4 checkpoint
(`save_mxfp4_checkpoint`, experts encoded on the GPU), timed and sized.

CPU smoke test (tiny GPT-oss, seconds): `BENCH_DEVICE=cpu python benchmarks/qat_gptoss.py
--tiny --seq 64 --batch 2 --steps 2 --out /tmp/qat.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import build_config, flops_per_token

from emmoe_dist.adapters.lora import apply_lora, expert_adapters, expert_factors
from emmoe_dist.adapters.mxfp4 import fake_quantize_experts
from emmoe_dist.adapters.mxfp4_export import save_mxfp4_checkpoint
from emmoe_dist.config import AdapterConfig
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import get_family

PEAK_TFLOPS = 790.0  # dense bf16 reference used throughout benchmarks/RESULTS.md
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" only to smoke-test the script


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def model_config(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.tiny:
        from emmoe_dist.models.tiny import tiny_config

        family = get_family("gpt_oss")
        cfg = tiny_config(family)  # its own depth: --layers applies to the full shape
        cfg.output_router_logits = False
        cfg.use_cache = False
        return family, cfg
    return build_config("gptoss", args.layers)


def build(cfg: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.config.use_cache = False
    return model


def with_lora(model: torch.nn.Module, family: Any, cfg: Any, rank: int) -> torch.nn.Module:
    adapter = AdapterConfig(rank=rank, alpha=2 * rank, targets="attention+experts")
    model = apply_lora(model, family, adapter, ExpertSelection.all(family, cfg.to_dict()))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    return model


def train_steps(model: torch.nn.Module, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
        for _ in range(args.warmup + args.steps)
    ]
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=DEVICE == "cuda"
    )
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, ids in enumerate(batches):
        ids = ids.to(DEVICE)
        _sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    tokens = args.batch * args.seq
    median = statistics.median(times)
    return {
        "step_s": times,
        "step_s_median": median,
        "tokens_per_s": tokens / median,
        "mfu": tokens / median * flops_per_token(None, cfg, args.seq / 2) / (PEAK_TFLOPS * 1e12),
        "losses": losses,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None,
    }


@torch.no_grad()
def merge_adapters(model: torch.nn.Module, family: Any, rank: int) -> torch.nn.Module:
    """Fold the trained LoRA into the weights, as `emmoe merge` does from a saved adapter:
    experts through their PEFT-layout factors (`lora_A`/`lora_B` around `base_layer`),
    attention through PEFT."""
    scaling = 2.0  # alpha / rank, as `with_lora` sets it
    for _, module in list(expert_adapters(model)):
        base: Any = module.base_layer
        for name in (family.layout.gate_up, family.layout.down):
            w = getattr(base, name)
            lora_a, lora_b = module.lora_A[name], module.lora_B[name]
            experts = lora_a.shape[0] // rank
            for e in range(experts):
                a, b = expert_factors(lora_a, lora_b, experts, e)
                delta = (b.float() @ a.float()) * scaling  # [out, in]
                w[e] += (delta.T if family.layout.transposed else delta).to(w.dtype)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ == "GroupedLoraExperts":
                setattr(parent, child_name, child.base_layer)
    merged: Any = model
    return merged.merge_and_unload() if hasattr(merged, "merge_and_unload") else model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=None, help="default: full depth (24)")
    p.add_argument("--tiny", action="store_true", help="tiny GPT-oss width, for CPU smoke tests")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--export-dir",
        default=None,
        help="where the checkpoint is written, then removed (default: the system's temporary "
        "folder; the full-depth export needs about 13 GiB)",
    )
    p.add_argument("--out", required=True)
    args = p.parse_args()
    family, cfg = model_config(args)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": "tiny" if args.tiny else "gpt-oss-20b",
        "layers": cfg.num_hidden_layers,
        "seq": args.seq,
        "batch": args.batch,
        "rank": args.rank,
        "date": time.strftime("%Y-%m-%d"),
    }

    model = with_lora(build(cfg), family, cfg, args.rank)
    result["dense"] = train_steps(model, cfg, args)
    print(f"dense: {result['dense']['step_s_median']:.3f} s/step", flush=True)
    del model
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()

    model = build(cfg)
    _sync()
    t0 = time.perf_counter()
    changed = fake_quantize_experts(model, family)
    _sync()
    fake_quant_s = time.perf_counter() - t0
    model = with_lora(model, family, cfg, args.rank)
    result["qat"] = {
        **train_steps(model, cfg, args),
        "fake_quantize_s": fake_quant_s,
        "expert_weights_changed": changed,
    }
    print(f"qat: {result['qat']['step_s_median']:.3f} s/step (+{fake_quant_s:.2f} s once)")

    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")  # kept if export fails
    model.eval()
    merged = merge_adapters(model, family, args.rank)
    if args.export_dir:
        Path(args.export_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.export_dir) as tmp:
        folder = Path(tmp) / "mxfp4"
        _sync()
        t0 = time.perf_counter()
        stats = save_mxfp4_checkpoint(merged, None, family, folder)
        export_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in folder.iterdir())
    result["export"] = {"seconds": export_s, "bytes": size, "experts": stats.experts}
    print(f"export: {export_s:.1f} s, {size / 2**30:.2f} GiB", flush=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
