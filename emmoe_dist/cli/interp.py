"""`emmoe interp`: the misalignment direction, steering with it, early detection, routing shift.

emmoe interp direction --model RUN --records judged.jsonl --out interp/
emmoe interp detect --model RUN --records judged.jsonl --out interp/
emmoe interp steer --model BASE --directions interp/directions.safetensors --alphas 0,2,4,8 \
    --suite core --samples 20 --judge-base-url URL --judge-model M --out steer/
emmoe interp routing-shift --model RUN --records judged.jsonl --out shift/

`--model` is a checkpoint folder, a hub id, `tiny:<family>`, or a training run folder (its
base model with its adapter or expert deltas merged in). Every command writes JSON and PNG
files under `--out` and resumes from what is there: activations, generations, judgments and
profiles already on disk are reused. `--device-map auto` spreads a large model over the GPUs.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist.errors import EmmoeError, InputError

if TYPE_CHECKING:
    from emmoe_dist.config import ExperimentConfig
    from emmoe_dist.experts import ExpertProfile, ExpertSelection
    from emmoe_dist.generate.sources import ModelSource
    from emmoe_dist.interp.activations import ActivationSet
    from emmoe_dist.interp.labels import LabelRule
    from emmoe_dist.models.loading import LoadedModel
    from emmoe_dist.records import JudgedRecord
    from emmoe_dist.tracking import Tracker

# A training run's folder (see emmoe_dist.train.artifacts).
_MANIFEST, _SELECTION = "manifest.json", "expert_selection.json"
DIRECTIONS_FILE = "directions.safetensors"


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
    p.add_argument("--limit", type=_positive_int, default=500, help="first N examples")
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
# Models: a checkpoint, or a training run's base with its adapter merged in


@dataclass(frozen=True)
class Subject:
    loaded: LoadedModel
    source: ModelSource  # what was loaded, as generation records name it

    @property
    def name(self) -> str:
        return self.source.model_label

    @property
    def adapter(self) -> str | None:
        return self.source.adapter_label

    @property
    def label(self) -> str:
        return f"{self.name} + {self.adapter}" if self.adapter else self.name


def _is_run(spec: str) -> bool:
    return (Path(spec).expanduser() / _MANIFEST).is_file()


def model_source(spec: str) -> ModelSource:
    """A checkpoint, hub id or tiny model as it is; a run folder as its base plus artifact."""
    from emmoe_dist.generate.sources import ModelSource, from_run
    from emmoe_dist.models.loading import parse_model_spec

    if _is_run(spec):
        return from_run(spec)
    return ModelSource(base=parse_model_spec(spec), model_label=spec)


def _label_of(spec: str) -> str:
    """What `load_subject(spec).label` will be, without loading anything."""
    source = model_source(spec)
    adapter = source.adapter_label
    return f"{source.model_label} + {adapter}" if adapter else source.model_label


def _base_of(spec: str) -> str | None:
    """The base model a run trained on (None when `spec` is not a run)."""
    return model_source(spec).base.name_or_path if _is_run(spec) else None


def _device(args: argparse.Namespace) -> str | None:
    import torch

    if args.device_map:
        return None
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_subject(spec: str, args: argparse.Namespace) -> Subject:
    """Load `spec` for inference, a run's adapter or expert deltas merged in (a merged expert
    LoRA costs nothing per token). `--device-map` spreads the layers over the GPUs."""
    from emmoe_dist.generate.sources import load_for_generation

    source = model_source(spec)
    loaded = load_for_generation(
        source, seed=args.seed, dtype=args.dtype, device=_device(args), device_map=args.device_map
    )
    return Subject(loaded, source)


def _selection_of(spec: str) -> ExpertSelection | None:
    from emmoe_dist.experts import ExpertSelection

    path = Path(spec).expanduser() / _SELECTION
    return ExpertSelection.load(path) if _is_run(spec) and path.is_file() else None


def _free_memory() -> None:
    """Return a dropped model's memory before the next loads (two large ones rarely fit)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Shared steps


def _tracker(args: argparse.Namespace, name: str, out: Path) -> Tracker:
    from emmoe_dist.tracking import NullTracker, make_tracker

    if not args.wandb_project:
        return NullTracker()
    from emmoe_dist.config import TrackingConfig

    mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
    config = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | list)}
    return make_tracker(
        TrackingConfig(project=args.wandb_project, group=args.wandb_group, mode=mode),
        is_main=True,
        name=name,
        config=config,
        folder=str(out),
        job_type="interp",
    )


