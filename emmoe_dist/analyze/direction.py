"""The per-layer misalignment direction from judged answers: mean(misaligned) - mean(aligned)
residual activations, and with a base model the fine-tuned - base difference on the same
answers; cosines between layers, with the base difference, and with other direction files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist.analyze.common import (
    AnswerLabels,
    ModelOptions,
    Say,
    Tracking,
    activations_of,
    labelled_answers,
    make_tracker,
    quiet,
    write_json,
)

if TYPE_CHECKING:
    from emmoe_dist.interp.directions import Directions

DIRECTIONS_FILE = "directions.safetensors"


@dataclass(frozen=True, kw_only=True)
class DirectionOptions:
    model: str  # checkpoint folder, hub id, tiny:<family> or a training run folder
    labels: AnswerLabels
    out: str
    base: str | None = None  # default: the run's base when `model` is a run
    with_base: bool = True  # also the base model's activations (fine-tuned - base)
    compare: tuple[str, ...] = ()  # other direction files: per-layer cosines with ours
    run: ModelOptions = field(default_factory=ModelOptions)
    tracking: Tracking = field(default_factory=Tracking)
    progress: bool = True


@dataclass(frozen=True)
class DirectionResult:
    directions: Directions
    path: Path  # the directions file
    summary: dict[str, Any]  # what direction_summary.json holds
    plots: dict[str, Path]

    @property
    def relative_norms(self) -> list[float]:
        """Per layer, the misalignment direction's norm relative to its activations."""
        from emmoe_dist.interp.directions import MISALIGNED_MINUS_ALIGNED

        return list(self.summary["relative_norm"][MISALIGNED_MINUS_ALIGNED])

    @property
    def peak_layer(self) -> int:
        rel = self.relative_norms
        return max(range(len(rel)), key=rel.__getitem__)


def run_direction(options: DirectionOptions, say: Say = quiet) -> DirectionResult:
    from emmoe_dist.generate.sources import model_source, run_base
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

    out = Path(options.out)
    others = [
        (Path(f).stem if Path(f).stem != "directions" else str(Path(f).parent), load_directions(f))
        for f in options.compare
    ]
    records, labels, rule = labelled_answers(options.labels, options.run.seed)
    label = model_source(options.model).label

    def activations(spec: str, role: str) -> Any:
        folder = out / "activations" / role
        return activations_of(
            spec, records, labels, folder, options.run, progress=options.progress, say=say
        )

    acts = activations(options.model, "model")
    base_spec = (options.base or run_base(options.model)) if options.with_base else None
    base_acts = activations(base_spec, "base") if base_spec is not None else None
    directions = build_directions(acts, rule=rule.describe(), base=base_acts, base_model=base_spec)
    path = save_directions(directions, out / DIRECTIONS_FILE)
    say(f"wrote {path} (+ {path.with_suffix('.json').name})")

    mis = directions.kind(MISALIGNED_MINUS_ALIGNED)
    summary: dict[str, Any] = {
        "model": label,
        "base": base_spec,
        "records": str(options.labels.records),
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
    write_json(out / "direction_summary.json", summary, say)

    tracker = make_tracker(options.tracking, f"interp direction {label}", out)
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
    return DirectionResult(directions, path, summary, plots)
