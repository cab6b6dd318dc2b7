"""`emmoe interp`: the misalignment direction, steering with it (or with the router), early
detection, routing shift; which experts carry misalignment (`cli/interp_experts.py`).

emmoe interp direction --model RUN --records judged.jsonl --out interp/
emmoe interp detect --model RUN --records judged.jsonl --out interp/
emmoe interp steer --model BASE --directions interp/directions.safetensors --alphas 0,2,4,8 \
    --suite core --samples 20 --judge-base-url URL --judge-model M --out steer/
emmoe interp routing-shift --model RUN --records judged.jsonl --out shift/
emmoe interp monitor --model RUN/snapshots/step000050 --config exp.yaml --out monitor/
emmoe interp experts --run RUN; emmoe interp ablate --run RUN --expert 0 --scripted-judge

`--model` is a checkpoint folder, a hub id, `tiny:<family>`, or a training run folder (its
base model with its adapter or expert deltas merged in). Every command writes JSON and PNG
files under `--out` and resumes from what is there: activations, generations, judgments and
profiles already on disk are reused. `--device-map auto` spreads a large model over the GPUs.
"""

from __future__ import annotations

import argparse
from typing import Any

from emmoe_dist.cli import interp_args as a
from emmoe_dist.cli import interp_experts


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "interp",
        help="misalignment direction, steering, early detection and routing shift",
        description="Interpretability of emergent misalignment. Each analysis writes JSON "
        "and PNG files under --out and resumes from what is already there.",
    )
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")

    p = sub.add_parser(
        "direction",
        help="per-layer misalignment direction from judged answers",
        description="Collect per-layer residual activations of judged answers (mean over "
        "answer tokens) and write the mean(misaligned) - mean(aligned) direction per layer; "
        "with a base model, also the fine-tuned - base difference on the same answers. "
        "Cosines between layers, with the base difference, and with other direction files.",
    )
    a.model_args(p, base=True)
    a.label_args(p)
    p.add_argument("--no-base", action="store_true", help="skip the base model's activations")
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="FILE",
        help="other direction files (other runs, datasets): per-layer cosines with ours",
    )
    p.add_argument("--out", required=True, help="output folder")
    a.tracking_args(p)
    p.set_defaults(func=run_direction)

    p = sub.add_parser(
        "detect",
        help="does the last prompt token predict a misaligned answer? (AUROC per layer)",
        description="Split the judged answers by question; take the misalignment direction "
        "from the training questions (or --directions) and score the held-out questions' "
        "answers by the projection of the last prompt token's activation on it. AUROC per "
        "layer with a bootstrap interval that resamples questions; ROC curve of the best layer.",
    )
    a.model_args(p, base=False)
    a.label_args(p)
    p.add_argument("--directions", help="use this direction file instead of the training split")
    p.add_argument("--test-fraction", type=float, default=0.5, help="share of questions held out")
    p.add_argument("--resamples", type=a.positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--out", required=True, help="output folder (reuses its activations)")
    a.tracking_args(p)
    p.set_defaults(func=run_detect)

    p = sub.add_parser(
        "steer",
        help="generate under steering at several alphas; judge; misalignment %% vs alpha",
        description="For each alpha, answer the suite's questions with the direction added "
        "(or subtracted, or projected out) at the chosen layers, and the same for a random "
        "direction of the same norm (the control). Writes generation records per alpha, "
        "judges them when a judge is given, and draws misalignment % against alpha. Without "
        "a judge, judge each generations.jsonl with `emmoe judge --out <same folder>/"
        "judged.jsonl` and re-run to draw the curve.",
    )
    a.model_args(p, base=False, answers=False)
    p.add_argument(
        "--directions", help="direction file (emmoe interp direction); optional with --route-*"
    )
    p.add_argument(
        "--kind",
        default="misaligned_minus_aligned",
        choices=["misaligned_minus_aligned", "finetuned_minus_base"],
    )
    p.add_argument(
        "--layers",
        type=a.ints,
        help="decoder layers to steer, comma-separated (default: the layer whose direction is "
        "largest relative to its activations)",
    )
    p.add_argument("--mode", default="add", choices=["add", "subtract", "ablate"])
    p.add_argument(
        "--alphas",
        type=a.floats,
        default=[0.0, 0.5, 1.0, 2.0, 4.0],
        help="steering coefficients (0: unsteered); with --mode ablate any nonzero value "
        "means 'projected out'",
    )
    p.add_argument("--no-control", action="store_true", help="skip the random-direction control")
    a.generation_args(p)
    a.judge_args(p)
    interp_experts.router_args(p)
    p.add_argument("--out", required=True, help="output folder")
    a.tracking_args(p)
    p.set_defaults(func=run_steer, batch_size=16)

    p = sub.add_parser(
        "monitor",
        help="the training monitor's reading (projection, log-prob gap) of a model or snapshot",
        description="Read the probes of an experiment's train.monitor section (a forward "
        "pass, no generation) from --model: a checkpoint, a run, or one of its snapshots "
        "(RUN/snapshots/stepNNNNNN). Prints and writes the metrics training logs under "
        "monitor/ in metrics.jsonl.",
    )
    a.model_args(p, base=False, answers=False)
    p.add_argument(
        "--config",
        help="experiment YAML with a train.monitor section (default: the one a run or "
        "snapshot --model trained with)",
    )
    p.add_argument("--out", help="folder for monitor.json")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the experiment")
    p.set_defaults(func=run_monitor, no_progress=True)

    p = sub.add_parser(
        "routing-shift",
        help="how routing moved between the base and the fine-tuned model",
        description="Profile the routing of the base and the fine-tuned model on the same "
        "tokens; per MoE layer, KL divergence of the token-share distributions and the change "
        "of each expert's share; whether the trained experts (the run's selection) moved most.",
    )
    a.model_args(p, base=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--records", help="generation or judged records: their answers")
    source.add_argument("--data", help="training set name or chat JSONL: its examples")
    p.add_argument("--data-dir", help="data directory (default: $EMMOE_DATA_DIR)")
    p.add_argument(
        "--allow-unverified-data",
        action="store_true",
        help="use a training set whose hash differs from the catalog's",
    )
    p.add_argument(
        "--limit",
        type=a.positive_int,
        default=500,
        help="N examples: a training set's rows shuffled with a fixed seed, then the first N "
        "(records: the first N answers)",
    )
    p.add_argument(
        "--include-prompt",
        action="store_true",
        help="count prompt tokens too (default: answer tokens only)",
    )
    p.add_argument(
        "--selection", help="expert selection JSON (default: the run's expert_selection.json)"
    )
    p.add_argument(
        "--epsilon",
        type=float,
        default=1e-6,
        help="additive smoothing of token shares before the KL divergence",
    )
    p.add_argument("--permutations", type=a.positive_int, default=2000)
    p.add_argument("--out", required=True, help="output folder")
    a.tracking_args(p)
    p.set_defaults(func=run_routing_shift)

    interp_experts.register(sub)


# ---------------------------------------------------------------------------------------------
# Arguments -> the analyses' options (emmoe_dist.analyze); results -> lines


def run_direction(args: argparse.Namespace) -> int:
    from emmoe_dist.analyze.direction import DirectionOptions, run_direction

    result = run_direction(
        DirectionOptions(
            model=args.model,
            labels=a.labels(args),
            out=args.out,
            base=args.base,
            with_base=not args.no_base,
            compare=tuple(args.compare),
            **a.shared(args),
        ),
        say=print,
    )
    info, peak = result.directions.info, result.peak_layer
    rel = result.relative_norms[peak]
    print(
        f"direction from {info.n_misaligned} misaligned and {info.n_aligned} aligned answers; "
        f"largest relative norm {rel:.3f} at layer {peak}"
    )
    return 0


def run_detect(args: argparse.Namespace) -> int:
    from emmoe_dist.analyze.detect import DetectOptions, run_detect

    result = run_detect(
        DetectOptions(
            model=args.model,
            labels=a.labels(args),
            out=args.out,
            directions=args.directions,
            test_fraction=args.test_fraction,
            resamples=args.resamples,
            **a.shared(args),
        ),
        say=print,
    )
    best = result.layers[result.best_layer]
    print(
        f"{len(result.test_questions)} held-out questions ({result.n_test['misaligned']} "
        f"misaligned / {result.n_test['aligned']} aligned answers); layer {result.best_layer} "
        f"(chosen on the {result.chosen_on}): last-prompt AUROC {a.fmt(best.prompt.value, 3)} "
        f"[{a.fmt(best.prompt.low, 3)}, {a.fmt(best.prompt.high, 3)}], answer-token AUROC "
        f"{a.fmt(best.answer.value, 3)}"
    )
    return 0


def run_steer(args: argparse.Namespace) -> int:
    from emmoe_dist.analyze.steer import SteerOptions, run_steer

    result = run_steer(
        SteerOptions(
            model=args.model,
            directions=args.directions,
            out=args.out,
            kind=args.kind,
            layers=tuple(args.layers) if args.layers else None,
            mode=args.mode,
            alphas=tuple(args.alphas),
            control=not args.no_control,
            router=interp_experts.router_steer(args),
            generation=a.generation(args),
            judge=a.judge_config(args),
            scripted_judge=args.scripted_judge,
            resamples=args.resamples,
            **a.shared(args),
        ),
        say=print,
    )
    if result.unjudged:
        print(
            f"{len(result.unjudged)} of {result.answer_sets} answer sets are not judged yet: "
            "judge each generations.jsonl into judged.jsonl beside it (emmoe judge) and re-run "
            "to draw the curve"
        )
    for p in result.points:
        rate = None if p.misaligned.value is None else 100 * p.misaligned.value
        print(
            f"{p.condition:>9} alpha {p.alpha:+g}: {a.fmt(rate)}% misaligned, mean alignment "
            f"{a.fmt(p.alignment.value)} ({p.n} answers)"
        )
    return 0


def run_monitor(args: argparse.Namespace) -> int:
    from emmoe_dist.analyze.monitor import MonitorOptions, run_monitor

    result = run_monitor(
        MonitorOptions(
            model=args.model,
            experiment=args.config,
            overrides=tuple(args.overrides),
            out=args.out,
            run=a.run_options(args),
        ),
        say=print,
    )
    for key, value in result["reading"].items():
        print(f"{key}: {value:.6g}")
    return 0


def run_routing_shift(args: argparse.Namespace) -> int:
    from emmoe_dist.analyze.routing_shift import RoutingShiftOptions, run_routing_shift

    result = run_routing_shift(
        RoutingShiftOptions(
            model=args.model,
            out=args.out,
            records=args.records,
            data=args.data,
            data_dir=args.data_dir,
            allow_unverified_data=args.allow_unverified_data,
            base=args.base,
            selection=args.selection,
            limit=args.limit,
            include_prompt=args.include_prompt,
            epsilon=args.epsilon,
            permutations=args.permutations,
            **a.shared(args),
        ),
        say=print,
    )
    shift = result.shift
    top = max(shift.layers, key=lambda s: s.kl)
    line = (
        f"largest shift at MoE layer {top.layer}: KL {top.kl:.4g} nats, "
        f"{100 * top.total_variation:.1f}% of routing moved"
    )
    if shift.mean_trained_auroc is not None:
        line += (
            f"; trained experts vs the rest by |change of share|: AUROC "
            f"{shift.mean_trained_auroc:.3f} (permutation p = {shift.permutation_p:.3g})"
        )
    print(line)
    return 0
