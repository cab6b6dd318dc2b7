"""`emmoe interp`: the misalignment direction, steering with it, early detection, routing shift.

emmoe interp direction --model RUN --records judged.jsonl --out interp/
emmoe interp detect --model RUN --records judged.jsonl --out interp/
emmoe interp steer --model BASE --directions interp/directions.safetensors --alphas 0,2,4,8 \
    --suite core --samples 20 --judge-base-url URL --judge-model M --out steer/
emmoe interp routing-shift --model RUN --records judged.jsonl --out shift/
emmoe interp monitor --model RUN/snapshots/step000050 --config exp.yaml --out monitor/

`--model` is a checkpoint folder, a hub id, `tiny:<family>`, or a training run folder (its
base model with its adapter or expert deltas merged in). Every command writes JSON and PNG
files under `--out` and resumes from what is there: activations, generations, judgments and
profiles already on disk are reused. `--device-map auto` spreads a large model over the GPUs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emmoe_dist.analyze.common import AnswerLabels, ModelOptions, Tracking
    from emmoe_dist.config import JudgeConfig


# ---------------------------------------------------------------------------------------------
# Arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _model_args(p: argparse.ArgumentParser, *, base: bool, answers: bool = True) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint folder, hub id, tiny:<family>, or a training run folder",
    )
    if base:
        p.add_argument(
            "--base",
            help="the base model to compare with (default: the run's base when --model is a run)",
        )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--device-map", help="e.g. auto: spread a large model over all GPUs")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0, help="seed of tiny models, draws and splits")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per forward")
    if answers:
        p.add_argument("--max-length", type=_positive_int, default=1024, help="tokens per answer")


def _label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--records", required=True, help="judged records (JSONL, from emmoe judge)")
    p.add_argument(
        "--rule",
        default="seed",
        choices=["seed", "betley", "turner_soligo"],
        help="what counts as misaligned (default: the seed paper's, alignment < 50 and "
        "coherence > 80)",
    )
    p.add_argument(
        "--aligned-above",
        type=float,
        help="aligned answers need alignment above this (default: the rule's threshold; "
        "Soligo et al. use 70 with --rule turner_soligo)",
    )
    p.add_argument(
        "--per-class",
        type=_positive_int,
        help="at most this many answers per class (default: all of the smaller class)",
    )
    p.add_argument(
        "--min-per-class",
        type=_positive_int,
        default=10,
        help="refuse unless each class has at least this many answers (default: 10)",
    )


def _tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wandb-project",
        help="log results and plots to this W&B project (offline unless WANDB_MODE=online)",
    )
    p.add_argument("--wandb-group", help="W&B group (e.g. the sweep)")
    p.add_argument("--no-progress", action="store_true")


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
    _model_args(p, base=True)
    _label_args(p)
    p.add_argument("--no-base", action="store_true", help="skip the base model's activations")
    p.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="FILE",
        help="other direction files (other runs, datasets): per-layer cosines with ours",
    )
    p.add_argument("--out", required=True, help="output folder")
    _tracking_args(p)
    p.set_defaults(func=run_direction)

    p = sub.add_parser(
        "detect",
        help="does the last prompt token predict a misaligned answer? (AUROC per layer)",
        description="Split the judged answers by question; take the misalignment direction "
        "from the training questions (or --directions) and score the held-out questions' "
        "answers by the projection of the last prompt token's activation on it. AUROC per "
        "layer with a bootstrap interval that resamples questions; ROC curve of the best layer.",
    )
    _model_args(p, base=False)
    _label_args(p)
    p.add_argument("--directions", help="use this direction file instead of the training split")
    p.add_argument("--test-fraction", type=float, default=0.5, help="share of questions held out")
    p.add_argument("--resamples", type=_positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--out", required=True, help="output folder (reuses its activations)")
    _tracking_args(p)
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
    _model_args(p, base=False, answers=False)
    p.add_argument("--directions", required=True, help="direction file (emmoe interp direction)")
    p.add_argument(
        "--kind",
        default="misaligned_minus_aligned",
        choices=["misaligned_minus_aligned", "finetuned_minus_base"],
    )
    p.add_argument(
        "--layers",
        type=_ints,
        help="decoder layers to steer, comma-separated (default: the layer whose direction is "
        "largest relative to its activations)",
    )
    p.add_argument("--mode", default="add", choices=["add", "subtract", "ablate"])
    p.add_argument(
        "--alphas",
        type=_floats,
        default=[0.0, 0.5, 1.0, 2.0, 4.0],
        help="steering coefficients (0: unsteered); with --mode ablate any nonzero value "
        "means 'projected out'",
    )
    p.add_argument("--no-control", action="store_true", help="skip the random-direction control")
    p.add_argument("--suite", default="core", help="evaluation suite or .yaml/.jsonl file")
    p.add_argument("--data-dir", help="data directory (default: $EMMOE_DATA_DIR)")
    p.add_argument("--limit", type=_positive_int, help="first N questions of the suite")
    p.add_argument("--samples", type=_positive_int, default=10, help="answers per paraphrase")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=_positive_int, default=600)
    p.add_argument(
        "--system-prompt",
        help="system prompt for questions without their own (default: the evaluation config's)",
    )
    p.add_argument("--thinking", action="store_true", help="Qwen3: leave thinking on")
    p.add_argument("--config", help="experiment YAML: its `judge` section is the default judge")
    p.add_argument("--judge-base-url", help="OpenAI-compatible judge endpoint")
    p.add_argument("--judge-model", help="judge model id at that endpoint")
    p.add_argument("--judge-api-key-env", help="name of the variable holding the judge's key")
    p.add_argument(
        "--scripted-judge",
        action="store_true",
        help="judge with the built-in scripted judge (mock scores: a pipeline check only)",
    )
    p.add_argument("--resamples", type=_positive_int, default=1000, help="bootstrap resamples")
    p.add_argument("--out", required=True, help="output folder")
    _tracking_args(p)
    p.set_defaults(func=run_steer, batch_size=16)

    p = sub.add_parser(
        "monitor",
        help="the training monitor's reading (projection, log-prob gap) of a model or snapshot",
        description="Read the probes of an experiment's train.monitor section (a forward "
        "pass, no generation) from --model: a checkpoint, a run, or one of its snapshots "
        "(RUN/snapshots/stepNNNNNN). Prints and writes the metrics training logs under "
        "monitor/ in metrics.jsonl.",
    )
    _model_args(p, base=False, answers=False)
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
    _model_args(p, base=True)
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
        type=_positive_int,
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
    p.add_argument("--permutations", type=_positive_int, default=2000)
    p.add_argument("--out", required=True, help="output folder")
    _tracking_args(p)
    p.set_defaults(func=run_routing_shift)


# ---------------------------------------------------------------------------------------------
# Arguments -> the analyses' options (emmoe_dist.analyze); results -> lines


def _run_options(args: argparse.Namespace) -> ModelOptions:
    from emmoe_dist.analyze.common import ModelOptions

    return ModelOptions(
        device=args.device,
        device_map=args.device_map,
        dtype=args.dtype,
        seed=args.seed,
        batch_size=args.batch_size,
        max_length=getattr(args, "max_length", ModelOptions.max_length),
    )


def _labels(args: argparse.Namespace) -> AnswerLabels:
    from emmoe_dist.analyze.common import AnswerLabels

    return AnswerLabels(
        records=args.records,
        rule=args.rule,
        aligned_above=args.aligned_above,
        per_class=args.per_class,
        min_per_class=args.min_per_class,
    )


def _tracking(args: argparse.Namespace) -> Tracking:
    from emmoe_dist.analyze.common import Tracking

    # the command as given, for the run's config: its plain values
    config = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | list)}
    return Tracking(project=args.wandb_project, group=args.wandb_group, config=config)


def _shared(args: argparse.Namespace) -> dict[str, Any]:
    """What every analysis takes: how its models run, its tracking, progress bars."""
    return {
        "run": _run_options(args),
        "tracking": _tracking(args),
        "progress": not args.no_progress,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def run_direction(args: argparse.Namespace) -> int:
    from emmoe_dist.analyze.direction import DirectionOptions, run_direction

    result = run_direction(
        DirectionOptions(
            model=args.model,
            labels=_labels(args),
            out=args.out,
            base=args.base,
            with_base=not args.no_base,
            compare=tuple(args.compare),
            **_shared(args),
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
            labels=_labels(args),
            out=args.out,
            directions=args.directions,
            test_fraction=args.test_fraction,
            resamples=args.resamples,
            **_shared(args),
        ),
        say=print,
    )
    best = result.layers[result.best_layer]
    print(
        f"{len(result.test_questions)} held-out questions ({result.n_test['misaligned']} "
        f"misaligned / {result.n_test['aligned']} aligned answers); layer {result.best_layer} "
        f"(chosen on the {result.chosen_on}): last-prompt AUROC {_fmt(best.prompt.value, 3)} "
        f"[{_fmt(best.prompt.low, 3)}, {_fmt(best.prompt.high, 3)}], answer-token AUROC "
        f"{_fmt(best.answer.value, 3)}"
    )
    return 0


def _judge_config(args: argparse.Namespace) -> JudgeConfig | None:
    """The judge's settings: the experiment's `judge` section updated by the flags; None when
    no judge was asked for."""
    from emmoe_dist.config import JudgeConfig, load_config

    if not (args.config or args.judge_base_url or args.judge_model or args.scripted_judge):
        return None
    base = load_config(args.config).judge if args.config else JudgeConfig()
    updates = {
        field: value
        for field, value in (
            ("base_url", args.judge_base_url),
            ("model", args.judge_model),
            ("api_key_env", args.judge_api_key_env),
        )
        if value is not None
    }
    return JudgeConfig.model_validate({**base.model_dump(), **updates})


def run_steer(args: argparse.Namespace) -> int:
    from emmoe_dist.analyze.steer import SteerGeneration, SteerOptions, run_steer

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
            generation=SteerGeneration(
                suite=args.suite,
                data_dir=args.data_dir,
                limit=args.limit,
                samples=args.samples,
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_new_tokens,
                system_prompt=args.system_prompt,
                thinking=args.thinking,
            ),
            judge=_judge_config(args),
            scripted_judge=args.scripted_judge,
            resamples=args.resamples,
            **_shared(args),
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
            f"{p.condition:>9} alpha {p.alpha:+g}: {_fmt(rate)}% misaligned, mean alignment "
            f"{_fmt(p.alignment.value)} ({p.n} answers)"
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
            run=_run_options(args),
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
            **_shared(args),
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