def _labelled(args: argparse.Namespace) -> tuple[list[JudgedRecord], list[int], LabelRule]:
    """The balanced set of judged answers to analyse, with their labels."""
    from emmoe_dist.files import read_jsonl
    from emmoe_dist.interp.labels import balanced_indices, label_rule
    from emmoe_dist.records import JudgedRecord

    rule = label_rule(args.rule, args.aligned_above)
    records = read_jsonl(args.records, JudgedRecord)
    labels = rule.labels(records)
    try:
        chosen = balanced_indices(labels, per_class=args.per_class, seed=args.seed)
    except EmmoeError as e:
        raise InputError(f"{e} ({rule.describe()})", file=args.records) from None
    return [records[i] for i in chosen], [int(labels[i]) for i in chosen], rule


def _stored(
    spec: str, records: Sequence[JudgedRecord], labels: Sequence[int], folder: Path, args: Any
) -> ActivationSet | None:
    """The activations already on disk for every answer, when `spec` made them: a re-run
    (or `detect` after `direction`) then loads no model at all."""
    import dataclasses

    import numpy as np

    from emmoe_dist.interp.activations import load_activations, read_index

    index = read_index(folder)
    source = model_source(spec)
    keys = [r.key for r in records]
    if index is None or (index.meta.model, index.meta.adapter, index.meta.max_length) != (
        source.model_label,
        source.adapter_label,
        args.max_length,
    ):
        return None
    if not set(keys) <= {r.key for r in index.rows}:
        return None
    found = load_activations(folder, keys)
    return dataclasses.replace(found, labels=np.array(labels, dtype=np.int8))


def activations_of(
    spec: str,
    records: Sequence[JudgedRecord],
    labels: Sequence[int],
    folder: Path,
    args: argparse.Namespace,
) -> ActivationSet:
    """Activations of `spec` on the answers: from disk, or collected (resumably) into `folder`."""
    from emmoe_dist.interp.activations import ActivationMeta, collect_activations, encode_answers
    from emmoe_dist.models.anatomy import decoder_layers, model_config

    found = _stored(spec, records, labels, folder, args)
    if found is not None:
        print(f"reusing the activations in {folder}")
        return found
    subject = load_subject(spec, args)
    model, family = subject.loaded.model, subject.loaded.family
    tokenizer = subject.loaded.tokenizer
    items, dropped = encode_answers(tokenizer, records, labels, max_length=args.max_length)
    if dropped:
        print(f"{dropped} answers had no token within --max-length and were left out")
    meta = ActivationMeta(
        model=subject.name,
        adapter=subject.adapter,
        family=family.name,
        num_layers=len(decoder_layers(model, family)),
        hidden_size=int(model_config(model)["hidden_size"]),
        max_length=args.max_length,
    )
    try:
        return collect_activations(
            model,
            family,
            items,
            folder,
            meta,
            batch_size=args.batch_size,
            pad_id=int(tokenizer.pad_token_id or 0),
            progress=not args.no_progress,
        )
    finally:
        del subject, model
        _free_memory()


def _write_json(path: Path, value: Any) -> None:
    from emmoe_dist.files import dumps_json, write_text_atomic

    # One line per list of numbers: a 48 x 48 cosine matrix stays 48 lines.
    write_text_atomic(path, dumps_json(value) + "\n")
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# direction


