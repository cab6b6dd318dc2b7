"""Entry point of the `emmoe` console script.

Each subcommand lives in its own module with `register(subparsers)`; the module is imported
only when listed here, and heavy imports stay inside each command's function so `emmoe --help`
is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from emmoe_dist import __version__
from emmoe_dist.errors import EmmoeError

SUBCOMMAND_MODULES = (
    "emmoe_dist.cli.data",
    "emmoe_dist.cli.profile",
    "emmoe_dist.cli.select",
    "emmoe_dist.cli.plan",
    "emmoe_dist.cli.merge",
    "emmoe_dist.cli.generate",
    "emmoe_dist.cli.serve",
    "emmoe_dist.cli.judge",
    "emmoe_dist.cli.report",
    "emmoe_dist.cli.interp",
    "emmoe_dist.cli.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emmoe",
        description="Fine-tune, evaluate and interpret emergent misalignment in MoE LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"emmoe-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EmmoeError as e:
        print(f"emmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"emmoe {args.command}: interrupted; finished work is on disk, re-run to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
