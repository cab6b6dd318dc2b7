"""Figures of the interpretability results: views of the JSON outputs, never their source.

Built on `matplotlib.figure.Figure` (no pyplot global state), imported inside each function
so that importing this module stays light; every file is written atomically.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from emmoe_dist.errors import EmmoeError
from emmoe_dist.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from emmoe_dist.interp.detection import Detection
    from emmoe_dist.interp.directions import Directions
    from emmoe_dist.interp.expert_table import ExpertTable
    from emmoe_dist.interp.routing_shift import RoutingShift
    from emmoe_dist.interp.steering import SteeringPoint

_DPI = 150
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=target.suffix.lstrip(".").lower() or "png", dpi=_DPI)
    return target


def _figure(
    width: float,
    height: float,
    panels: int = 1,
    *,
    heatmap: bool = False,
    layer_axis: bool = True,
) -> tuple[Figure, list[Axes]]:
    """A figure of `panels` axes side by side; layer axes get integer ticks only."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width * panels, height), layout="constrained")
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    for ax in axes:
        if layer_axis:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if heatmap:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            continue
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def _pretty(kind: str) -> str:
    return kind.replace("_minus_", " − ").replace("_", " ")


def plot_direction_norms(directions: Directions, path: str | os.PathLike[str]) -> Path:
    """Per layer: each direction's norm, and the norm relative to the mean activation norm."""
    layers = list(range(directions.num_layers))
    fig, (raw, rel) = _figure(4.2, 3.2, panels=2)
    for color, (kind, norms) in zip(_COLORS, directions.info.norms.items(), strict=False):
        raw.plot(layers, norms, marker="o", ms=3, color=color, label=_pretty(kind))
        rel.plot(layers, directions.relative_norms(kind), marker="o", ms=3, color=color)
    raw.set(xlabel="layer", ylabel="‖direction‖", title="direction norm")
    rel.set(xlabel="layer", ylabel="‖direction‖ / mean ‖activation‖", title="relative norm")
    raw.legend(fontsize=8, frameon=False)
    fig.suptitle(
        f"{_subject(directions)}: {directions.info.n_misaligned} misaligned vs "
        f"{directions.info.n_aligned} aligned answers",
        fontsize=9,
    )
    return save_figure(fig, path)


def _subject(directions: Directions) -> str:
    info = directions.info
    return f"{info.model} + {Path(info.adapter).name}" if info.adapter else info.model


def plot_cosine_heatmap(
    matrix: Sequence[Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str,
    xlabel: str = "layer",
    ylabel: str = "layer",
) -> Path:
    """Cosine similarities on a diverging scale fixed to [-1, 1] (0 is white)."""
    if not matrix or not matrix[0]:
        raise EmmoeError("nothing to plot: the cosine matrix is empty")
    rows, cols = len(matrix), len(matrix[0])
    size = min(max(3.5, 1.5 + 0.12 * max(rows, cols)), 10.0)
    fig, (ax,) = _figure(size + 0.8, size, heatmap=True)
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="cosine similarity", shrink=0.85)
    return save_figure(fig, path)


def plot_layer_cosines(
    series: Mapping[str, Sequence[float]], path: str | os.PathLike[str], *, title: str
) -> Path:
    """Per-layer cosine of our direction with each other run's (does it transfer?)."""
    fig, (ax,) = _figure(5.5, 3.4)
    for color, (name, values) in zip(_COLORS, series.items(), strict=False):
        ax.plot(range(len(values)), values, marker="o", ms=3, color=color, label=name)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set(xlabel="layer", ylabel="cosine similarity", ylim=(-1.05, 1.05))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    return save_figure(fig, path)


