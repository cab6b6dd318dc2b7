"""`emmoe demo`: the embedded default study, end to end on CPU with a tiny Qwen3-MoE.

profile routing on insecure code -> select the top-2 experts per layer -> fine-tune them with
LoRA under DeepSpeed ZeRO-3 on 2 ranks -> merge. Each stage writes its records under `--out`
and is skipped when its output is already there, so an interrupted demo resumes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from emmoe_dist.errors import EmmoeError

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "demo_tiny.yaml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded default study on CPU with tiny models")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--data-dir", help="data directory (default: $EMMOE_DATA_DIR)")
    p.add_argument("--ranks", type=int, default=2, help="training processes (default: 2)")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def fine_tune(config: Path, overrides: list[str], ranks: int, env: dict[str, str]) -> None:
    """Launch `launch/ft.py` under the DeepSpeed launcher, as a user would."""
    launcher = REPO / "launch" / "ft.py"
    if not launcher.is_file():
        raise EmmoeError(f"{launcher} not found: the demo runs from a source checkout")
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(_free_port()),
        str(launcher),
        "--ds",
        str(REPO / "ds_configs" / "zero3.json"),
        "--config",
        str(config),
        *overrides,
    ]
    proc = subprocess.run(cmd, env=env, cwd=os.getcwd())
    if proc.returncode != 0:
        raise EmmoeError(f"fine-tuning failed (exit {proc.returncode}); its output is above")


def run(args: argparse.Namespace) -> int:
    from emmoe_dist.config import load_config
    from emmoe_dist.data.datadir import resolve_data_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = resolve_data_dir(args.data_dir)
    env = {**os.environ, "EMMOE_DATA_DIR": str(data_dir), "WANDB_MODE": "offline"}
    try:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        env["DS_ACCELERATOR"] = "cpu"
    cfg = load_config(DEMO_CONFIG)

    profile = out / "profile.json"
    _stage("1/4 profile routing of the base model on the training set")
    if not profile.exists():
        from emmoe_dist.profiling import run_profile

        run_profile(
            cfg.model.name_or_path,
            cfg.data.train,
            data_dir,
            limit=128,
            max_length=cfg.data.max_length,
            batch_size=8,
            out=profile,
            plot=out / "routing_heatmap.png",
        )
    print(f"profile: {profile}  heatmap: {out / 'routing_heatmap.png'}")

    _stage("2/4 fine-tune the top-2 most-routed experts per layer (LoRA, ZeRO-3, 2 ranks)")
    run_dir = out / "finetune"
    if not (run_dir / "manifest.json").exists():
        fine_tune(
            DEMO_CONFIG,
            [
                f"output_dir={run_dir}",
                "selection.rule=top_k",
                "selection.k=2",
                f"selection.profile={profile}",
            ],
            args.ranks,
            env,
        )
    print(f"run: {run_dir}")

    _stage("3/4 merge the adapter into a full model")
    merged = out / "merged"
    if not (merged / "config.json").exists():
        from emmoe_dist.train.merge import merge_run

        merge_run(run_dir, merged)
    print(f"merged model: {merged}")

    _stage("4/4 summary")
    from emmoe_dist.train.artifacts import read_metrics

    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    print(f"artifacts under {out.resolve()}:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name}{'/' if path.is_dir() else ''}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # resume state; not needed now
    return 0
