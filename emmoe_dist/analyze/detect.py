"""Early detection: does the last prompt token predict a misaligned answer? The judged answers
split by question; the misalignment direction from the training questions (or a direction
file) scores the held-out questions' answers by projection; AUROC per layer with a bootstrap
interval that resamples questions, and the ROC curve of the best layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from emmoe_dist.analyze.common import (
    AnswerLabels,
    ModelOptions,
    Say,
    Tracking,
    activations_of,
    labelled_answers,
    make_tracker,
    nan_if_none,
    quiet,
    write_json,
)

if TYPE_CHECKING:
    from emmoe_dist.interp.detection import Detection


@dataclass(frozen=True, kw_only=True)
class DetectOptions:
    model: str  # checkpoint folder, hub id, tiny:<family> or a training run folder
    labels: AnswerLabels
    out: str  # reuses the activations already there
    directions: str | None = None  # a direction file instead of the training split's
    test_fraction: float = 0.5  # share of questions held out
    resamples: int = 1000
    run: ModelOptions = field(default_factory=ModelOptions)
    tracking: Tracking = field(default_factory=Tracking)
    progress: bool = True


def run_detect(options: DetectOptions, say: Say = quiet) -> Detection:
    from emmoe_dist.generate.sources import model_source
    from emmoe_dist.interp.detection import detect
    from emmoe_dist.interp.directions import MISALIGNED_MINUS_ALIGNED, load_directions
    from emmoe_dist.interp.plots import plot_detection
    from emmoe_dist.metrics import Bootstrap

    out = Path(options.out)
    given = (
        load_directions(options.directions).kind(MISALIGNED_MINUS_ALIGNED)
        if options.directions
        else None
    )
    seed = options.run.seed
    records, labels, rule = labelled_answers(options.labels, seed)
    label = model_source(options.model).label
    acts = activations_of(
        options.model,
        records,
        labels,
        out / "activations" / "model",
        options.run,
        progress=options.progress,
        say=say,
    )
    result = detect(
        acts,
        test_fraction=options.test_fraction,
        seed=seed,
        bootstrap=Bootstrap(resamples=options.resamples, seed=seed),
        directions=given,
    )
    write_json(
        out / "detection.json",
        {
            "model": label,
            "records": str(options.labels.records),
            "rule": rule.describe(),
            "directions": options.directions or "training questions' mean difference",
            **result.to_json(),
        },
        say,
    )
    plots = dict(
        zip(
            ("detection_auroc", "detection_roc"),
            plot_detection(result, out / "detection_auroc.png", out / "detection_roc.png"),
            strict=True,
        )
    )
    tracker = make_tracker(options.tracking, f"interp detect {label}", out)
    for d in result.layers:
        tracker.log(
            {
                "detect/prompt_auroc": nan_if_none(d.prompt.value),
                "detect/answer_auroc": nan_if_none(d.answer.value),
            },
            d.layer,
        )
    tracker.images({k: str(v) for k, v in plots.items()})
    best = result.layers[result.best_layer]
    tracker.summary({"best_layer": result.best_layer, "best_prompt_auroc": best.prompt.value})
    tracker.finish()
    return result
