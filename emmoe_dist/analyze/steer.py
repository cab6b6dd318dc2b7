"""Steering curves: for each alpha, the suite's answers with the misalignment direction added
(or subtracted, or projected out) at chosen layers, and the same with a random direction of
the same norm (the control); judged when a judge is given; misalignment % against alpha.

Steered answers come from the normal generation path (same prompts, seeds and records), so an
answer differs from the unsteered one only through the steering. Alpha 0 is the unsteered
model whatever the direction: generated and judged once.

Every condition (each alpha of the direction and of the control, and the unsteered model) is
generated in one pass of the continuous engine: each sample's rows are steered by its own
condition (`interp.steering.RowSteering`), so the model's weights are read once per step for
all of them, instead of one full generation pass per condition (`generate_steered`). Router
steering (experts switched off or on) changes every row's routing, so each of its conditions
is a pass of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from emmoe_dist import run_folder as rf
from emmoe_dist.analyze.common import (
    ModelOptions,
    Say,
    Subject,
    Tracking,
    free_memory,
    judge_answer_sets,
    load_subject,
    make_tracker,
    nan_if_none,
    quiet,
    write_json,
)
from emmoe_dist.analyze.router_steer import EXPERTS, RouterSteer, router_conditions
from emmoe_dist.errors import EmmoeError

if TYPE_CHECKING:
    import torch

    from emmoe_dist.config import ExperimentConfig, JudgeConfig
    from emmoe_dist.generate.interface import Generator
    from emmoe_dist.generate.runner import GenerationSummary, SuiteSet
    from emmoe_dist.generate.sources import ModelSource
    from emmoe_dist.interp.directions import Directions
    from emmoe_dist.interp.steering import Intervention, SteeringPoint

SteerMode = Literal["add", "subtract", "ablate"]


@dataclass(frozen=True, kw_only=True)
class SteerGeneration:
    """What is answered under steering, and how it is sampled."""

    suite: str = "core"  # an evaluation suite or a .yaml/.jsonl question file
    data_dir: str | None = None  # default: $EMMOE_DATA_DIR
    limit: int | None = None  # the first N questions of the suite
    samples: int = 10  # answers per paraphrase
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600
    system_prompt: str | None = None  # for questions without their own; None: the eval default
    thinking: bool = False


@dataclass(frozen=True, kw_only=True)
class SteerOptions:
    model: str  # checkpoint folder, hub id, tiny:<family> or a training run folder
    directions: str | None  # a direction file (`emmoe interp direction`); None: router only
    out: str
    kind: str = "misaligned_minus_aligned"
    layers: tuple[int, ...] | None = None  # None: the layer of largest relative norm
    mode: SteerMode = "add"
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)  # ablate: nonzero = projected out
    control: bool = True  # also steer with a random direction of the same norm
    router: RouterSteer | None = None  # experts switched off/on: conditions at alpha 1
    generation: SteerGeneration = field(default_factory=SteerGeneration)
    judge: JudgeConfig | None = None  # None: generate only; judge later and re-run
    scripted_judge: bool = False  # the built-in mock judge: a pipeline check, not judgments
    resamples: int = 1000
    run: ModelOptions = field(default_factory=lambda: ModelOptions(batch_size=16))
    tracking: Tracking = field(default_factory=Tracking)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.directions is None and self.router is None:
            raise EmmoeError("steer with a direction file, router steering, or both")


@dataclass(frozen=True)
class SteeringResult:
    label: str  # the steered model
    layers: list[int]
    points: list[SteeringPoint]  # the judged answer sets
    unjudged: list[str]  # judged.jsonl files still missing or incomplete
    answer_sets: int
    plot: Path | None


def generation_config(
    generation: SteerGeneration, *, seed: int, batch_size: int
) -> ExperimentConfig:
    """The generation settings of every alpha, as an experiment's `eval` section."""
    from emmoe_dist.config import DataConfig, EvalConfig, ExperimentConfig

    default = EvalConfig()
    return ExperimentConfig(
        seed=seed,
        data=DataConfig(dir=generation.data_dir),
        eval=EvalConfig(
            suites=[generation.suite],
            samples_per_question=generation.samples,
            temperature=generation.temperature,
            top_p=generation.top_p,
            max_new_tokens=generation.max_new_tokens,
            system_prompt=generation.system_prompt or default.system_prompt,
            thinking=generation.thinking,
            batch_size=batch_size,
            limit=generation.limit,
        ),
    )


def steering_suites(cfg: ExperimentConfig) -> tuple[SuiteSet, int]:
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


def largest_layer(directions: Directions, kind: str) -> int:
    """The layer whose direction is largest relative to its activations."""
    rel = directions.relative_norms(kind)
    return max(range(len(rel)), key=rel.__getitem__)


