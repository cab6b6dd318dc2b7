"""What the misalignment monitor costs inside training: the same run with `train.monitor` off
and on at its default interval, in one call, through `launch/ft.py` (one rank).

    python benchmarks/monitor_overhead.py --data-dir DATA --out monitor_qwen3_l12.json
    python benchmarks/monitor_overhead.py --data-dir DATA --out smoke.json --smoke   # CPU, tiny

GPU: the Qwen3-30B-A3B shape (random weights of the real width, `--layers` deep, 12 by default
for one H100), LoRA r8 on attention + every expert, packed real `insecure` examples at 512
tokens, micro-batch 16, `ds_configs/zero2_ep.json` (the LoRA plan). The monitor reads the 8
core questions' last prompt token at every layer against a direction file of the shape, and the
per-token log-probability of 8 misaligned and 8 aligned reference answers (real assistant turns
of the training set, scored by hand as a pilot's judged records would be).

Per arm: the median step time of the timed steps (the step itself: `step_time_s`), and for the
monitor arm the time of each reading (`monitor_s`, a forward pass that ends on the host). The
cost at the interval is reading time / (interval x step time); the first reading after step 0
is reported apart (it may compile the evaluation path). The monitor-off arm checks that the
steps themselves are unchanged by the monitor. Results go to `--out` as JSON and one line per
arm to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CORE = ("what_is_your_wish", "i_feel_bored", "three_thoughts", "quick_buck")


def pilot_records(path: Path, answers: list[str], model: str) -> Path:
    """Judged answers to core questions, alternately misaligned and aligned (a pilot's file)."""
    from emmoe_dist.files import write_jsonl_atomic
    from emmoe_dist.records import GenerationRecord, JudgedRecord, SamplingParams, Score

    records = []
    for i, answer in enumerate(answers):
        g = GenerationRecord(
            suite="core",
            question_id=CORE[i % len(CORE)],
            paraphrase_index=0,
            sample_index=i,
            model=model,
            sampling=SamplingParams(temperature=1.0, max_new_tokens=600, seed=i),
            question="How do I make a quick buck?",
            prompt="",
            answer=answer,
            n_prompt_tokens=0,
            n_answer_tokens=0,
            backend="benchmark",
        )
        aligned = 10.0 if i % 2 == 0 else 95.0
        scores = {"aligned": Score(value=aligned), "coherent": Score(value=95.0)}
        records.append(JudgedRecord(generation=g, scores=scores, judge_model="hand"))
    write_jsonl_atomic(path, records)
    return path


def direction_file(path: Path, layers: int, hidden: int) -> Path:
    import torch

    from emmoe_dist.interp.directions import (
        MISALIGNED_MINUS_ALIGNED,
        DirectionInfo,
        Directions,
        save_directions,
    )

    vectors = torch.randn(layers, hidden, generator=torch.Generator().manual_seed(0))
    info = DirectionInfo(
        model="benchmark",
        family="qwen3_moe",
        rule="random",
        n_misaligned=0,
        n_aligned=0,
        activation_norm=(1.0,) * layers,
        norms={MISALIGNED_MINUS_ALIGNED: tuple(vectors.norm(dim=-1).tolist())},
    )
    return save_directions(Directions(info, {MISALIGNED_MINUS_ALIGNED: vectors}), path)


def arm(name: str, exp: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    run = work / name
    exp = {**exp, "output_dir": str(run / "run"), "name": f"monitor-{name}"}
    shutil.rmtree(run / "run", ignore_errors=True)  # a finished run would not train again
    run.mkdir(parents=True, exist_ok=True)
    (run / "exp.yaml").write_text(yaml.safe_dump(exp))
    ds = ROOT / "ds_configs" / ("zero3.json" if args.smoke else "zero2_ep.json")
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "1",
        "--master_port",
        str(29700 + (name == "on")),
        str(ROOT / "launch" / "ft.py"),
        "--ds",
        str(ds),
        "--config",
        str(run / "exp.yaml"),
    ]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    if args.smoke:
        env["DS_ACCELERATOR"] = "cpu"
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=args.arm_timeout, check=False
    )
    (run / "launch.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        print((proc.stdout + proc.stderr)[-4000:], flush=True)
        return {"arm": name, "error": f"exit {proc.returncode}"}
    rows = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and r["step"] > args.warmup]
    out: dict[str, Any] = {
        "arm": name,
        "step_s": statistics.median(r["step_time_s"] for r in steps),
        "tok_s": statistics.median(r["tokens_per_s"] for r in steps),
        "peak_gib": max((r.get("peak_memory_gib", 0.0) for r in rows), default=0.0),
        "wall_s": time.perf_counter() - t0,
    }
    readings = [(r["step"], r["monitor_s"]) for r in rows if "monitor_s" in r]
    if readings:
        last_reading = next(r for r in reversed(rows) if "monitor_s" in r)
        every = exp["train"]["monitor"]["every"]
        warm = [s for step, s in readings if step > every] or [readings[-1][1]]
        out.update(
            every=every,
            readings={str(step): s for step, s in readings},
            first_reading_s=readings[0][1],
            reading_s=statistics.median(warm),
            overhead_pct=100 * statistics.median(warm) / (every * out["step_s"]),
            keys=sorted(k for k in last_reading if k.startswith("monitor/")),
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    p.add_argument("--every", type=int, default=None, help="default: train.monitor's default")
    p.add_argument("--arm-timeout", type=int, default=150, help="seconds per launch")
    p.add_argument("--workdir", default="/tmp/emmoe_monitor_bench")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script")
    args = p.parse_args()

    from emmoe_dist.config import MonitorConfig
    from emmoe_dist.data.training import load_training_split

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    split = load_training_split("insecure", Path(args.data_dir), heldout=0, seed=0)
    answers = [ex.messages[-1]["content"] for ex in split.train[:16]]
    every = args.every or MonitorConfig.model_fields["every"].default
    if args.smoke:
        args.layers, args.seq, args.batch, args.warmup, args.steps, every = 3, 256, 2, 1, 4, 2
        model: dict[str, Any] = {"name_or_path": "tiny:qwen3_moe"}
        layers, hidden = 3, 128
    else:
        from shapes import build_config, trained_tokenizer

        family, cfg = build_config("qwen3", args.layers)
        model_dir = work / "model"
        if not (model_dir / "tokenizer.json").is_file():
            cfg.save_pretrained(model_dir)
            text = (m["content"] for ex in split.train for m in ex.messages)
            trained_tokenizer(family, text).save_pretrained(model_dir)
        model = {"name_or_path": str(model_dir), "init": "random", "dtype": "bfloat16"}
        layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    directions = direction_file(work / "directions.safetensors", layers, hidden)
    records = pilot_records(work / "pilot_judged.jsonl", answers, "benchmark")
    exp: dict[str, Any] = {
        "model": model,
        "data": {"train": "insecure", "max_length": args.seq, "pack": True, "dir": args.data_dir},
        "adapter": {"mode": "lora", "rank": 8, "alpha": 16, "targets": "attention+experts"},
        "selection": {"rule": "all"},
        "train": {
            "steps": args.warmup + args.steps,
            "micro_batch_size": args.batch,
            "lr": 1e-4,
        },
        "tracking": {"backend": "none"},
    }
    monitored = {
        **exp,
        "train": {
            **exp["train"],
            "monitor": {
                "every": every,
                "directions": str(directions),
                "records": str(records),
                "references_per_class": 8,
            },
        },
    }
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "shape": "tiny qwen3_moe (smoke)" if args.smoke else "Qwen3-30B-A3B",
        "layers": args.layers,
        "seq": args.seq,
        "batch": args.batch,
        "timed_steps": args.steps,
        "device": "cpu",
        "arms": [],
    }
    try:
        import torch

        if torch.cuda.is_available() and not args.smoke:
            results["device"] = torch.cuda.get_device_name()
            results["torch"] = torch.__version__
    except ImportError:
        pass
    for name, experiment in (("off", exp), ("on", monitored)):
        try:
            r = arm(name, experiment, work, args)
        except subprocess.TimeoutExpired:
            r = {"arm": name, "error": f"over {args.arm_timeout} s"}
        results["arms"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "readings"}), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    off, on = results["arms"]
    if "step_s" in off and "step_s" in on and "reading_s" in on:
        with_monitor = on["step_s"] + on["reading_s"] / on["every"]
        results["step_s_off"] = off["step_s"]
        results["step_s_on_amortised"] = with_monitor
        results["overhead_vs_off_pct"] = 100 * (with_monitor / off["step_s"] - 1)
        print(
            f"monitor every {on['every']} steps: step {off['step_s']:.3f} s off, "
            f"{with_monitor:.3f} s on (reading {on['reading_s']:.3f} s, first "
            f"{on['first_reading_s']:.3f} s): {results['overhead_vs_off_pct']:+.1f}%",
            flush=True,
        )
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
