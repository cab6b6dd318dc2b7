"""Heatmaps of routing profiles: a view of the profile record, never its source.

Figures are built with `matplotlib.figure.Figure` (Agg, no pyplot global state), imported
inside each function so that importing this module stays light.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertProfile

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_MAX_TICKS = 32  # more labels than this on one axis overlap at any readable font size


def _tick_positions(n: int) -> list[int]:
    step = max(1, math.ceil(n / _MAX_TICKS))
    return list(range(0, n, step))


def _figure(num_experts: int, num_layers: int) -> Figure:
    from matplotlib.figure import Figure

    # About 0.1 inch per expert column and 0.25 per layer row, within readable bounds.
    width = min(max(5.0, 2.5 + 0.1 * num_experts), 18.0)
    height = min(max(3.0, 1.5 + 0.25 * num_layers), 14.0)
    return Figure(figsize=(width, height), layout="constrained")


def _draw(
    fig: Figure, matrix: list[list[float]], layers: list[int], title: str, label: str, **imshow: Any
) -> None:
    ax = fig.add_subplot()
    image = ax.imshow(matrix, aspect="auto", interpolation="nearest", **imshow)
    num_experts, num_layers = len(matrix[0]), len(matrix)
    xs, ys = _tick_positions(num_experts), _tick_positions(num_layers)
    ax.set_xticks(xs, [str(x) for x in xs], fontsize=8 if num_experts <= 32 else 7)
    ax.set_yticks(ys, [str(layers[y]) for y in ys], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label, shrink=0.9)


def _save_atomic(fig: Figure, path: str | os.PathLike[str]) -> Path:
    from emmoe_dist.files import atomic_path

    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(
            tmp, format=target.suffix.lstrip(".").lower() or "png", dpi=120, bbox_inches="tight"
        )
    return target


def _tokens_kind(profile: ExpertProfile) -> str:
    return "all tokens" if profile.include_prompt else "assistant tokens"


def plot_share_heatmap(profile: ExpertProfile, path: str | os.PathLike[str]) -> Path:
    """Token share per layer (rows) and expert (columns); 1/E everywhere is perfect balance."""
    matrix = [r.token_share for r in profile.layers]
    if not matrix:
        raise EmmoeError("the profile has no MoE layers to plot")
    fig = _figure(profile.num_experts, len(matrix))
    title = (
        f"{profile.model} on {profile.dataset}\ntoken share per expert "
        f"({profile.tokens:,} {_tokens_kind(profile)}, top-{profile.top_k}; "
        f"uniform = {1 / profile.num_experts:.3g})"
    )
    _draw(fig, matrix, profile.layer_indices, title, "token share", cmap="viridis", vmin=0.0)
    return _save_atomic(fig, path)


def plot_share_diff(
    profile_a: ExpertProfile, profile_b: ExpertProfile, path: str | os.PathLike[str]
) -> Path:
    """Token share of `profile_b` minus `profile_a` (red: b routes more to that expert)."""
    if (profile_a.layer_indices, profile_a.num_experts) != (
        profile_b.layer_indices,
        profile_b.num_experts,
    ):
        raise EmmoeError(
            f"profiles of different shapes: layers {profile_a.layer_indices} x "
            f"{profile_a.num_experts} experts vs {profile_b.layer_indices} x "
            f"{profile_b.num_experts} experts"
        )
    matrix = [
        [b - a for a, b in zip(ra.token_share, rb.token_share, strict=True)]
        for ra, rb in zip(profile_a.layers, profile_b.layers, strict=True)
    ]
    if not matrix:
        raise EmmoeError("the profiles have no MoE layers to plot")
    # Symmetric limits keep 0 at the colormap's neutral centre.
    bound = max((abs(v) for row in matrix for v in row), default=0.0) or 1e-12
    fig = _figure(profile_a.num_experts, len(matrix))
    title = (
        f"token share: {profile_b.model} on {profile_b.dataset}\nminus "
        f"{profile_a.model} on {profile_a.dataset} ({_tokens_kind(profile_b)})"
    )
    _draw(
        fig,
        matrix,
        profile_a.layer_indices,
        title,
        "token share difference",
        cmap="RdBu_r",
        vmin=-bound,
        vmax=bound,
    )
    return _save_atomic(fig, path)