def conditions(vectors: torch.Tensor, *, control: bool, seed: int) -> dict[str, torch.Tensor]:
    """The direction, and its random same-norm control."""
    from emmoe_dist.interp.steering import random_like

    out = {"direction": vectors}
    if control:
        out["random"] = random_like(vectors, seed=seed)
    return out


def steered_source(
    source: ModelSource, *, condition: str, alpha: float, layers: list[int], mode: SteerMode
) -> ModelSource:
    """The source as the records name it under steering (alpha 0: unsteered, unchanged)."""
    if alpha == 0:
        return source
    where = ",".join(map(str, layers))
    tag = f" [steer {mode} {condition} alpha={alpha:g} layers={where}]"
    return dataclasses.replace(source, model_label=source.model_label + tag)


def generate_steered(
    subject: Subject,
    generator: Generator,
    cfg: ExperimentConfig,
    suites: SuiteSet,
    out: Path,
    *,
    intervention: Intervention | None,
    progress: bool = False,
) -> GenerationSummary:
    """One condition's answers, in a pass of its own, under `intervention` (None: unsteered),
    the model's label in the records saying how it was steered. `run_steer` generates the
    direction conditions in one pass instead (`generate_conditions`); router conditions, which
    change the routing of every row, take this route."""
    from emmoe_dist.generate.runner import run_generation

    source = subject.source
    steer: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if intervention is not None:
        source = dataclasses.replace(
            source, model_label=f"{source.model_label} [{intervention.tag}]"
        )
        steer = intervention.apply(subject.loaded.model, subject.loaded.family)
    with steer:
        return run_generation(
            cfg, generator, subject.loaded.tokenizer, source, suites, out, progress=progress
        )


def generate_conditions(
    subject: Subject,
    cfg: ExperimentConfig,
    suites: SuiteSet,
    plan: dict[Path, tuple[str, float]],
    *,
    vectors: dict[str, torch.Tensor],
    layers: list[int],
    mode: SteerMode,
    batch_size: int,
    progress: bool = False,
) -> list[GenerationSummary]:
    """Every (condition, alpha) of `plan` into its `out` file, in one pass of the continuous
    engine (module docstring); `vectors[condition]` is the condition's direction."""
    from emmoe_dist.generate.continuous import ContinuousGenerator
    from emmoe_dist.generate.runner import run_generation_many
    from emmoe_dist.interp.steering import RowSteering, SteerCondition

    model, tokenizer = subject.loaded.model, subject.loaded.tokenizer
    targets, rows = [], []
    for out, (condition, alpha) in plan.items():
        source = steered_source(
            subject.source, condition=condition, alpha=alpha, layers=layers, mode=mode
        )
        targets.append((source, out))
        rows.append(None if alpha == 0 else SteerCondition(vectors[condition], alpha, mode))
    with RowSteering(model, subject.loaded.family, rows, layers) as steering:
        generator = ContinuousGenerator(model, tokenizer, batch_size=batch_size, steering=steering)
        return run_generation_many(
            cfg,
            generator,
            tokenizer,
            targets,
            suites,
            progress=progress,
            conditions=list(range(len(targets))),
        )


def _alpha_folder(out: Path, condition: str, alpha: float) -> Path:
    return out / "unsteered" if alpha == 0 else out / condition / f"alpha_{alpha:+g}"


