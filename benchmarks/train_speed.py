"""Fine-tuning speed on one GPU, side by side: plain transformers + PEFT against our paths.

    python benchmarks/train_speed.py --shape qwen3 --layers 12 --data-dir DATA --out OUT.json \
        --arms plain,torch,launch_ft [--profile OUT_DIR]

Every arm trains LoRA r8 on attention + every expert of the same random full-width model
(bf16, AdamW) on the real `insecure` examples with the same tokenizer, and counts real tokens
per second:

- plain: what a careful user writes with transformers + PEFT: the real config (head_dim 128),
  `target_parameters` on the fused experts, gradient checkpointing, and no padding: the
  examples' tokens concatenated and cut into full-length rows;
- before: the project's torch loop as it was before the fast paths (run with `--before-src`, a
  checkout of that revision, in its own process: only the API both revisions share is used);
- torch: the trainer's model as `launch/ft.py` builds it (fused expert pass, packed attention,
  fused loss, compiled layers, measured checkpointing: `train/fast_paths.py`) in a plain
  torch loop with fused AdamW, on packed examples;
- launch_ft: `deepspeed launch/ft.py --ds ds_configs/zero2_ep.json` on one rank, the model
  built from the shape's config.json with random weights (`model.init: random`);
- qlora: the same launch with `adapter.quantize: nf4` and `ds_configs/zero2_qlora.json`.

MFU = tokens/s x (4 x active parameters + causal attention at the mean context) / 790e12,
the formula of benchmarks/RESULTS.md (`shapes.flops_per_token`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if os.environ.get("EMMOE_BEFORE_SRC"):
    sys.path.insert(0, os.environ["EMMOE_BEFORE_SRC"])
else:
    sys.path.insert(0, str(ROOT))

from shapes import build_config, flops_per_token, narrow, trained_tokenizer  # noqa: E402

PEAK_TFLOPS = 790.0
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")


def mfu(family: Any, cfg: Any, tok_s: float, context: float) -> float:
    return tok_s * flops_per_token(family, cfg, context) / (PEAK_TFLOPS * 1e12)


def packed_context(items: list[Any]) -> float:
    """Mean attended context per token of packed items (positions restart per example)."""
    total = count = 0
    for it in items:
        pos = it.position_ids if it.position_ids is not None else range(len(it))
        total += sum(p + 1 for p in pos)
        count += len(it)
    return total / count


def full_rows(items: list[Any], seq: int, rows: int) -> list[torch.Tensor]:
    """The examples' tokens concatenated and cut into `rows` rows of exactly `seq` tokens."""
    stream: list[int] = []
    for it in items:
        stream.extend(it.input_ids)
        if len(stream) >= seq * rows:
            break
    return [torch.tensor(stream[i * seq : (i + 1) * seq]) for i in range(rows)]


def timed(step: Any, warmup: int, steps: int) -> tuple[list[float], float]:
    """(seconds of each of `steps` steps after `warmup`, peak GiB).

    Each step ends on the host, as a step of `launch/ft.py` does (it reads its loss), so the
    arms are compared by the same statistic: the median step, which a recompilation for a new
    packed shape does not move (a long run pays it once)."""
    cuda = DEVICE == "cuda"
    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    times = []
    for i in range(warmup, warmup + steps):
        t0 = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return times, peak


def rates(tokens: list[int], times: list[float]) -> dict[str, float]:
    """Median tokens/s over the timed steps, and the mean over their total time."""
    return {
        "tok_s": statistics.median(n / t for n, t in zip(tokens, times, strict=True)),
        "tok_s_mean": sum(tokens) / sum(times),
    }


def build(cfg: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32
        )
    model.config.use_cache = False
    return model