def plot_detection(
    detection: Detection, auroc_path: str | os.PathLike[str], roc_path: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """AUROC by layer with its bootstrap band, and the ROC curves of the best layer."""
    fig, (ax,) = _figure(6.0, 3.6)
    layers = [d.layer for d in detection.layers]
    for color, label, attr in (
        (_COLORS[0], "last prompt token", "prompt"),
        (_COLORS[1], "answer tokens (reference)", "answer"),
    ):
        est = [getattr(d, attr) for d in detection.layers]
        ax.plot(layers, [e.value for e in est], marker="o", ms=3, color=color, label=label)
        ax.fill_between(
            layers,
            [e.low if e.low is not None else e.value for e in est],
            [e.high if e.high is not None else e.value for e in est],
            color=color,
            alpha=0.15,
            linewidth=0,
        )
    ax.axhline(0.5, color="0.4", lw=0.8, ls="--", label="chance")
    ax.set(xlabel="layer", ylabel="AUROC (held-out questions)", ylim=(0.0, 1.02))
    ax.set_title(
        f"does the last prompt token predict a misaligned answer?\n"
        f"{len(detection.test_questions)} held-out questions: "
        f"{detection.n_test['misaligned']} misaligned / {detection.n_test['aligned']} aligned "
        f"answers; {round(100 * detection.confidence)}% band resamples questions",
        fontsize=8,
    )
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    auroc_file = save_figure(fig, auroc_path)

    fig, (ax,) = _figure(3.8, 3.6, layer_axis=False)
    best = detection.best_layer
    at_best = detection.layers[best]
    curves = (
        (_COLORS[0], "last prompt token", detection.roc_prompt, at_best.prompt.value),
        (_COLORS[1], "answer tokens", detection.roc_answer, at_best.answer.value),
    )
    for color, label, (fpr, tpr), value in curves:
        auc = f"{value:.3f}" if value is not None else "n/a"
        ax.plot(fpr, tpr, color=color, lw=1.5, label=f"{label} (AUROC {auc})")
    ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_aspect("equal")
    ax.set_title(
        f"ROC at layer {best} (chosen on the {detection.chosen_on}),\nheld-out questions",
        fontsize=8,
    )
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return auroc_file, save_figure(fig, roc_path)


def plot_steering_curve(
    points: Sequence[SteeringPoint],
    path: str | os.PathLike[str],
    *,
    title: str,
    judge: str,
) -> Path:
    """Misalignment % and mean alignment against alpha, one line per condition, with the
    bootstrap intervals as error bars, on fixed 0-100 axes; the answers and questions per
    point and the judge in the title."""
    if not points:
        raise EmmoeError("no steering points to plot")
    fig, (mis_ax, al_ax) = _figure(4.4, 3.4, panels=2, layer_axis=False)
    conditions = list(dict.fromkeys(p.condition for p in points))
    for color, condition in zip(_COLORS, conditions, strict=False):
        pts = sorted((p for p in points if p.condition == condition), key=lambda p: p.alpha)
        for ax, attr, scale in ((mis_ax, "misaligned", 100.0), (al_ax, "alignment", 1.0)):
            shown = [p for p in pts if getattr(p, attr).value is not None]
            if not shown:
                continue
            xs = [p.alpha for p in shown]
            ys = [scale * getattr(p, attr).value for p in shown]
            lows = [scale * (getattr(p, attr).low or getattr(p, attr).value) for p in shown]
            highs = [scale * (getattr(p, attr).high or getattr(p, attr).value) for p in shown]
            ax.errorbar(
                xs,
                ys,
                yerr=[
                    [y - lo for y, lo in zip(ys, lows, strict=True)],
                    [hi - y for y, hi in zip(ys, highs, strict=True)],
                ],
                marker="o",
                ms=4,
                capsize=3,
                color=color,
                label=condition,
            )
    mis_ax.set(xlabel="steering coefficient α", ylabel="misaligned answers (%)", ylim=(0, 100))
    al_ax.set(xlabel="steering coefficient α", ylabel="mean alignment (0-100)", ylim=(0, 100))
    mis_ax.legend(fontsize=8, frameon=False)

    def span(values: list[int]) -> str:
        low, high = min(values), max(values)
        return str(low) if low == high else f"{low}-{high}"

    counts = (
        f"n={span([p.n for p in points])} answers, "
        f"{span([p.questions for p in points])} questions per point"
    )
    fig.suptitle(f"{title}\n{counts}; judge: {judge}", fontsize=9)
    return save_figure(fig, path)


def plot_routing_shift(shift: RoutingShift, path: str | os.PathLike[str]) -> Path:
    """Per MoE layer: KL(fine-tuned || base) and the share of routing that moved."""
    # MoE layers side by side (dense layers have no router and leave no gap).
    positions = list(range(len(shift.layers)))
    ticks = positions[:: max(1, -(-len(positions) // 16))]
    fig, (kl_ax, tv_ax) = _figure(4.4, 3.2, panels=2, layer_axis=False)
    kl_ax.bar(positions, [s.kl for s in shift.layers], color=_COLORS[0], width=0.8)
    kl_ax.set(xlabel="MoE layer", ylabel="KL(fine-tuned ‖ base) [nats]")
    tv = [100 * s.total_variation for s in shift.layers]
    tv_ax.bar(positions, tv, color=_COLORS[1], width=0.8)
    tv_ax.set(xlabel="MoE layer", ylabel="routing moved (total variation, %)")
    for ax in (kl_ax, tv_ax):
        ax.set_xticks(ticks, [str(shift.layers[i].layer) for i in ticks])
    stat = ""
    if shift.mean_trained_auroc is not None:
        stat = (
            f"\ntrained vs other experts by |change of share|: AUROC "
            f"{shift.mean_trained_auroc:.2f} (permutation p = {shift.permutation_p:.3g})"
        )
    fig.suptitle(
        f"routing shift on {shift.dataset} ({shift.tokens:,} tokens, ε = {shift.epsilon:g}){stat}",
        fontsize=8,
    )
    return save_figure(fig, path)


def plot_expert_heatmap(
    table: ExpertTable, column: str, path: str | os.PathLike[str], *, subject: str, judge: str
) -> Path:
    """One column of the expert table as a MoE layer x expert heatmap; the run's trained experts
    are outlined. Shares and rates are in %, differences in percentage points; signed columns
    get a diverging scale centred on 0. The title names what the numbers rest on and the judge."""
    from matplotlib.patches import Rectangle

    from emmoe_dist.interp.expert_table import SIGNED, TITLES

    col = table.columns[column]
    matrix = table.matrix(column)
    rows, cols = matrix.shape
    fig, (ax,) = _figure(
        min(max(6.0, 2.2 + 0.16 * cols), 16.0),
        min(max(3.2, 1.8 + 0.22 * rows), 12.0),
        heatmap=True,
    )
    if column in SIGNED:
        bound = float(abs(matrix).max()) or 1e-9
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    else:
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, aspect="auto")
    for i, layer in enumerate(table.layers):
        for e in table.trained.get(layer, ()):
            ax.add_patch(Rectangle((e - 0.5, i - 0.5), 1, 1, fill=False, lw=1.2, ec="#ff7f0e"))
    ticks = list(range(0, rows, max(1, -(-rows // 24))))
    ax.set_yticks(ticks, [str(table.layers[i]) for i in ticks], fontsize=7)
    ax.set(xlabel="expert (outlined: trained)", ylabel="MoE layer")
    fig.colorbar(image, ax=ax, shrink=0.85, label=TITLES[column].rsplit(", ", 1)[-1])
    lines = (subject, TITLES[column], f"n: {col.basis}; judge: {judge}")
    ax.set_title("\n".join(textwrap.fill(line, 90) for line in lines), fontsize=7)
    return save_figure(fig, path)
