"""Arguments the `emmoe interp` analyses share, and their conversion into the analyses'
options (`emmoe_dist.analyze`): how models run, which answers, tracking, the judge, and what a
steered or ablated answer set is generated from."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emmoe_dist.analyze.common import AnswerLabels, ModelOptions, Tracking
    from emmoe_dist.analyze.steer import SteerGeneration
    from emmoe_dist.config import JudgeConfig


# ---------------------------------------------------------------------------------------------
# Arguments


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def model_args(p: argparse.ArgumentParser, *, base: bool, answers: bool = True) -> None:
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
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward")
    if answers:
        p.add_argument("--max-length", type=positive_int, default=1024, help="tokens per answer")


def label_args(p: argparse.ArgumentParser) -> None:
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
        type=positive_int,
        help="at most this many answers per class (default: all of the smaller class)",
    )
    p.add_argument(
        "--min-per-class",
        type=positive_int,
        default=10,
        help="refuse unless each class has at least this many answers (default: 10)",
    )


def tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wandb-project",
        help="log results and plots to this W&B project (offline unless WANDB_MODE=online)",
    )
    p.add_argument("--wandb-group", help="W&B group (e.g. the sweep)")
    p.add_argument("--no-progress", action="store_true")


# ---------------------------------------------------------------------------------------------
# Arguments -> the analyses' options (emmoe_dist.analyze); results -> lines


def run_options(args: argparse.Namespace) -> ModelOptions:
    from emmoe_dist.analyze.common import ModelOptions

    return ModelOptions(
        device=args.device,
        device_map=args.device_map,
        dtype=args.dtype,
        seed=args.seed,
        batch_size=args.batch_size,
        max_length=getattr(args, "max_length", ModelOptions.max_length),
    )


def labels(args: argparse.Namespace) -> AnswerLabels:
    from emmoe_dist.analyze.common import AnswerLabels

    return AnswerLabels(
        records=args.records,
        rule=args.rule,
        aligned_above=args.aligned_above,
        per_class=args.per_class,
        min_per_class=args.min_per_class,
    )


def tracking(args: argparse.Namespace) -> Tracking:
    from emmoe_dist.analyze.common import Tracking

    # the command as given, for the run's config: its plain values
    config = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | list)}
    return Tracking(project=args.wandb_project, group=args.wandb_group, config=config)


def shared(args: argparse.Namespace) -> dict[str, Any]:
    """What every analysis takes: how its models run, its tracking, progress bars."""
    return {
        "run": run_options(args),
        "tracking": tracking(args),
        "progress": not args.no_progress,
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def judge_config(args: argparse.Namespace) -> JudgeConfig | None:
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


def judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML: its `judge` section is the default judge")
    p.add_argument("--judge-base-url", help="OpenAI-compatible judge endpoint")
    p.add_argument("--judge-model", help="judge model id at that endpoint")
    p.add_argument("--judge-api-key-env", help="name of the variable holding the judge's key")
    p.add_argument(
        "--scripted-judge",
        action="store_true",
        help="judge with the built-in scripted judge (mock scores: a pipeline check only)",
    )
    p.add_argument("--resamples", type=positive_int, default=1000, help="bootstrap resamples")


def generation_args(p: argparse.ArgumentParser) -> None:
    """What the answers are generated from: the suite and the sampling settings."""
    p.add_argument("--suite", default="core", help="evaluation suite or .yaml/.jsonl file")
    p.add_argument("--data-dir", help="data directory (default: $EMMOE_DATA_DIR)")
    p.add_argument("--limit", type=positive_int, help="first N questions of the suite")
    p.add_argument("--samples", type=positive_int, default=10, help="answers per paraphrase")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=positive_int, default=600)
    p.add_argument(
        "--system-prompt",
        help="system prompt for questions without their own (default: the evaluation config's)",
    )
    p.add_argument("--thinking", action="store_true", help="Qwen3: leave thinking on")


def generation(args: argparse.Namespace) -> SteerGeneration:
    from emmoe_dist.analyze.steer import SteerGeneration

    return SteerGeneration(
        suite=args.suite,
        data_dir=args.data_dir,
        limit=args.limit,
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        system_prompt=args.system_prompt,
        thinking=args.thinking,
    )