def arm_plain(family: Any, cfg: Any, items: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from emmoe_dist.adapters.lora import attention_regex

    model = build(cfg)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=attention_regex(family),
        target_parameters=list(family.expert_param_paths()),
        lora_dropout=0.0,
    )
    model = get_peft_model(model, lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    rows = full_rows(items, args.seq, args.batch * (args.warmup + args.steps))
    batches = [
        torch.stack(rows[i * args.batch : (i + 1) * args.batch]).to(DEVICE)
        for i in range(args.warmup + args.steps)
    ]
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=DEVICE == "cuda"
    )

    def step(i: int) -> None:
        model(input_ids=batches[i], labels=batches[i], use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, peak = timed(step, args.warmup, args.steps)
    tokens = [args.batch * args.seq] * args.steps
    return {**rates(tokens, times), "peak_gib": peak, "context": (args.seq + 1) / 2}


def _packed_batches(
    items: list[Any], args: argparse.Namespace, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    from emmoe_dist.data.collate import pad_batch

    return [pad_batch([items[i] for i in idx], pad_id) for idx in launch_order(items, args)]


def launch_order(items: list[Any], args: argparse.Namespace) -> list[list[int]]:
    """The micro-batches `launch/ft.py` trains on, step by step (its batch plan at seed 0,
    with no examples held out): every packed arm sees the same rows in the same order."""
    from emmoe_dist.train.batches import BatchPlan

    plan = BatchPlan(
        lengths=tuple(len(it) for it in items),
        micro_batch_size=args.batch,
        world_size=1,
        grad_accum=1,
        seed=0,
    )
    return [plan.micro_batches(step, 0)[0] for step in range(args.warmup + args.steps)]


def arm_before(
    family: Any, cfg: Any, items: list[Any], args: argparse.Namespace, pad_id: int
) -> dict[str, Any]:
    """Only API the earlier revision has: apply_lora, then HF's forward and loss."""
    from emmoe_dist.adapters.lora import apply_lora
    from emmoe_dist.config import AdapterConfig
    from emmoe_dist.experts import ExpertSelection

    model = build(cfg)
    adapter = AdapterConfig(rank=args.rank, alpha=2 * args.rank, targets="attention+experts")
    model = apply_lora(model, family, adapter, ExpertSelection.all(family, cfg.to_dict()))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    batches = _packed_batches(items, args, pad_id)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=DEVICE == "cuda"
    )

    def step(i: int) -> None:
        b = {k: v.to(DEVICE) for k, v in batches[i].items()}
        model(
            input_ids=b["input_ids"],
            labels=b["labels"],
            position_ids=b["position_ids"],
            use_cache=False,
        ).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = _run_arm(step, batches, args, "before")
    return out


def _run_arm(
    step: Any, batches: list[dict[str, torch.Tensor]], args: argparse.Namespace, name: str
) -> dict[str, Any]:
    times, peak = timed(step, args.warmup, args.steps)
    tokens = [int(b["attention_mask"].sum()) for b in batches[args.warmup :]]
    out: dict[str, Any] = {**rates(tokens, times), "peak_gib": peak}
    if args.profile:
        sys.path.insert(0, str(ROOT / "emmoe_dist" / "train"))
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "step_profile", ROOT / "emmoe_dist/train/step_profile.py"
        )
        assert spec is not None and spec.loader is not None
        sp = importlib.util.module_from_spec(spec)
        sys.modules["step_profile"] = sp  # dataclasses resolve their module while being built
        spec.loader.exec_module(sp)
        prof = sp.profile_step(
            lambda: step(args.warmup),
            lora_rank=args.rank,
            vocab=args.vocab,
            device=torch.device(DEVICE),
        )
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        title = f"{args.shape} {args.layers}L {name}"
        (Path(args.profile) / f"profile_{args.shape}_{name}.md").write_text(
            prof.markdown(title) + "\n"
        )
        print(prof.markdown(title), flush=True)
        out["profile"] = prof.to_json()
    return out


