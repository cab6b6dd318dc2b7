"""`emmoe merge RUN_DIR --out MODEL_DIR [--format mxfp4]`: a merged full model from a training
run, in full precision or (GPT-oss) as the MXFP4 checkpoint it is deployed as."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge a run's adapter or expert deltas into a full model")
    p.add_argument("run", help="a training run's output folder (has manifest.json)")
    p.add_argument("--out", required=True, help="folder for the merged model")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="default: the base checkpoint's dtype (an fp32 base stays fp32: routers and "
        "untrained experts stay bitwise the base's)",
    )
    p.add_argument(
        "--format",
        choices=["dense", "mxfp4"],
        default="dense",
        help="dense: every weight in --dtype; mxfp4: GPT-oss experts in MXFP4 (hub layout, "
        "loads in transformers and vLLM), the rest in --dtype",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emmoe_dist.adapters.merge import merge_run

    out = merge_run(args.run, args.out, dtype=args.dtype, fmt=args.format)
    print(f"merged model ({args.format}) written to {out}")
    return 0