def run_steer(options: SteerOptions, say: Say = quiet) -> SteeringResult:
    from emmoe_dist.files import read_jsonl
    from emmoe_dist.interp.directions import load_directions
    from emmoe_dist.interp.plots import plot_steering_curve
    from emmoe_dist.interp.router_steering import router_intervention
    from emmoe_dist.interp.steering import steering_point
    from emmoe_dist.metrics import Bootstrap, judge_description
    from emmoe_dist.models.anatomy import decoder_layers
    from emmoe_dist.records import GenerationRecord, JudgedRecord

    out = Path(options.out)
    seed = options.run.seed
    steer_with: dict[str, torch.Tensor] = {}
    layers: list[int] = []
    alphas = [0.0]
    if options.directions is not None:
        directions = load_directions(options.directions)
        vectors = directions.kind(options.kind)
        layers = list(options.layers or [largest_layer(directions, options.kind)])
        alphas = sorted(set(options.alphas))
        if options.mode == "ablate":
            alphas = sorted({0.0 if a == 0 else 1.0 for a in alphas})
        steer_with = conditions(vectors, control=options.control, seed=seed)
    cfg = generation_config(options.generation, seed=seed, batch_size=options.run.batch_size)
    suites, expected = steering_suites(cfg)
    routed: dict[str, Any] = {}
    if options.router is not None:  # checked against the model's config before it loads
        from emmoe_dist.generate.sources import model_source
        from emmoe_dist.models.loading import model_config_dict

        family, config = model_config_dict(model_source(options.model).base)
        routed = router_conditions(options.router, family, config, seed=seed)

    subject = load_subject(options.model, options.run)
    model, family = subject.loaded.model, subject.loaded.family
    n_layers = len(decoder_layers(model, family))
    if steer_with and next(iter(steer_with.values())).shape[0] != n_layers:
        raise EmmoeError(
            f"{options.directions} has directions for "
            f"{next(iter(steer_with.values())).shape[0]} layers; the model has {n_layers}"
        )
    runs = [(c, a) for c in steer_with for a in alphas]
    runs += [(c, a) for c in routed for a in sorted({0.0, 1.0})]
    plan = {_alpha_folder(out, c, a): (c, a) for c, a in runs}
    direction_plan = {f: run for f, run in plan.items() if run[0] not in routed or run[1] == 0}
    names = ", ".join(str(folder.relative_to(out)) for folder in direction_plan)
    say(f"generating {len(direction_plan)} answer sets in one pass: {names}")
    generate_conditions(
        subject,
        cfg,
        suites,
        {folder / rf.GENERATIONS: run for folder, run in direction_plan.items()},
        vectors=steer_with,
        layers=layers,
        mode=options.mode,
        batch_size=options.run.batch_size,
        progress=options.progress,
    )
    router_plan = {f: run for f, run in plan.items() if f not in direction_plan}
    if router_plan:
        from emmoe_dist.generate.continuous import ContinuousGenerator

        generator = ContinuousGenerator(
            model, subject.loaded.tokenizer, batch_size=options.run.batch_size
        )
        for folder, (condition, _) in router_plan.items():
            say(f"{folder.relative_to(out)}: generating (router steering, a pass of its own)")
            generate_steered(
                subject,
                generator,
                cfg,
                suites,
                folder / rf.GENERATIONS,
                intervention=router_intervention(condition, routed[condition]),
                progress=options.progress,
            )
    label = subject.source.label
    del subject
    free_memory()

    if options.judge is not None:
        judge_answer_sets(
            list(plan),
            options.judge,
            cache_dir=out / rf.JUDGE_CACHE_DIR,
            scripted=options.scripted_judge,
            progress=options.progress,
            say=say,
        )

    bootstrap = Bootstrap(resamples=options.resamples, seed=seed)
    points, unjudged, judged_all = [], [], []
    for condition, alpha in runs:
        folder = _alpha_folder(out, condition, alpha)
        generated = read_jsonl(folder / rf.GENERATIONS, GenerationRecord)
        judged = folder / rf.JUDGED
        records = (
            read_jsonl(judged, JudgedRecord, tolerate_torn_tail=True) if judged.is_file() else []
        )
        if len(generated) != expected or {r.key for r in records} != {g.key for g in generated}:
            unjudged.append(str(judged))
            continue
        points.append(steering_point(condition, alpha, records, bootstrap=bootstrap))
        judged_all += records
    result: dict[str, Any] = {
        "model": label,
        "directions": None if options.directions is None else str(options.directions),
        "kind": options.kind,
        "layers": layers,
        "mode": options.mode,
        "alphas": alphas,
        "seed": seed,
        "suite": options.generation.suite,
        "answers_per_alpha": expected,
        "router": {c: f.to_json() | {"describe": f.describe()} for c, f in routed.items()},
        "points": [dataclasses.asdict(p) for p in points],
        "unjudged": sorted(set(unjudged)),
    }
    write_json(out / "steering.json", result, say)
    plot = None
    if points:
        where = ",".join(map(str, layers))
        titles = [f"{options.mode} {options.kind.replace('_', ' ')} at layer(s) {where}"]
        titles = titles if steer_with else []
        titles += [f"route {routed[c].describe()}" for c in routed if c == EXPERTS]
        title = f"{label}: {'; '.join(titles)}"
        plot = plot_steering_curve(
            points, out / "steering_curve.png", title=title, judge=judge_description(judged_all)
        )
        say(f"wrote {plot}")
        tracker = make_tracker(options.tracking, f"interp steer {label}", out)
        for step, p in enumerate(points):
            tracker.log(
                {
                    f"steer/{p.condition}/alpha": p.alpha,
                    f"steer/{p.condition}/misaligned": nan_if_none(p.misaligned.value),
                    f"steer/{p.condition}/alignment": nan_if_none(p.alignment.value),
                },
                step,
            )
        tracker.images({"steering_curve": str(plot)})
        tracker.finish()
    return SteeringResult(label, layers, points, sorted(set(unjudged)), len(plan), plot)