def arm_torch(
    family: Any, cfg: Any, items: list[Any], args: argparse.Namespace, pad_id: int
) -> dict[str, Any]:
    from emmoe_dist.adapters.lora import apply_lora
    from emmoe_dist.config import AdapterConfig
    from emmoe_dist.experts import ExpertSelection
    from emmoe_dist.models.checkpointing import checkpoint_layers
    from emmoe_dist.train.fast_paths import apply_fast_paths, to_device

    model = build(cfg)
    adapter = AdapterConfig(rank=args.rank, alpha=2 * args.rank, targets="attention+experts")
    model = apply_lora(model, family, adapter, ExpertSelection.all(family, cfg.to_dict()))
    model.enable_input_require_grads()
    device = torch.device(DEVICE)
    wrapper, fast = apply_fast_paths(
        model,
        family,
        kernels=args.kernels,
        compile=args.compile,
        device=device,
        packed=True,
        zero3=False,
    )
    checkpoint_layers(model, family, args.layers if args.checkpoint == "all" else 0)
    print(f"[bench] {fast.describe()}, checkpointing {args.checkpoint}", flush=True)
    wrapper.train()
    batches = _packed_batches(items, args, pad_id)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=DEVICE == "cuda"
    )

    def step(i: int) -> None:
        host = batches[i]
        b = {k: to_device(host[k], device) for k in ("input_ids", "labels", "position_ids")}
        wrapper(**b, **fast.batch_kwargs(host, device)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = _run_arm(
        step, batches, args, "torch" + ("" if args.checkpoint == "none" else "_ckpt_all")
    )
    out["fast_paths"] = fast.describe()
    return out


def arm_launch(
    family: Any, cfg: Any, args: argparse.Namespace, tok: Any, *, qlora: bool
) -> dict[str, Any]:
    import yaml

    variant = f"_{Path(args.ds).stem}" if args.ds else ""
    work = Path(args.workdir) / f"{args.shape}_{'qlora' if qlora else 'bf16'}{variant}"
    shutil.rmtree(work / "run", ignore_errors=True)  # a finished run would not train again
    model_dir = work / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    exp = {
        "name": f"bench-{args.shape}",
        "output_dir": str(work / "run"),
        "model": {
            "name_or_path": str(model_dir),
            "init": "random",
            "dtype": "bfloat16" if DEVICE == "cuda" else "float32",
        },
        # no held-out examples: the same rows as the other arms (`launch_order`)
        "data": {
            "train": "insecure",
            "max_length": args.seq,
            "pack": True,
            "dir": args.data_dir,
            "heldout": 0,
        },
        "seed": 0,
        "adapter": {
            "mode": "lora",
            "rank": args.rank,
            "alpha": 2 * args.rank,
            "targets": "attention+experts",
        }
        | ({"quantize": "nf4"} if qlora else {}),
        "selection": {"rule": "all"},
        "train": {
            "steps": args.warmup + args.steps,
            "micro_batch_size": args.batch,
            "lr": 1e-4,
            "gradient_checkpointing": "auto",
        }
        # the last warm-up step: the profiler's own cost stays out of the timed steps
        | ({"profile_step": args.warmup} if args.profile else {}),
        "tracking": {"backend": "none"},
    }
    (work / "exp.yaml").write_text(yaml.safe_dump(exp))
    ds = (
        Path(args.ds)
        if args.ds
        else ROOT / "ds_configs" / ("zero2_qlora.json" if qlora else "zero2_ep.json")
    )
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "1",
        "--master_port",
        str(29600 + (1 if qlora else 0)),
        str(ROOT / "launch" / "ft.py"),
        "--ds",
        str(ds),
        "--config",
        str(work / "exp.yaml"),
    ]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    # Streamed to the file as it runs: a launch stopped by a time cap still leaves its log.
    with open(work / "launch.log", "w") as log_file:
        code = subprocess.run(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT).returncode
    log = (work / "launch.log").read_text()
    if code:
        print(log[-6000:], flush=True)
        raise RuntimeError(f"launch failed ({code})")
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    timed_rows = rows[args.warmup :]
    tok_s = statistics.median(r["tokens_per_s"] for r in timed_rows)
    plan_lines = [
        ln
        for ln in log.splitlines()
        if "[emmoe]" in ln and ("plan" in ln or "kernels" in ln or "expected" in ln or "NF4" in ln)
    ]
    out: dict[str, Any] = {
        "tok_s": tok_s,
        "tok_s_mean": sum(r["tokens"] for r in timed_rows)
        / sum(r["step_time_s"] for r in timed_rows),
        "ds": ds.name,
        "peak_gib": max(r.get("peak_memory_gib", 0.0) for r in rows),
        "wall_s": time.perf_counter() - t0,
        "log": plan_lines,
    }
    prof = work / "run" / "step_profile.md"
    if prof.is_file() and args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        text = prof.read_text()
        (
            Path(args.profile)
            / f"profile_{args.shape}_{'qlora' if qlora else 'launch_ft'}_{ds.stem}.md"
        ).write_text(text)
        print(text, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=["qwen3", "mixtral", "gptoss"], required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    # a launch varies between calls over 8 steps; 16 cost 2-3 s more than 8 on an H100
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--arms", default="plain,torch,launch_ft")
    p.add_argument("--kernels", default="auto")
    p.add_argument("--compile", default="auto")
    p.add_argument("--checkpoint", choices=["none", "all"], default="none")
    p.add_argument(
        "--ds", default=None, help="the launch arms' DeepSpeed config (default: the plan's)"
    )
    p.add_argument("--profile", default=None, help="folder for per-arm profile tables")
    p.add_argument("--workdir", default="/tmp/emmoe_bench")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.compile = {"auto": "auto", "on": True, "off": False}[args.compile]

    from emmoe_dist.data.training import encode_dataset, load_training_split

    family, cfg = build_config(args.shape, args.layers)
    if os.environ.get("BENCH_TINY"):  # a CPU smoke run of the script's logic: a narrow shape
        narrow(cfg, vocab_size=4096)
    args.vocab = cfg.vocab_size
    split = load_training_split("insecure", Path(args.data_dir), heldout=0, seed=0)
    cached = Path(args.workdir) / f"tokenizer_{args.shape}"
    if cached.is_dir():  # every arm runs in its own process: train the tokenizer once
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(cached)
    else:
        texts = (m["content"] for ex in split.train for m in ex.messages)
        tok = trained_tokenizer(family, texts, vocab_size=min(32000, cfg.vocab_size))
        tok.save_pretrained(cached)
    plain_items = encode_dataset(tok, split.train, args.seq).items
    packed = encode_dataset(tok, split.train, args.seq, pack=True).items
    context = packed_context([packed[i] for idx in launch_order(packed, args) for i in idx])
    out_path = Path(args.out)
    results: dict[str, Any] = json.loads(out_path.read_text()) if out_path.is_file() else {}
    results.setdefault("runs", [])
    results.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
    )
    for arm in args.arms.split(","):
        args.arm_name = arm
        t0 = time.perf_counter()
        try:
            if arm == "plain":
                r = arm_plain(family, cfg, plain_items, args)
            elif arm == "before":
                r = arm_before(family, cfg, packed, args, tok.pad_token_id)
            elif arm in ("torch", "torch_eager", "torch_ckpt"):
                # variants: compile off, or every layer checkpointed, to price each choice
                if arm == "torch_eager":
                    args.compile = False
                if arm == "torch_ckpt":
                    args.checkpoint = "all"
                r = arm_torch(family, cfg, packed, args, tok.pad_token_id)
            elif arm in ("launch_ft", "qlora"):
                r = arm_launch(family, cfg, args, tok, qlora=arm == "qlora")
            else:
                raise SystemExit(f"unknown arm {arm}")
        except Exception as e:  # one arm's failure must not lose the others' numbers
            print(f"[bench] arm {arm} failed: {type(e).__name__}: {e}", flush=True)
            r = {"error": f"{type(e).__name__}: {e}"}
        r.setdefault("context", context)
        run = {
            "shape": args.shape,
            "layers": args.layers,
            "arm": arm,
            "seq": args.seq,
            "batch": args.batch,
        }
        run.update(r)
        if "tok_s" in r:
            run["mfu"] = mfu(family, cfg, r["tok_s"], r["context"])
        run["seconds"] = time.perf_counter() - t0
        results["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "profile"}), flush=True)
        out_path.write_text(json.dumps(results, indent=2))
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return 0


if __name__ == "__main__":
    sys.exit(main())
