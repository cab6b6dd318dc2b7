"""Misalignment directions per layer, and how they compare across layers and runs.

Two kinds, both [layers, hidden]:
- `misaligned_minus_aligned`: mean answer activation of misaligned answers minus that of
  aligned answers, on one model (Soligo et al. 2025's mean-difference direction);
- `finetuned_minus_base`: the fine-tuned model's mean answer activation minus the base
  model's on the same answers (what fine-tuning moved, whatever the label).

A direction file is one safetensors file holding one tensor per kind, with its JSON
description (layers, counts, norms, sources) in the file's metadata, so the file alone is
enough to steer with or compare against; `directions.json` beside it is the same description
for people.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.interp.activations import ActivationSet
from emmoe_dist.interp.labels import ALIGNED_LABEL, MISALIGNED

MISALIGNED_MINUS_ALIGNED = "misaligned_minus_aligned"
FINETUNED_MINUS_BASE = "finetuned_minus_base"
_META_KEY = "emmoe_directions"


class DirectionInfo(BaseModel):
    """The description of a direction file (per kind: norms per layer; and where it came from)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    model: str
    adapter: str | None = None
    base_model: str | None = None
    family: str
    rule: str  # how answers were labelled
    n_misaligned: int
    n_aligned: int
    n_paired: int = 0  # answers in the fine-tuned-minus-base difference
    # mean norm of the answer activations per layer: the scale a direction's norm is read against
    activation_norm: tuple[float, ...]
    norms: dict[str, tuple[float, ...]]  # kind -> per-layer L2 norm


@dataclass(frozen=True)
class Directions:
    info: DirectionInfo
    vectors: Mapping[str, torch.Tensor]  # kind -> [layers, hidden] float32

    @property
    def num_layers(self) -> int:
        return len(self.info.activation_norm)

    def kind(self, name: str) -> torch.Tensor:
        try:
            return self.vectors[name]
        except KeyError:
            raise EmmoeError(
                f"the direction file has no {name!r} direction; it has {sorted(self.vectors)}"
            ) from None

    def relative_norms(self, name: str) -> list[float]:
        """Per layer, |direction| / mean |answer activation|: comparable across layers."""
        return [
            n / a if a > 0 else 0.0
            for n, a in zip(self.info.norms[name], self.info.activation_norm, strict=True)
        ]


def mean_difference(acts: ActivationSet) -> torch.Tensor:
    """mean(misaligned answers) - mean(aligned answers), per layer: [layers, hidden]."""
    labels = torch.from_numpy(acts.labels.astype("int64"))
    mis, ali = labels == MISALIGNED, labels == ALIGNED_LABEL
    if not bool(mis.any()) or not bool(ali.any()):
        raise EmmoeError(
            f"a mean difference needs both classes: {int(mis.sum())} misaligned, "
            f"{int(ali.sum())} aligned answers"
        )
    # float64 means: large activations minus large activations keep their small difference.
    data = acts.answer_mean.double()
    return (data[mis].mean(0) - data[ali].mean(0)).float()


def paired_difference(tuned: ActivationSet, base: ActivationSet) -> torch.Tensor:
    """Mean over the answers both sets hold of tuned - base, per layer: [layers, hidden]."""
    in_base = set(base.keys)
    shared = [k for k in tuned.keys if k in in_base]
    if not shared:
        raise EmmoeError("the fine-tuned and base activations share no answer")
    t, b = tuned.by_keys(shared).answer_mean.double(), base.by_keys(shared).answer_mean.double()
    return (t - b).mean(0).float()


def build_directions(
    acts: ActivationSet,
    *,
    rule: str,
    base: ActivationSet | None = None,
    base_model: str | None = None,
) -> Directions:
    """The mean-difference direction of `acts`, and the fine-tuned-minus-base one when the base
    model's activations on the same answers are given."""
    vectors = {MISALIGNED_MINUS_ALIGNED: mean_difference(acts)}
    paired = 0
    if base is not None:
        vectors[FINETUNED_MINUS_BASE] = paired_difference(acts, base)
        paired = len(set(acts.keys) & set(base.keys))
    info = DirectionInfo(
        model=acts.meta.model,
        adapter=acts.meta.adapter,
        base_model=base_model,
        family=acts.meta.family,
        rule=rule,
        n_misaligned=int((acts.labels == MISALIGNED).sum()),
        n_aligned=int((acts.labels == ALIGNED_LABEL).sum()),
        n_paired=paired,
        activation_norm=tuple(acts.answer_mean.norm(dim=-1).mean(0).tolist()),
        norms={k: tuple(v.norm(dim=-1).tolist()) for k, v in vectors.items()},
    )
    return Directions(info, vectors)


# ---------------------------------------------------------------------------------------------
# Comparisons


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[La, Lb] cosine similarity of every row of `a` with every row of `b` (0 for a zero row)."""
    if a.shape[-1] != b.shape[-1]:
        raise EmmoeError(f"hidden sizes differ: {a.shape[-1]} vs {b.shape[-1]}")
    na = a.double() / a.double().norm(dim=-1, keepdim=True).clamp_min(1e-30)
    nb = b.double() / b.double().norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (na @ nb.T).float()


def layer_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per layer, cosine of `a[l]` with `b[l]` (same layer, e.g. two runs' directions)."""
    if a.shape != b.shape:
        raise EmmoeError(f"direction shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return torch.diagonal(cosine_matrix(a, b)).tolist()


# ---------------------------------------------------------------------------------------------
# Files


def save_directions(directions: Directions, path: str | os.PathLike[str]) -> Path:
    """Write `<path>` (safetensors) atomically, and `directions.json`-style text beside it."""
    from safetensors.torch import save_file

    from emmoe_dist.files import atomic_path, write_text_atomic

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    info = directions.info.model_dump_json()
    with atomic_path(target) as tmp:
        save_file(
            {k: v.contiguous().float() for k, v in directions.vectors.items()},
            str(tmp),
            metadata={_META_KEY: info},
        )
    write_text_atomic(target.with_suffix(".json"), directions.info.model_dump_json(indent=2) + "\n")
    return target


def load_directions(path: str | os.PathLike[str]) -> Directions:
    from safetensors import SafetensorError, safe_open

    file = str(path)
    if not Path(path).is_file():
        raise InputError("direction file does not exist", file=file)
    try:
        with safe_open(file, framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            vectors = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise InputError(f"not a safetensors file: {e}", file=file) from None
    if raw is None:
        raise InputError(
            "not a direction file (no emmoe_directions metadata); write one with "
            "`emmoe interp direction`",
            file=file,
        )
    try:
        info = DirectionInfo.model_validate(json.loads(raw))
    except (ValidationError, json.JSONDecodeError) as e:
        raise InputError(f"invalid direction metadata: {e}", file=file) from None
    return Directions(info, vectors)


def transfer_summary(
    ours: Directions, others: Sequence[tuple[str, Directions]], kind: str
) -> dict[str, Any]:
    """Per other file, the per-layer cosine of its `kind` direction with ours."""
    mine = ours.kind(kind)
    out: dict[str, Any] = {}
    for name, other in others:
        theirs = other.kind(kind)
        if theirs.shape != mine.shape:
            raise EmmoeError(
                f"{name}: direction shape {tuple(theirs.shape)} differs from {tuple(mine.shape)}"
            )
        out[name] = layer_cosines(mine, theirs)
    return out
