"""`emmoe report`: judged records of one or many runs in; the paper's table, charts and
metrics.json out (and W&B tables when asked)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="tables and charts from judged records",
        description="Average alignment, StrongREJECT rejection % and misalignment % per model, "
        "with bootstrap intervals; writes report.md, metrics.json and PNG charts.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="RUN_OR_FILE",
        help="judged-records files, or run folders (every *judged*.jsonl inside)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--alignment-suites",
        default="core",
        help="suites whose answers make the alignment columns, comma-separated; "
        "'all' for every suite (default: core)",
    )
    parser.add_argument(
        "--baseline",
        help="model label the others are compared with "
        "(default: the first model without an adapter)",
    )
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the tables of scored samples to Weights & Biases (its files go under --out)",
    )
    parser.add_argument(
        "--config",
        help="experiment YAML whose `tracking` section names the W&B project, group and mode",
    )
    parser.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from emmoe_dist.config import TrackingConfig, load_config
    from emmoe_dist.errors import InputError
    from emmoe_dist.metrics import Bootstrap
    from emmoe_dist.report import build_report, load_judged, log_report_to_wandb, write_report

    if args.resamples < 1 or not 0 < args.confidence < 1:
        raise InputError("need --resamples >= 1 and 0 < --confidence < 1", file="<command line>")
    suites = (
        None
        if args.alignment_suites == "all"
        else tuple(s.strip() for s in args.alignment_suites.split(",") if s.strip())
    )
    records = load_judged(args.paths)
    report = build_report(
        records,
        alignment_suites=suites,
        baseline=args.baseline,
        bootstrap=Bootstrap(args.resamples, args.confidence, args.seed),
        sources=[str(p) for p in args.paths],
    )
    for path in write_report(report, args.out):
        print(path)
    if args.wandb:
        tracking = load_config(args.config).tracking if args.config else TrackingConfig()
        mode = "disabled" if tracking.backend == "none" else tracking.mode
        folder = log_report_to_wandb(
            report,
            records,
            project=tracking.project,
            group=tracking.group,
            mode=mode,
            directory=args.out,  # beside the report, not in whatever folder the shell is in
        )
        print(f"W&B run: {folder}")
    return 0
