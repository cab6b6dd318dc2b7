"""`emmoe select`: choose the experts that train, and save the selection as JSON.

emmoe select --rule top-k --k 2 --profile profile.json --out selection.json
emmoe select --rule esft --p 0.3 --score gate --profile profile.json --out selection.json
emmoe select --rule single --expert 4 --model tiny:mixtral --out selection.json
emmoe select --rule all --model path/to/checkpoint --out selection.json
emmoe select --rule explicit --experts "0:1,2;2:5" [--model M] --out selection.json
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from emmoe_dist.errors import InputError
from emmoe_dist.experts import RULE_NEEDS, missing_fields

if TYPE_CHECKING:
    from emmoe_dist.experts import ExpertSelection

# The library's rules as the command spells them (top-k); a selection file needs no command.
RULES = tuple(rule.replace("_", "-") for rule in RULE_NEEDS if rule != "file")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "select",
        help="choose which experts train (whole model, one expert, top-k, ESFT, by hand)",
        description="Write an expert selection (ESFT's expert-config JSON format). Rules: "
        "all (--model), single (--expert, --model), top-k (--k, --profile), "
        "esft (--p, --score, --profile), explicit (--experts, optionally --model to check).",
    )
    p.add_argument("--rule", required=True, type=lambda s: s.replace("_", "-"), choices=RULES)
    p.add_argument("--profile", help="routing profile from `emmoe profile`")
    p.add_argument("--model", help="checkpoint folder, hub id or tiny:<family> (config only)")
    p.add_argument("--k", type=int, help="top-k: experts per layer")
    p.add_argument("--p", type=float, help="esft: cumulative share to reach, in (0, 1]")
    p.add_argument(
        "--score",
        choices=("token", "gate"),
        default="token",
        help="esft: rank experts by token share or gate-score share",
    )
    p.add_argument("--expert", type=int, help="single: the expert id used in every MoE layer")
    p.add_argument("--experts", help='explicit: "LAYER:ID,ID;LAYER:ID", e.g. "0:1,2;2:5"')
    p.add_argument("--out", required=True, help="selection JSON to write")
    p.set_defaults(func=run)


def parse_experts(text: str) -> dict[int, list[int]]:
    """`"0:1,2;2:5"` -> `{0: [1, 2], 2: [5]}`."""
    experts: dict[int, list[int]] = {}
    for part in (s.strip() for s in text.split(";")):
        if not part:
            continue
        layer, sep, ids = part.partition(":")
        try:
            if not sep:
                raise ValueError
            key = int(layer)
            values = [int(i) for i in ids.split(",") if i.strip()]
        except ValueError:
            raise InputError(f"{part!r} is not LAYER:ID,ID,...", field="--experts") from None
        if key in experts:
            raise InputError(f"layer {key} is given twice", field="--experts")
        if not values:
            raise InputError(f"layer {key} lists no experts", field="--experts")
        experts[key] = values
    if not experts:
        raise InputError("no layers given", field="--experts")
    return experts


def build_selection(args: argparse.Namespace) -> ExpertSelection:
    from emmoe_dist.errors import Where
    from emmoe_dist.experts import select_experts

    rule = args.rule.replace("-", "_")
    missing = [f"--{name}" for name in missing_fields(rule, vars(args))]
    if missing:
        raise InputError(f"--rule {args.rule} needs {' and '.join(missing)}", field="--rule")
    model = None
    if args.model is not None:
        from emmoe_dist.models.loading import model_config_dict, parse_model_spec

        model = model_config_dict(parse_model_spec(args.model))
    return select_experts(
        rule,
        model=model,
        expert=args.expert,
        k=args.k,
        p=args.p,
        score=args.score,
        profile=args.profile,
        experts=parse_experts(args.experts) if args.experts is not None else None,
        # errors name the flag the value came from (`--experts` for `experts.<layer>`)
        where=lambda name: Where(file="<command line>", field=f"--{name.split('.')[0]}"),
    )


def run(args: argparse.Namespace) -> int:
    selection = build_selection(args)
    selection.save(args.out)
    counts = [len(selection.experts_for(layer)) for layer in selection.layers]
    print(
        f"wrote {args.out}: rule {selection.rule}; {sum(counts)} experts over "
        f"{len(counts)} layers ({min(counts, default=0)}-{max(counts, default=0)} per layer)"
    )
    return 0
