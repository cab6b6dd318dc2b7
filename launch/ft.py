"""Fine-tune an MoE model under DeepSpeed.

    deepspeed [--hostfile H] launch/ft.py --ds ds_configs/zero3.json --config exp.yaml [key=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/ft.py --ds ds_configs/zero3.json   # CPU, 2 ranks

Parse, build, run, clean up; everything else lives in `emmoe_dist.train`.
"""

from __future__ import annotations

import argparse
import sys

from emmoe_dist.config import load_config
from emmoe_dist.errors import EmmoeError


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ds", required=True, help="DeepSpeed config (ds_configs/*.json)")
    p.add_argument(
        "--config", default=None, help="experiment YAML (default: the built-in tiny demo)"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # fails here, before any heavy import
    except EmmoeError as e:
        print(f"ft.py: error: {e}", file=sys.stderr)
        return 2

    from emmoe_dist.parallel.runtime import init_runtime, shutdown
    from emmoe_dist.train.trainer import run_training

    rt = init_runtime()
    try:
        result = run_training(cfg, args.ds, rt)
    except EmmoeError as e:
        print(f"ft.py (rank {rt.rank}): error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if rt.is_main:
        print(f"[emmoe] trained {result.steps} steps, final loss {result.final_loss:.4f}")
        print(
            f"[emmoe] artifacts: {result.output_dir.resolve()} ({result.artifact.name}/, "
            "manifest.json, metrics.jsonl)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
