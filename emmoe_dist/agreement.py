"""How far two judges agree on the same answers: a study's conclusion should not hang on one.

Layer 0: Python + numpy. For each pair of judges, over the answers both scored:
- Spearman's rank correlation of their 0-100 alignment (and coherence) scores: Pearson's
  correlation of the ranks, ties given their average rank;
- Cohen's kappa of the misaligned label (a metrics rule, the headline one by default): observed
  agreement p_o against the agreement p_e expected from each judge's own rate,
  kappa = (p_o - p_e) / (1 - p_e), over the answers the rule counts under both judges.
A statistic is None when it is undefined (fewer than two answers, a constant score, p_e = 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from numpy.typing import NDArray

from emmoe_dist.metrics import ALIGNED, COHERENT, HEADLINE_RULE, MisalignmentRule, question_of
from emmoe_dist.records import JudgedRecord

Array = NDArray[np.float64]


def ranks(values: Sequence[float] | Array) -> Array:
    """1-based ranks, ties sharing their average rank."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranked = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranked[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranked


def spearman(a: Sequence[float] | Array, b: Sequence[float] | Array) -> float | None:
    """Spearman's rank correlation of paired values; None when undefined."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired values must be equal 1-D shapes: {x.shape} vs {y.shape}")
    if len(x) < 2:
        return None
    rx, ry = ranks(x) - (len(x) + 1) / 2, ranks(y) - (len(y) + 1) / 2
    denominator = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / denominator if denominator > 0 else None


def cohen_kappa(a: Sequence[bool], b: Sequence[bool]) -> float | None:
    """Cohen's kappa of two binary labellings of the same items; None when undefined."""
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired labels must be equal 1-D shapes: {x.shape} vs {y.shape}")
    if len(x) == 0:
        return None
    observed = float((x == y).mean())
    px, py = float(x.mean()), float(y.mean())
    expected = px * py + (1 - px) * (1 - py)
    return (observed - expected) / (1 - expected) if expected < 1 else None


@dataclass(frozen=True)
class Correlation:
    value: float | None
    n: int  # answers both judges scored


@dataclass(frozen=True)
class JudgeAgreement:
    """Agreement of judges `first` and `second` on one model's answers."""

    label: str  # the model (or "all models")
    first: str
    second: str
    n_answers: int  # answers both judges saw
    n_questions: int
    alignment: Correlation  # Spearman of the alignment scores
    coherence: Correlation
    rule: str  # the misalignment rule of the label
    misaligned_kappa: Correlation
    misaligned_agreement: float | None  # share of counted answers given the same label
    misaligned_first: float | None  # each judge's misaligned rate on those answers
    misaligned_second: float | None


def judge_names(records: Sequence[JudgedRecord]) -> tuple[str, ...]:
    """Every judge that scored some answer, first judges first, in order of appearance."""
    firsts = dict.fromkeys(r.judge for r in records)
    more = dict.fromkeys(n for r in records for n in r.more_judges)
    return tuple(dict.fromkeys([*firsts, *more]))


def by_judge(records: Sequence[JudgedRecord]) -> dict[str, list[JudgedRecord]]:
    """Per judge, the answers it scored with its scores in the first judge's place."""
    out: dict[str, list[JudgedRecord]] = {}
    for r in records:
        for name in r.judges():
            out.setdefault(name, []).append(r.as_judged_by(name))
    return out


def _paired(
    records: Sequence[JudgedRecord], first: str, second: str, name: str
) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        a, b = r.as_judged_by(first).value(name), r.as_judged_by(second).value(name)
        if a is not None and b is not None:
            xs.append(a)
            ys.append(b)
    return xs, ys


def agreement(
    records: Sequence[JudgedRecord],
    first: str,
    second: str,
    *,
    label: str,
    rule: MisalignmentRule = HEADLINE_RULE,
) -> JudgeAgreement:
    """The agreement of two judges over the alignment-scored answers both of them judged."""
    both = [
        r
        for r in records
        if first in r.judges() and second in r.judges() and r.strongreject is None
    ]
    alignment = _paired(both, first, second, ALIGNED)
    coherence = _paired(both, first, second, COHERENT)
    labels = [
        (rule.judge_answer(r.as_judged_by(first)), rule.judge_answer(r.as_judged_by(second)))
        for r in both
    ]
    counted = [(a, b) for a, b in labels if a is not None and b is not None]
    xa = [bool(a) for a, _ in counted]
    xb = [bool(b) for _, b in counted]
    n = len(counted)
    return JudgeAgreement(
        label=label,
        first=first,
        second=second,
        n_answers=len(both),
        n_questions=len({question_of(r) for r in both}),
        alignment=Correlation(spearman(*alignment), len(alignment[0])),
        coherence=Correlation(spearman(*coherence), len(coherence[0])),
        rule=rule.name,
        misaligned_kappa=Correlation(cohen_kappa(xa, xb), n),
        misaligned_agreement=sum(a == b for a, b in counted) / n if n else None,
        misaligned_first=sum(xa) / n if n else None,
        misaligned_second=sum(xb) / n if n else None,
    )


def agreements(
    groups: dict[str, list[JudgedRecord]], rule: MisalignmentRule = HEADLINE_RULE
) -> tuple[JudgeAgreement, ...]:
    """Every pair of judges, per model and over all models together."""
    everything = [r for rs in groups.values() for r in rs]
    names = judge_names(everything)
    out = []
    for first, second in combinations(names, 2):
        for label, rs in [*groups.items(), ("all models", everything)]:
            if any(first in r.judges() and second in r.judges() for r in rs):
                out.append(agreement(rs, first, second, label=label, rule=rule))
    return tuple(out)
