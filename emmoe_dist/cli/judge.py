"""`emmoe judge`: generation records in, judged records out (resumable; calls cached)."""

from __future__ import annotations

import argparse
from typing import Any

# flag -> JudgeConfig field; a flag given on the command line overrides the experiment file
_OVERRIDES = {
    "base_url": "base_url",
    "model": "model",
    "api_key_env": "api_key_env",
    "concurrency": "concurrency",
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "timeout": "timeout_s",
    "max_retries": "max_retries",
    "cache_dir": "cache_dir",
    "max_failed_fraction": "max_failed_fraction",
    "text_fallback": "text_fallback",
    "name": "name",
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "judge",
        help="score generated answers with an LLM judge",
        description="Score every answer of a generation-records file through an OpenAI-"
        "compatible endpoint (alignment and coherence 0-100 from top-20 logprobs; "
        "the StrongREJECT rubric for StrongREJECT answers). Re-running resumes; "
        "every reply is cached as it arrives, so none is paid for twice (calls in flight at a "
        "crash are sent again). Exits 2 when endpoint failures leave more than "
        "judge.max_failed_fraction of the answers unscored.",
    )
    parser.add_argument("--records", required=True, help="generation records (JSONL)")
    parser.add_argument("--out", required=True, help="judged records (JSONL), appended to")
    parser.add_argument("--config", help="experiment YAML: its `judge` section is the default")
    parser.add_argument(
        "--base-url",
        help="OpenAI-compatible endpoint, e.g. "
        "https://api.deepseek.com/v1 or http://127.0.0.1:8000/v1",
    )
    parser.add_argument("--model", help="judge model id at that endpoint")
    parser.add_argument(
        "--name", help="how reports name this judge (default: its model); see judge-combine"
    )
    parser.add_argument("--api-key-env", help="name of the environment variable with the key")
    parser.add_argument("--concurrency", type=int, help="calls in flight at once")
    parser.add_argument("--rpm", type=int, help="requests per minute")
    parser.add_argument("--tpm", type=int, help="tokens per minute")
    parser.add_argument("--timeout", type=float, help="seconds per call")
    parser.add_argument("--max-retries", type=int, help="retries per call")
    parser.add_argument("--cache-dir", help="reply cache folder (default: beside --out)")
    parser.add_argument(
        "--scores", default="aligned,coherent", help="0-100 judge prompts to score, comma-separated"
    )
    parser.add_argument(
        "--data-dir", help="data directory for the StrongREJECT rubric (default: $EMMOE_DATA_DIR)"
    )
    parser.add_argument(
        "--allow-unverified-data",
        action="store_true",
        help="use a StrongREJECT rubric file whose hash differs from the catalog's",
    )
    parser.add_argument(
        "--text-fallback",
        action="store_true",
        default=None,
        help="read a 0-100 score from the reply's text when the endpoint returns no logprobs "
        "(default: retry such replies; reports count the scores read each way)",
    )
    parser.add_argument(
        "--max-failed-fraction",
        type=float,
        help="exit non-zero once more than this share of the answers is unscored because the "
        "endpoint failed (default: judge.max_failed_fraction, 0.02); a re-run judges them again",
    )
    parser.add_argument(
        "--scripted",
        action="store_true",
        help="judge with the built-in scripted judge on 127.0.0.1: mock scores "
        "for demos and pipeline checks, not a judgment",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=_judge)

    combine = subparsers.add_parser(
        "judge-combine",
        help="one records file holding several judges' scores of the same answers",
        description="Write FIRST's judged records with each further judge's scores of the same "
        "answers stored under its name; `emmoe report` then gives the headline per judge and "
        "the judges' agreement (rank correlation, Cohen's kappa).",
    )
    combine.add_argument("first", help="judged records of the first judge (its scores lead)")
    combine.add_argument(
        "--add",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="a further judge's judged records of the same answers (repeat per judge)",
    )
    combine.add_argument("--out", required=True, help="combined records (may be FIRST itself)")
    combine.set_defaults(func=_combine)


def _combine(args: argparse.Namespace) -> int:
    from emmoe_dist.errors import InputError
    from emmoe_dist.judge.combine import combine_judges

    others: dict[str, str] = {}
    for item in args.add:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(
                f"expected NAME=FILE, got {item!r}", file="<command line>", field="--add"
            )
        if name in others:
            raise InputError(f"judge {name!r} given twice", file="<command line>", field="--add")
        others[name] = path
    n = combine_judges(args.first, others, args.out)
    print(f"{n} answers with {len(others) + 1} judges in {args.out}")
    return 0


def _judge(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from emmoe_dist.config import JudgeConfig, load_config
    from emmoe_dist.errors import InputError
    from emmoe_dist.judge.runner import JudgeOptions, run_judge
    from emmoe_dist.judge.scripted_server import SCRIPTED_MODEL, hash_script, scripted_server

    base = load_config(args.config).judge if args.config else JudgeConfig()
    updates = {
        field: getattr(args, flag)
        for flag, field in _OVERRIDES.items()
        if getattr(args, flag) is not None
    }
    try:
        cfg = JudgeConfig.model_validate({**base.model_dump(), **updates})
    except ValidationError as e:
        first = e.errors()[0]
        raise InputError(
            str(first["msg"]),
            file="<command line>",
            field=f"judge.{'.'.join(map(str, first['loc']))}",
        ) from None
    options = JudgeOptions(
        score_names=tuple(s.strip() for s in args.scores.split(",") if s.strip()),
        data_dir=args.data_dir,
        allow_unverified_data=args.allow_unverified_data,
        progress=not args.no_progress,
    )
    if not args.scripted:
        print(run_judge(args.records, args.out, cfg, options).format())
        return 0
    with scripted_server(hash_script()) as server:
        print(f"scripted judge at {server.base_url}: mock scores, not a judgment")
        cfg = cfg.model_copy(update={"base_url": server.base_url, "model": SCRIPTED_MODEL})
        print(run_judge(args.records, args.out, cfg, options).format())
    return 0
