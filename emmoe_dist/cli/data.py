"""`emmoe data list` and `emmoe data fetch`: what is in the data directory, and getting the rest."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emmoe_dist.data.fetch import DatasetStatus


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data",
        help="list and download the datasets",
        description="The datasets live outside the repository, in --data-dir or $EMMOE_DATA_DIR.",
    )
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    ls = sub.add_parser("list", help="each dataset: role, format, rows, hash check, path")
    ls.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    ls.add_argument("--data-dir", help="data directory (default: $EMMOE_DATA_DIR)")
    ls.add_argument(
        "--allow-unverified-data",
        action="store_true",
        help="exit 0 even when a file's hash differs from the catalog's (MISMATCH)",
    )
    ls.set_defaults(func=_list)

    fetch = sub.add_parser("fetch", help="download missing datasets and verify their hashes")
    fetch.add_argument("--only", help="comma-separated dataset names (default: all)")
    fetch.add_argument(
        "--data-dir", help="data directory, created if needed (default: $EMMOE_DATA_DIR)"
    )
    fetch.add_argument(
        "--force", action="store_true", help="download again even where a file is present"
    )
    fetch.add_argument("--timeout", type=float, default=60.0, help="seconds per connection")
    fetch.set_defaults(func=_fetch)


def _check(status: DatasetStatus) -> str:
    if not status.present:
        return "absent"
    if status.error:
        return "unparseable"
    return {True: "ok", False: "MISMATCH", None: "unchecked"}[status.verified]


def _list(args: argparse.Namespace) -> int:
    from emmoe_dist.data.datadir import resolve_data_dir
    from emmoe_dist.data.fetch import dataset_status, select_datasets

    data_dir = resolve_data_dir(args.data_dir)
    statuses = [dataset_status(spec, data_dir) for spec in select_datasets()]
    mismatched = [s.name for s in statuses if s.verified is False]
    failed = 1 if mismatched and not args.allow_unverified_data else 0
    if args.json:
        listing = [{**dataclasses.asdict(s), "path": str(s.path)} for s in statuses]
        print(json.dumps(listing, indent=2))
        return failed
    table = [("NAME", "ROLE", "FORMAT", "ROWS", "HASH", "PATH")]
    table += [
        (s.name, s.role, s.format, "-" if s.rows is None else str(s.rows), _check(s), str(s.path))
        for s in statuses
    ]
    w = [max(len(row[i]) for row in table) for i in range(5)]  # the path column is last
    for name, role, fmt, rows, check, path in table:
        print(
            f"{name:<{w[0]}}  {role:<{w[1]}}  {fmt:<{w[2]}}  {rows:>{w[3]}}  {check:<{w[4]}}  {path}"
        )
    for s in statuses:
        if s.error:
            print(f"{s.name}: {s.error}", file=sys.stderr)
    absent = [s.name for s in statuses if not s.present]
    if absent:
        print(
            f"absent: {', '.join(absent)} (emmoe data fetch --only {','.join(absent)})",
            file=sys.stderr,
        )
    if mismatched:
        print(
            f"MISMATCH: {', '.join(mismatched)} differ from the catalog's hashes; commands "
            f"refuse them (restore: emmoe data fetch --force --only {','.join(mismatched)}; use "
            "anyway: --allow-unverified-data, or data.allow_unverified: true)",
            file=sys.stderr,
        )
    return failed


def _fetch(args: argparse.Namespace) -> int:
    from emmoe_dist.data.datadir import resolve_data_dir
    from emmoe_dist.data.fetch import fetch_datasets, select_datasets

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    specs = select_datasets(only)
    data_dir = resolve_data_dir(args.data_dir, create=True)
    results = fetch_datasets(specs, data_dir, force=args.force, timeout=args.timeout)
    for r in results:
        if r.status == "failed":
            print(f"emmoe data fetch: error: {r.name}: {r.message}", file=sys.stderr)
        else:
            print(f"{r.status:10}  {r.name}: {r.message}")
    failed = sum(r.status == "failed" for r in results)
    if failed:
        print(f"emmoe data fetch: {failed} of {len(results)} datasets failed", file=sys.stderr)
    return 1 if failed else 0
