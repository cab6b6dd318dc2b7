"""`emmoe profile`: per-layer expert routing of a model on a training set.

emmoe profile --model tiny:qwen3_moe --data insecure --limit 200 --out profile.json
torchrun --nproc_per_node 2 -m emmoe_dist.cli.main profile --model M --data D --out P
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from emmoe_dist.catalog import ALLOW_UNVERIFIED_HELP


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
    p.add_argument(
        "--limit",
        type=positive_int,
        help="profile N examples: the file's rows shuffled with a fixed seed, then the first N "
        "(the same rows for every model, so profiles compare; the file's own order may group "
        "similar rows)",
    )
    p.add_argument("--max-length", type=positive_int, default=1024, help="tokens per example")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward")
    p.add_argument(
        "--include-prompt",
        action="store_true",
        help="count prompt tokens too (default: assistant tokens only)",
    )
    p.add_argument("--allow-unverified-data", action="store_true", help=ALLOW_UNVERIFIED_HELP)
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--plot", help="also write a token-share heatmap (PNG)")
    p.add_argument("--compare", help="another profile (e.g. the base model's): write --diff-plot")
    p.add_argument("--diff-plot", help="token-share difference heatmap against --compare (PNG)")
    p.add_argument(
        "--wandb-project",
        help="log the profile and its plots to W&B (offline unless WANDB_MODE=online)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from emmoe_dist.parallel.runtime import init_runtime, shutdown
    from emmoe_dist.profiling import run_profile

    runtime = init_runtime(process_group=False)
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
            allow_unverified=args.allow_unverified_data,
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
        if args.compare and args.diff_plot:
            from emmoe_dist.experts import ExpertProfile
            from emmoe_dist.routing_plots import plot_share_diff

            plot_share_diff(ExpertProfile.load(args.compare), profile, args.diff_plot)
            print(f"wrote {args.diff_plot}")
        if args.wandb_project:
            _log_to_wandb(args, profile)
    return 0


def _log_to_wandb(args: argparse.Namespace, profile: Any) -> None:
    import os

    from emmoe_dist.config import TrackingConfig
    from emmoe_dist.tracking import make_tracker

    mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
    tracker = make_tracker(
        TrackingConfig(project=args.wandb_project, mode=mode),
        is_main=True,
        name=f"profile {profile.model} on {profile.dataset}",
        job_type="profile",
        config={
            "model": profile.model,
            "dataset": profile.dataset,
            "dataset_hash": profile.dataset_hash,
            "tokens": profile.tokens,
        },
        folder=os.path.dirname(os.path.abspath(args.out)),
    )
    for r in profile.layers:
        tracker.log({"routing_entropy": r.entropy, "max_token_share": max(r.token_share)}, r.layer)
    tracker.images(
        {k: v for k, v in (("routing_heatmap", args.plot), ("routing_diff", args.diff_plot)) if v}
    )
    tracker.finish()
