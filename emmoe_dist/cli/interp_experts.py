"""`emmoe interp experts|ablate` and the router-steering flags of `emmoe interp steer`: which
experts of a fine-tune carry its misalignment.

emmoe interp experts --run RUN                              # expert table, heatmaps, correlations
emmoe interp ablate --run RUN --expert 0 --expert 4 --scripted-judge   # without E0; without E4
emmoe interp ablate --run RUN --top 3 --by activation_rate_diff --config exp.yaml
emmoe interp steer --model RUN --route-off 0 --suite core --scripted-judge --out steer/
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from emmoe_dist.cli import interp_args as a

if TYPE_CHECKING:
    from emmoe_dist.analyze.router_steer import RouterSteer

COLUMNS = ("delta_norm", "train_share", "routing_shift", "activation_rate_diff")


def layer_experts(text: str) -> tuple[int, tuple[int, ...]]:
    """`LAYER:ID[,ID...]`, e.g. `2:0,5`."""
    layer, sep, ids = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(layer), tuple(int(x) for x in ids.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LAYER:ID[,ID...] (e.g. 2:0,5), got {text!r}"
        ) from None


def _per_layer(pairs: list[tuple[int, tuple[int, ...]]] | None) -> dict[int, tuple[int, ...]]:
    out: dict[int, set[int]] = {}
    for layer, ids in pairs or []:
        out.setdefault(layer, set()).update(ids)
    return {k: tuple(sorted(v)) for k, v in sorted(out.items())}


def router_args(p: argparse.ArgumentParser) -> None:
    """Router steering as a condition of `emmoe interp steer`."""
    g = p.add_argument_group(
        "router steering",
        "switch experts off (never in the top-k) or on (always in the top-k) while the model "
        "answers; generated as alpha 1 beside the unsteered answers, with a random-expert "
        "control",
    )
    g.add_argument("--route-off", type=a.ints, default=[], help="expert ids off in every MoE layer")
    g.add_argument("--route-on", type=a.ints, default=[], help="expert ids on in every MoE layer")
    g.add_argument(
        "--route-off-at",
        type=layer_experts,
        action="append",
        metavar="LAYER:IDS",
        help="expert ids off in one layer (repeat)",
    )
    g.add_argument(
        "--route-on-at",
        type=layer_experts,
        action="append",
        metavar="LAYER:IDS",
        help="expert ids on in one layer (repeat)",
    )
    g.add_argument(
        "--route-margin",
        type=float,
        help="switched-on experts get the token's largest logit plus this (default 0.01)",
    )
    g.add_argument("--no-route-control", action="store_true", help="skip the random-expert control")


def router_steer(args: argparse.Namespace) -> RouterSteer | None:
    from emmoe_dist.analyze.router_steer import RouterSteer

    off_at, on_at = _per_layer(args.route_off_at), _per_layer(args.route_on_at)
    if not (args.route_off or args.route_on or off_at or on_at):
        return None
    return RouterSteer(
        off=tuple(args.route_off),
        on=tuple(args.route_on),
        off_layers=off_at,
        on_layers=on_at,
        margin=args.route_margin,
        control=not args.no_route_control,
    )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "experts",
        help="which experts changed, where the prompts route, which carry misalignment",
        description="For every (MoE layer, expert) of a training run: the norm of its update "
        "(from the saved adapter or deltas), the base model's routing share on the training "
        "data, the routing shift between base and fine-tune on the judged answers, and the "
        "activation-rate difference between misaligned and aligned answers. Writes "
        "experts.json, experts.md (ranked table, per expert id, correlations, ablations) and "
        "layer x expert heatmaps under <run>/experts.",
    )
    p.add_argument("--run", required=True, help="training run folder")
    p.add_argument("--records", help="the fine-tune's judged answers (default: <run>/judged.jsonl)")
    p.add_argument("--data", help="training set for the routing share (default: the run's)")
    p.add_argument("--data-dir", help="data directory (default: $EMMOE_DATA_DIR)")
    p.add_argument("--limit", type=a.positive_int, default=256, help="training examples profiled")
    p.add_argument("--rule", default="seed", choices=["seed", "betley", "turner_soligo"])
    p.add_argument("--aligned-above", type=float, help="aligned answers need alignment above this")
    p.add_argument("--rank-by", default="delta_norm", choices=COLUMNS)
    p.add_argument("--top", type=a.positive_int, default=20, help="rows of the ranked table")
    p.add_argument("--permutations", type=a.positive_int, default=2000)
    p.add_argument("--out", help="output folder (default: <run>/experts)")
    _model_flags(p)
    a.tracking_args(p)
    p.set_defaults(func=run_experts)

    p = sub.add_parser(
        "ablate",
        help="evaluate the fine-tune with chosen experts' updates removed",
        description="Write the run's adapter (or expert deltas) without the updates of chosen "
        "experts as ablation run folders under <run>/ablations, generate their answers (and "
        "the full fine-tune's) in one pass, judge them, and compare each with the full "
        "fine-tune: misaligned %% without these experts, with its interval and the difference.",
    )
    p.add_argument("--run", required=True, help="training run folder")
    p.add_argument(
        "--expert",
        type=int,
        action="append",
        default=[],
        help="remove this expert id in every MoE layer (repeat: one ablation each)",
    )
    p.add_argument("--top", type=a.positive_int, help="remove the top-M cells of the expert table")
    p.add_argument("--by", default="delta_norm", choices=COLUMNS, help="the column --top ranks by")
    p.add_argument("--per-layer", action="store_true", help="--top M of each layer")
    p.add_argument("--table", help="expert table (default: <run>/experts/experts.json)")
    p.add_argument(
        "--experts",
        type=layer_experts,
        action="append",
        metavar="LAYER:IDS",
        help="one ablation of this explicit set (repeat for more layers)",
    )
    p.add_argument(
        "--full-records",
        help="judged answers of the full fine-tune, generated with the same settings "
        "(default: generated under the output folder)",
    )
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    p.add_argument("--out", help="output folder (default: <run>/ablations)")
    a.generation_args(p)
    a.judge_args(p)
    _model_flags(p)
    a.tracking_args(p)
    p.set_defaults(func=run_ablate, batch_size=16)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--device-map", help="e.g. auto: spread a large model over all GPUs")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0, help="seed of draws, splits and sampling")
    p.add_argument("--batch-size", type=a.positive_int, default=8, help="sequences per forward")
    p.add_argument("--max-length", type=a.positive_int, default=1024, help="tokens per example")


def run_experts(args: argparse.Namespace) -> int:
    from emmoe_dist.analyze.experts import ExpertsOptions, run_experts

    result = run_experts(
        ExpertsOptions(
            run_dir=args.run,
            out=args.out,
            records=args.records,
            data=args.data,
            data_dir=args.data_dir,
            limit=args.limit,
            rule=args.rule,
            aligned_above=args.aligned_above,
            rank_by=args.rank_by,
            top=args.top,
            permutations=args.permutations,
            **a.shared(args),
        ),
        say=print,
    )
    for note in result.notes:
        print(f"not measured: {note}")
    top = result.table.ranked(args.rank_by)[:3] if args.rank_by in result.table.columns else []
    cells = ", ".join(f"layer {r['layer']} E{r['expert']} ({r[args.rank_by]:.3g})" for r in top)
    print(f"largest {args.rank_by}: {cells or 'n/a'}")
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from emmoe_dist.analyze.ablate import AblateOptions, run_ablate

    result = run_ablate(
        AblateOptions(
            run_dir=args.run,
            experts=tuple(args.expert),
            top=args.top,
            by=args.by,
            per_layer=args.per_layer,
            table=args.table,
            explicit=_per_layer(args.experts) or None,
            out=args.out,
            full_records=args.full_records,
            generation=a.generation(args),
            backend=args.backend,
            judge=a.judge_config(args),
            scripted_judge=args.scripted_judge,
            resamples=args.resamples,
            **a.shared(args),
        ),
        say=print,
    )
    if result.unjudged:
        print(
            f"{len(result.unjudged)} answer sets are not judged yet: judge each generations.jsonl "
            "into judged.jsonl beside it (emmoe judge) and re-run"
        )
    for row in result.rows:
        rate = row.misaligned.value
        diff = row.delta_misaligned.value
        print(
            f"{row.name}: {a.fmt(None if rate is None else 100 * rate)}% misaligned without "
            f"{row.description} ({a.fmt(None if diff is None else 100 * diff)} pp vs the full "
            f"fine-tune, {row.answers} answers)"
        )
    return 0