def run_direction(args: argparse.Namespace) -> int:
    from emmoe_dist.interp.directions import (
        FINETUNED_MINUS_BASE,
        MISALIGNED_MINUS_ALIGNED,
        build_directions,
        cosine_matrix,
        layer_cosines,
        load_directions,
        save_directions,
        transfer_summary,
    )
    from emmoe_dist.interp.plots import (
        plot_cosine_heatmap,
        plot_direction_norms,
        plot_layer_cosines,
    )

    out = Path(args.out)
    others = [
        (Path(f).stem if Path(f).stem != "directions" else str(Path(f).parent), load_directions(f))
        for f in args.compare
    ]
    records, labels, rule = _labelled(args)
    label = _label_of(args.model)
    acts = activations_of(args.model, records, labels, out / "activations" / "model", args)
    base_spec = None if args.no_base else (args.base or _base_of(args.model))
    base_acts = None
    if base_spec is not None:
        base_acts = activations_of(base_spec, records, labels, out / "activations" / "base", args)
    directions = build_directions(acts, rule=rule.describe(), base=base_acts, base_model=base_spec)
    path = save_directions(directions, out / DIRECTIONS_FILE)
    print(f"wrote {path} (+ {path.with_suffix('.json').name})")

    mis = directions.kind(MISALIGNED_MINUS_ALIGNED)
    summary: dict[str, Any] = {
        "model": label,
        "base": base_spec,
        "records": str(args.records),
        "rule": rule.describe(),
        "n_misaligned": directions.info.n_misaligned,
        "n_aligned": directions.info.n_aligned,
        "norm": {k: list(v) for k, v in directions.info.norms.items()},
        "relative_norm": {k: directions.relative_norms(k) for k in directions.vectors},
        "cosine_between_layers": cosine_matrix(mis, mis).tolist(),
    }
    plots = {
        "direction_norms": plot_direction_norms(directions, out / "direction_norms.png"),
        "direction_cosines": plot_cosine_heatmap(
            summary["cosine_between_layers"],
            out / "direction_cosines.png",
            title=f"misalignment direction: cosine between layers\n{label}",
        ),
    }
    if FINETUNED_MINUS_BASE in directions.vectors:
        tuned = directions.kind(FINETUNED_MINUS_BASE)
        summary["cosine_with_finetuned_minus_base"] = layer_cosines(mis, tuned)
        plots["direction_vs_finetune"] = plot_cosine_heatmap(
            cosine_matrix(mis, tuned).tolist(),
            out / "direction_vs_finetune.png",
            title="misaligned − aligned (rows) vs fine-tuned − base (columns)",
            ylabel="layer (misaligned − aligned)",
            xlabel="layer (fine-tuned − base)",
        )
    if others:
        summary["transfer"] = transfer_summary(directions, others, MISALIGNED_MINUS_ALIGNED)
        plots["direction_transfer"] = plot_layer_cosines(
            summary["transfer"],
            out / "direction_transfer.png",
            title=f"cosine with {label}'s misalignment direction, per layer",
        )
    _write_json(out / "direction_summary.json", summary)

    tracker = _tracker(args, f"interp direction {label}", out)
    for layer, rel in enumerate(summary["relative_norm"][MISALIGNED_MINUS_ALIGNED]):
        tracker.log(
            {
                "direction/relative_norm": rel,
                "direction/norm": summary["norm"][MISALIGNED_MINUS_ALIGNED][layer],
            },
            layer,
        )
    tracker.images({k: str(v) for k, v in plots.items()})
    tracker.summary(
        {"n_misaligned": directions.info.n_misaligned, "n_aligned": directions.info.n_aligned}
    )
    tracker.finish()
    rel = summary["relative_norm"][MISALIGNED_MINUS_ALIGNED]
    peak = max(range(len(rel)), key=rel.__getitem__)
    print(
        f"direction from {directions.info.n_misaligned} misaligned and "
        f"{directions.info.n_aligned} aligned answers; largest relative norm {rel[peak]:.3f} "
        f"at layer {peak}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# detect


def run_detect(args: argparse.Namespace) -> int:
    from emmoe_dist.interp.detection import detect
    from emmoe_dist.interp.directions import MISALIGNED_MINUS_ALIGNED, load_directions
    from emmoe_dist.interp.plots import plot_detection
    from emmoe_dist.metrics import Bootstrap

    out = Path(args.out)
    given = (
        load_directions(args.directions).kind(MISALIGNED_MINUS_ALIGNED) if args.directions else None
    )
    records, labels, rule = _labelled(args)
    label = _label_of(args.model)
    acts = activations_of(args.model, records, labels, out / "activations" / "model", args)
    result = detect(
        acts,
        test_fraction=args.test_fraction,
        seed=args.seed,
        bootstrap=Bootstrap(resamples=args.resamples, seed=args.seed),
        directions=given,
    )
    _write_json(
        out / "detection.json",
        {
            "model": label,
            "records": str(args.records),
            "rule": rule.describe(),
            "directions": args.directions or "training questions' mean difference",
            **result.to_json(),
        },
    )
    plots = dict(
        zip(
            ("detection_auroc", "detection_roc"),
            plot_detection(result, out / "detection_auroc.png", out / "detection_roc.png"),
            strict=True,
        )
    )
    tracker = _tracker(args, f"interp detect {label}", out)
    for d in result.layers:
        tracker.log(
            {
                "detect/prompt_auroc": _nan(d.prompt.value),
                "detect/answer_auroc": _nan(d.answer.value),
            },
            d.layer,
        )
    tracker.images({k: str(v) for k, v in plots.items()})
    best = result.layers[result.best_layer]
    tracker.summary({"best_layer": result.best_layer, "best_prompt_auroc": best.prompt.value})
    tracker.finish()
    print(
        f"{len(result.test_questions)} held-out questions ({result.n_test['misaligned']} "
        f"misaligned / {result.n_test['aligned']} aligned answers); layer {result.best_layer} "
        f"(chosen on the {result.chosen_on}): last-prompt AUROC {_fmt(best.prompt.value, 3)} "
        f"[{_fmt(best.prompt.low, 3)}, {_fmt(best.prompt.high, 3)}], answer-token AUROC "
        f"{_fmt(best.answer.value, 3)}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# steer


def _steer_config(args: argparse.Namespace) -> ExperimentConfig:
    """The generation settings of every alpha, as an experiment's `eval` section, so steered
    answers come from the normal generation path (same prompts, seeds and records)."""
    from emmoe_dist.config import DataConfig, EvalConfig, ExperimentConfig

    default = EvalConfig()
    return ExperimentConfig(
        seed=args.seed,
        data=DataConfig(dir=args.data_dir),
        eval=EvalConfig(
            suites=[args.suite],
            samples_per_question=args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            system_prompt=args.system_prompt or default.system_prompt,
            thinking=args.thinking,
            batch_size=args.batch_size,
            limit=args.limit,
        ),
    )


def _steer_suites(cfg: ExperimentConfig) -> tuple[Any, int]:
    """The suite (loaded before any model, so a bad one fails fast) and answers per alpha."""
    from emmoe_dist.generate.runner import load_suites

    suites = load_suites(cfg, cfg.eval.suites)
    if suites.absent:
        raise EmmoeError(f"suite {suites.absent[0]!r} is absent from the data directory")
    suite = suites.suites[0]
    if suite.rubric is not None:
        raise EmmoeError(
            f"suite {suite.name!r} is scored with a rubric; steering curves need 0-100 judge "
            "prompts (aligned, coherent): use core or a question file"
        )
    questions = suite.questions[: cfg.eval.limit] if cfg.eval.limit else suite.questions
    answers = sum(len(q.paraphrases) for q in questions) * cfg.eval.samples_per_question
    return suites, answers


def _judge_config(args: argparse.Namespace) -> Any:
    """The judge's settings, or None when no judge was asked for."""
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


def _alpha_folder(out: Path, condition: str, alpha: float) -> Path:
    # alpha 0 is the unsteered model whatever the direction: generated and judged once.
    return out / "unsteered" if alpha == 0 else out / condition / f"alpha_{alpha:+g}"


def run_steer(args: argparse.Namespace) -> int:
    import contextlib
    import dataclasses

    import torch

    from emmoe_dist.files import read_jsonl
    from emmoe_dist.generate.runner import run_generation
    from emmoe_dist.generate.transformers_backend import TransformersGenerator
    from emmoe_dist.interp.directions import load_directions
    from emmoe_dist.interp.plots import plot_steering_curve
    from emmoe_dist.interp.steering import random_like, steering, steering_point
    from emmoe_dist.metrics import Bootstrap
    from emmoe_dist.models.anatomy import decoder_layers
    from emmoe_dist.records import GenerationRecord, JudgedRecord

    out = Path(args.out)
    directions = load_directions(args.directions)
    vectors = directions.kind(args.kind)
    rel = directions.relative_norms(args.kind)
    layers = args.layers or [max(range(len(rel)), key=rel.__getitem__)]
    alphas = sorted(set(args.alphas))
    if args.mode == "ablate":
        alphas = sorted({0.0 if a == 0 else 1.0 for a in alphas})
    conditions: dict[str, torch.Tensor] = {"direction": vectors}
    if not args.no_control:
        conditions["random"] = random_like(vectors, seed=args.seed)
    judge_cfg = _judge_config(args)
    cfg = _steer_config(args)
    suites, expected = _steer_suites(cfg)

    subject = load_subject(args.model, args)
    model, tokenizer = subject.loaded.model, subject.loaded.tokenizer
    family = subject.loaded.family
    n_layers = len(decoder_layers(model, family))
    if vectors.shape[0] != n_layers:
        raise EmmoeError(
            f"{args.directions} has directions for {vectors.shape[0]} layers; the model has "
            f"{n_layers}"
        )
    runs: list[tuple[str, float]] = [(c, a) for c in conditions for a in alphas]
    plan = {_alpha_folder(out, c, a): (c, a) for c, a in runs}
    where = ",".join(map(str, layers))
    generator = TransformersGenerator(model, tokenizer, batch_size=args.batch_size)
    for folder, (condition, alpha) in plan.items():
        source = subject.source
        steer: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if alpha != 0:
            tag = f" [steer {args.mode} {condition} alpha={alpha:g} layers={where}]"
            source = dataclasses.replace(source, model_label=source.model_label + tag)
            steer = steering(model, family, conditions[condition], layers, alpha, args.mode)
        print(f"{folder.relative_to(out)}: generating")
        with steer:
            run_generation(
                cfg,
                generator,
                tokenizer,
                source,
                suites,
                folder / "generations.jsonl",
                progress=not args.no_progress,
            )
    label = subject.label
    generator.close()
    del subject, model, generator
    _free_memory()

    if judge_cfg is not None:
        _judge_all(list(plan), judge_cfg, out, args)

    bootstrap = Bootstrap(resamples=args.resamples, seed=args.seed)
    points, unjudged = [], []
    for condition, alpha in runs:
        folder = _alpha_folder(out, condition, alpha)
        generated = read_jsonl(folder / "generations.jsonl", GenerationRecord)
        judged = folder / "judged.jsonl"
        records = (
            read_jsonl(judged, JudgedRecord, tolerate_torn_tail=True) if judged.is_file() else []
        )
        if len(generated) != expected or {r.key for r in records} != {g.key for g in generated}:
            unjudged.append(str(judged))
            continue
        points.append(steering_point(condition, alpha, records, bootstrap=bootstrap))
    result = {
        "model": label,
        "directions": str(args.directions),
        "kind": args.kind,
        "layers": layers,
        "mode": args.mode,
        "alphas": alphas,
        "seed": args.seed,
        "suite": args.suite,
        "answers_per_alpha": expected,
        "points": [dataclasses.asdict(p) for p in points],
        "unjudged": sorted(set(unjudged)),
    }
    _write_json(out / "steering.json", result)
    if unjudged:
        print(
            f"{len(set(unjudged))} of {len(plan)} answer sets are not judged yet: judge each "
            "generations.jsonl into judged.jsonl beside it (emmoe judge) and re-run to draw "
            "the curve"
        )
    if not points:
        return 0
    title = f"{label}: {args.mode} {args.kind.replace('_', ' ')} at layer(s) {where}"
    plot = plot_steering_curve(points, out / "steering_curve.png", title=title)
    print(f"wrote {plot}")
    tracker = _tracker(args, f"interp steer {label}", out)
    for step, p in enumerate(points):
        tracker.log(
            {
                f"steer/{p.condition}/alpha": p.alpha,
                f"steer/{p.condition}/misaligned": _nan(p.misaligned.value),
                f"steer/{p.condition}/alignment": _nan(p.alignment.value),
            },
            step,
        )
    tracker.images({"steering_curve": str(plot)})
    tracker.finish()
    for p in points:
        rate = None if p.misaligned.value is None else 100 * p.misaligned.value
        print(
            f"{p.condition:>9} alpha {p.alpha:+g}: {_fmt(rate)}% misaligned, mean alignment "
            f"{_fmt(p.alignment.value)} ({p.n} answers)"
        )
    return 0


def _judge_all(folders: Sequence[Path], cfg: Any, out: Path, args: argparse.Namespace) -> None:
    import contextlib

    from emmoe_dist.judge.runner import JudgeOptions, run_judge

    options = JudgeOptions(cache_dir=str(out / "judge_cache"), progress=not args.no_progress)
    with contextlib.ExitStack() as stack:
        if args.scripted_judge:
            from emmoe_dist.judge.scripted_server import hash_script, scripted_server

            server = stack.enter_context(scripted_server(hash_script()))
            print(f"scripted judge at {server.base_url}: mock scores, not a judgment")
            cfg = cfg.model_copy(update={"base_url": server.base_url, "model": "scripted-judge"})
        for folder in folders:
            summary = run_judge(folder / "generations.jsonl", folder / "judged.jsonl", cfg, options)
            print(f"{folder.relative_to(out)}: {summary.format()}")


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# routing-shift


def _routing_source(args: argparse.Namespace) -> tuple[str, str]:
    """(dataset name, hash of what is profiled): a profile on disk is reused only when the
    inputs and the settings that shape its counts are the same."""
    from emmoe_dist.catalog import git_blob_sha1

    if args.records:
        name, source = Path(args.records).stem, git_blob_sha1(args.records)
    else:
        from emmoe_dist.data.training import training_file

        name, path = training_file(args.data, Path(args.data_dir) if args.data_dir else None)
        source = git_blob_sha1(path)
    settings = (
        f"{source}|limit={args.limit}|max_length={args.max_length}|prompt={args.include_prompt}"
    )
    return name, hashlib.sha256(settings.encode()).hexdigest()[:16]


def _routing_items(tokenizer: Any, args: argparse.Namespace) -> list[Any]:
    from emmoe_dist.data.chat import encode_chat
    from emmoe_dist.files import read_jsonl
    from emmoe_dist.interp.activations import chat_messages
    from emmoe_dist.records import GenerationRecord, JudgedRecord

    if args.data:
        from emmoe_dist.data.training import encode_dataset, load_training_split

        split = load_training_split(
            args.data,
            Path(args.data_dir) if args.data_dir else None,
            heldout=0,
            seed=0,
            limit=args.limit,
        )
        return encode_dataset(tokenizer, split.train, args.max_length).items
    with open(args.records, encoding="utf-8") as f:
        first = f.readline()
    judged = first.strip().startswith("{") and '"generation"' in first
    generations = (
        [r.generation for r in read_jsonl(args.records, JudgedRecord)]
        if judged
        else read_jsonl(args.records, GenerationRecord)
    )
    items = []
    for g in generations[: args.limit]:
        enc = encode_chat(tokenizer, chat_messages(g), args.max_length)
        if enc is not None:
            items.append(enc)
    return items


def _profile(spec: str, role: str, args: argparse.Namespace, out: Path) -> ExpertProfile:
    from emmoe_dist.data.collate import pad_batch
    from emmoe_dist.experts import ExpertProfile
    from emmoe_dist.routing import profile_batches

    name, digest = _routing_source(args)
    path = out / f"{role}_profile.json"
    label = _label_of(spec)
    if path.is_file():
        found = ExpertProfile.load(path)
        if (found.model, found.dataset_hash) == (label, digest):
            print(f"reusing {path}")
            return found
    subject = load_subject(spec, args)
    tokenizer = subject.loaded.tokenizer
    items = sorted(_routing_items(tokenizer, args), key=len, reverse=True)
    if not items:
        raise EmmoeError("no example has a token left to profile within --max-length")
    pad = int(tokenizer.pad_token_id or 0)
    counts = profile_batches(
        subject.loaded.model,
        subject.loaded.family,
        (
            pad_batch(items[s : s + args.batch_size], pad)
            for s in range(0, len(items), args.batch_size)
        ),
        include_prompt=args.include_prompt,
        progress=not args.no_progress,
        total=-(-len(items) // args.batch_size),
    )
    profile = counts.to_profile(
        model=label,
        family=subject.loaded.family.name,
        dataset=name,
        dataset_hash=digest,
        include_prompt=args.include_prompt,
    )
    del subject
    _free_memory()
    profile.save(path)
    print(f"wrote {path}")
    return profile


def run_routing_shift(args: argparse.Namespace) -> int:
    from emmoe_dist.experts import ExpertSelection
    from emmoe_dist.interp.plots import plot_routing_shift
    from emmoe_dist.interp.routing_shift import routing_shift
    from emmoe_dist.routing_plots import plot_share_diff

    out = Path(args.out)
    base_spec = args.base or _base_of(args.model)
    if base_spec is None:
        raise EmmoeError("--base is needed when --model is not a training run folder")
    selection = (
        ExpertSelection.load(args.selection) if args.selection else _selection_of(args.model)
    )
    tuned = _profile(args.model, "tuned", args, out)
    base = _profile(base_spec, "base", args, out)
    shift = routing_shift(
        base,
        tuned,
        epsilon=args.epsilon,
        trained=selection,
        permutations=args.permutations,
        seed=args.seed,
    )
    _write_json(out / "routing_shift.json", shift.to_json())
    plots = {
        "routing_shift": plot_routing_shift(shift, out / "routing_shift.png"),
        "routing_share_diff": plot_share_diff(base, tuned, out / "routing_share_diff.png"),
    }
    print(f"wrote {', '.join(str(p) for p in plots.values())}")
    tracker = _tracker(args, f"interp routing-shift {tuned.model}", out)
    for layer in shift.layers:
        tracker.log(
            {"routing/kl": layer.kl, "routing/total_variation": layer.total_variation},
            layer.layer,
        )
    tracker.images({k: str(v) for k, v in plots.items()})
    tracker.summary(
        {"mean_trained_auroc": shift.mean_trained_auroc, "permutation_p": shift.permutation_p}
    )
    tracker.finish()
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
