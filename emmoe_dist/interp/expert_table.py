"""Which experts of a fine-tune carry its misalignment: one row per (MoE layer, expert) with four
measurements, their rankings and the correlations between them.

- `delta_norm`: ‖ΔW‖ of the expert's update (Frobenius, gate/up and down together) from the
  saved adapter or expert delta; exactly 0 for an expert the run did not train.
- `train_share`: the base model's routing share on the training data, % of top-k choices (what
  the top-k and ESFT selection rules read).
- `routing_shift`: fine-tuned minus base routing share on the evaluation answers, in
  percentage points (the routing-shift analysis).
- `activation_rate_diff`: SteerMoE's risk difference, the fine-tune's activation rate (% of
  answer tokens whose top-k holds the expert) on misaligned minus aligned answers, in
  percentage points.

Columns that could not be measured (no judged answers of both classes, say) are absent, never
filled in. Correlations are Spearman's, over the (layer, expert) cells, on the signed values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertProfile
from emmoe_dist.interp.routing_shift import RoutingShift

DELTA_NORM = "delta_norm"
TRAIN_SHARE = "train_share"
ROUTING_SHIFT = "routing_shift"
RATE_DIFF = "activation_rate_diff"
COLUMNS: tuple[str, ...] = (DELTA_NORM, TRAIN_SHARE, ROUTING_SHIFT, RATE_DIFF)
TITLES = MappingProxyType(
    {
        DELTA_NORM: "‖ΔW‖ of the expert's update",
        TRAIN_SHARE: "routing share on the training data (base), %",
        ROUTING_SHIFT: "routing shift on the evaluation answers (fine-tuned − base), pp",
        RATE_DIFF: "activation rate on misaligned − aligned answers (fine-tune), pp",
    }
)
SIGNED = frozenset({ROUTING_SHIFT, RATE_DIFF})  # can be negative: diverging colour scales


@dataclass(frozen=True)
class Column:
    """One measurement for every (layer, expert): `values[i][e]` for `layers[i]`."""

    name: str
    values: tuple[tuple[float, ...], ...]
    basis: str  # what the numbers rest on, e.g. "4,096 training tokens"


@dataclass(frozen=True)
class ExpertTable:
    layers: tuple[int, ...]  # MoE layers, in order
    num_experts: int
    trained: Mapping[int, tuple[int, ...]]  # the run's selection
    columns: Mapping[str, Column] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for c in self.columns.values():
            shape = (len(c.values), {len(r) for r in c.values})
            if shape != (len(self.layers), {self.num_experts}):
                raise EmmoeError(
                    f"column {c.name}: {len(c.values)} layers x {sorted(shape[1])} experts, the "
                    f"table has {len(self.layers)} x {self.num_experts}"
                )

    def matrix(self, name: str) -> np.ndarray:
        return np.array(self.columns[name].values, dtype=np.float64)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (layer, expert), in layer then expert order."""
        out = []
        for i, layer in enumerate(self.layers):
            trained = set(self.trained.get(layer, ()))
            for e in range(self.num_experts):
                row: dict[str, Any] = {"layer": layer, "expert": e, "trained": e in trained}
                for name, col in self.columns.items():
                    row[name] = col.values[i][e]
                out.append(row)
        return out

    def ranked(self, by: str) -> list[dict[str, Any]]:
        """Rows by `by`, largest first (ties: lower layer, then lower expert)."""
        self._known(by)
        return sorted(self.rows(), key=lambda r: (-r[by], r["layer"], r["expert"]))

    def top(self, by: str, m: int, *, per_layer: bool = False) -> dict[int, tuple[int, ...]]:
        """The `m` largest cells by `by` (or the `m` largest of each layer) as layer -> ids."""
        if m <= 0:
            raise EmmoeError(f"m must be positive, got {m}")
        chosen: dict[int, list[int]] = {}
        taken = 0
        for row in self.ranked(by):
            ids = chosen.setdefault(row["layer"], [])
            if len(ids) < m if per_layer else taken < m:
                ids.append(row["expert"])
                taken += 1
        return {k: tuple(sorted(v)) for k, v in sorted(chosen.items()) if v}

    def correlations(self) -> dict[str, dict[str, float | None]]:
        """Spearman's rank correlation of every two columns over the cells (None where a
        column is constant, e.g. ΔW of a run that trained nothing)."""
        names = list(self.columns)
        flat = {n: self.matrix(n).ravel() for n in names}
        return {a: {b: spearman(flat[a], flat[b]) for b in names} for a in names}

    def per_expert(self) -> list[dict[str, Any]]:
        """Expert ids across layers (the seed paper's E0..E7): total ‖ΔW‖ (root of the sum of
        squares) and the other columns' means over the MoE layers."""
        out = []
        for e in range(self.num_experts):
            row: dict[str, Any] = {
                "expert": e,
                "trained_layers": [
                    layer for layer in self.layers if e in self.trained.get(layer, ())
                ],
            }
            for name in self.columns:
                values = self.matrix(name)[:, e]
                row[name] = (
                    float(np.sqrt(np.sum(values**2)))
                    if name == DELTA_NORM
                    else float(values.mean())
                )
            out.append(row)
        return out

    def _known(self, name: str) -> None:
        if name not in self.columns:
            measured = ", ".join(self.columns) or "none"
            raise EmmoeError(f"no column {name!r} in this table (measured: {measured})")

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "trained": {str(k): list(v) for k, v in self.trained.items()},
            "columns": {
                n: {"title": TITLES[n], "basis": c.basis, "values": [list(r) for r in c.values]}
                for n, c in self.columns.items()
            },
            "correlations": self.correlations(),
            "rows": self.rows(),
            "per_expert": self.per_expert(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExpertTable:
        return cls(
            layers=tuple(data["layers"]),
            num_experts=int(data["num_experts"]),
            trained={int(k): tuple(v) for k, v in data["trained"].items()},
            columns={
                n: Column(n, tuple(tuple(r) for r in c["values"]), c["basis"])
                for n, c in data["columns"].items()
            },
        )


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], len(values)]
    out = np.empty(len(values))
    out[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho (ties share their mean rank); None when either side is constant."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ra, rb = _average_ranks(np.asarray(a)), _average_ranks(np.asarray(b))
    return float(np.corrcoef(ra, rb)[0, 1])


# ---- columns from the measurements ----------------------------------------------------------


def delta_column(
    norms: Mapping[int, Sequence[float]], layers: Sequence[int], num_experts: int, basis: str
) -> Column:
    """‖ΔW‖ per expert; layers the artifact does not touch are 0."""
    zero = (0.0,) * num_experts
    return Column(DELTA_NORM, tuple(tuple(norms[i]) if i in norms else zero for i in layers), basis)


def share_column(profile: ExpertProfile) -> Column:
    values = tuple(tuple(100.0 * s for s in r.token_share) for r in profile.layers)
    tokens = "all" if profile.include_prompt else "assistant"
    return Column(TRAIN_SHARE, values, f"{profile.tokens:,} {tokens} tokens of {profile.dataset}")


def shift_column(shift: RoutingShift) -> Column:
    values = tuple(tuple(100.0 * d for d in layer.delta_share) for layer in shift.layers)
    return Column(ROUTING_SHIFT, values, f"{shift.tokens:,} tokens of {shift.dataset}")


def activation_rates(profile: ExpertProfile) -> np.ndarray:
    """[layers, experts]: % of the profiled tokens whose top-k holds each expert."""
    counts = np.array([r.token_counts for r in profile.layers], dtype=np.float64)
    return 100.0 * counts / max(profile.tokens, 1)


def rate_diff_column(
    misaligned: ExpertProfile, aligned: ExpertProfile, answers: tuple[int, int]
) -> Column:
    """SteerMoE's risk difference: activation rate on misaligned minus on aligned answers."""
    if misaligned.layer_indices != aligned.layer_indices:
        raise EmmoeError("the two profiles cover different MoE layers")
    diff = activation_rates(misaligned) - activation_rates(aligned)
    basis = (
        f"{answers[0]} misaligned answers ({misaligned.tokens:,} tokens) vs {answers[1]} "
        f"aligned ({aligned.tokens:,} tokens)"
    )
    return Column(RATE_DIFF, tuple(tuple(r) for r in diff.tolist()), basis)
