"""`emmoe profile`: per-layer expert routing of a model on a training set.

emmoe profile --model tiny:qwen3_moe --data insecure --limit 200 --out profile.json
torchrun --nproc_per_node 2 -m emmoe_dist.cli.main profile --model M --data D --out P
"""

from __future__ import annotations

import argparse
import math
from typing import Any


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "profile",
        help="count which experts each MoE layer routes a dataset's tokens to",
        description="Profile the routing of a model on a chat dataset: per MoE layer and "
        "expert, top-k choices and summed gate scores over the assistant tokens (or all tokens "
        "with --include-prompt). Runs under torchrun to split the examples over ranks.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder, hub id, or tiny:<family>")
    p.add_argument("--data", required=True, help="dataset name (emmoe data list) or chat JSONL")
    p.add_argument("--data-dir", help="data directory (default: $EMMOE_DATA_DIR)")
    p.add_argument("--limit", type=positive_int, help="profile only the first N examples")
    p.add_argument("--max-length", type=positive_int, default=1024, help="tokens per example")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward")
    p.add_argument(
        "--include-prompt",
        action="store_true",
        help="count prompt tokens too (default: assistant tokens only)",
    )
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--plot", help="also write a token-share heatmap (PNG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emmoe_dist.parallel.runtime import init_runtime, shutdown
    from emmoe_dist.profiling import run_profile

    runtime = init_runtime()
    try:
        profile = run_profile(
            args.model,
            args.data,
            args.data_dir,
            args.limit,
            args.max_length,
            args.batch_size,
            args.include_prompt,
            args.out,
            args.plot,
            runtime=runtime,
        )
    finally:
        shutdown()
    if runtime.is_main:
        entropies = [r.entropy for r in profile.layers]
        print(
            f"wrote {args.out}: {len(profile.layers)} MoE layers x {profile.num_experts} "
            f"experts, {profile.tokens:,} tokens; routing entropy {min(entropies):.3f}-"
            f"{max(entropies):.3f} nats (uniform {math.log(profile.num_experts):.3f})"
        )
        if args.plot:
            print(f"wrote {args.plot}")
    return 0
