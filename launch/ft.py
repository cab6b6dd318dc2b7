"""Fine-tune an MoE model under DeepSpeed.

    deepspeed [--hostfile H] launch/ft.py --ds ds_configs/zero3.json --config exp.yaml [key=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/ft.py --ds ds_configs/zero3.json   # CPU, 2 ranks

Parse, build, run, clean up; everything else lives in `emmoe_dist.train`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from emmoe_dist.config import load_config
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.files import remove_empty_dirs


def report(error: EmmoeError, rank: int) -> None:
    """Every rank checks the same input and fails the same way: an input error prints once
    (rank 0); anything else may differ between ranks and prints with its rank."""
    if isinstance(error, InputError):
        if rank == 0:
            print(f"ft.py: error: {error}", file=sys.stderr)
    else:
        print(f"ft.py (rank {rank}): error: {error}", file=sys.stderr)


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
    rank = int(os.environ.get("RANK", "0"))  # set by the launcher before any rank starts
    try:
        cfg = load_config(args.config, args.overrides)  # fails here, before any heavy import
    except EmmoeError as e:
        report(e, rank)
        return 2

    from emmoe_dist.parallel.runtime import init_runtime, shutdown
    from emmoe_dist.train.trainer import run_training

    out = Path(cfg.output_dir)
    missing = [p for p in (out, *out.parents) if not p.exists()]  # what this run would create
    rt = init_runtime()
    try:
        result = run_training(cfg, args.ds, rt)
    except BaseException as e:
        remove_empty_dirs(missing)  # an aborted run leaves no empty folder behind
        if not isinstance(e, EmmoeError):
            raise
        report(e, rt.rank)
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
