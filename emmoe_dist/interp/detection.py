"""Early detection: does the last prompt token already point along the misalignment direction?

The score of an answer at layer l is the projection of the layer's output at the last prompt
token on the unit misalignment direction of layer l; the question is how well it ranks
misaligned answers above aligned ones (AUROC). Directions come from the training questions'
answers and scores are read on held-out questions only: the split is by question, never by
answer, since answers to one question share their prompt (and so their score).

AUROC is the Mann-Whitney statistic, ties counted one half; its interval is a percentile
bootstrap that resamples whole questions (clusters), because answers to one question are not
independent. The projection of the answer tokens' mean on the same direction is reported
beside it: how well the direction separates the answers themselves on unseen questions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from emmoe_dist.errors import EmmoeError
from emmoe_dist.interp.activations import ActivationSet
from emmoe_dist.interp.directions import mean_difference
from emmoe_dist.interp.labels import ALIGNED_LABEL, MISALIGNED
from emmoe_dist.metrics import DEFAULT_BOOTSTRAP, Bootstrap, Estimate

Array = NDArray[np.float64]
_CHUNK_CELLS = 4_000_000  # resamples x answers weights held at once


def _tie_groups(scores: Array) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(ascending order of the scores, start of each run of equal scores in that order)."""
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    return order, starts


def weighted_auroc(scores: Array, positive: NDArray[np.bool_], weights: Array) -> Array:
    """AUROC under each row of `weights` ([B, n] answer multiplicities): the weighted share of
    (positive, negative) pairs where the positive scores higher, ties counting 1/2. NaN for a
    row with no positive or no negative weight."""
    order, starts = _tie_groups(scores)
    w = weights[:, order]
    pos = positive[order]
    p = np.add.reduceat(w * pos, starts, axis=1)  # [B, groups]: positive weight per score value
    n = np.add.reduceat(w * ~pos, starts, axis=1)
    below = np.cumsum(n, axis=1) - n  # negative weight strictly below each value
    pairs = p.sum(1) * n.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (p * (below + 0.5 * n)).sum(1) / pairs, np.nan)


def auroc(scores: Sequence[float] | Array, positive: Sequence[bool] | NDArray[np.bool_]) -> float:
    """Probability that a random positive scores above a random negative (ties: 1/2)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise EmmoeError(f"scores {s.shape} and labels {y.shape} must be equal 1-D shapes")
    if not y.any() or y.all():
        raise EmmoeError(f"AUROC needs both classes: {int(y.sum())} positive of {len(y)}")
    return float(weighted_auroc(s, y, np.ones((1, len(s))))[0])


def roc_curve(scores: Array, positive: NDArray[np.bool_]) -> tuple[list[float], list[float]]:
    """(false positive rates, true positive rates) as the threshold falls past each distinct
    score, from (0, 0) to (1, 1)."""
    order, starts = _tie_groups(-np.asarray(scores, dtype=np.float64))
    pos = np.asarray(positive, dtype=bool)[order]
    tp = np.add.reduceat(pos.astype(np.float64), starts).cumsum()
    fp = np.add.reduceat((~pos).astype(np.float64), starts).cumsum()
    return [0.0, *(fp / max(fp[-1], 1)).tolist()], [0.0, *(tp / max(tp[-1], 1)).tolist()]


def bootstrap_aurocs(
    scores: Array,
    positive: NDArray[np.bool_],
    groups: Sequence[str] | None = None,
    settings: Bootstrap = DEFAULT_BOOTSTRAP,
    *,
    name: str = "auroc",
) -> list[Estimate]:
    """AUROC of each column of `scores` ([n, k]) with a percentile bootstrap interval. All
    columns share the resamples; `groups` (e.g. question ids) are resampled whole."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    n, k = scores.shape
    y = np.asarray(positive, dtype=bool)
    if not y.any() or y.all():
        return [Estimate.empty() for _ in range(k)]
    keys = [str(i) for i in range(n)] if groups is None else list(groups)
    names, cluster = np.unique(keys, return_inverse=True)
    g = len(names)
    rng = settings.rng(name)
    samples: list[Array] = []
    chunk = max(1, _CHUNK_CELLS // max(n, g))
    for start in range(0, settings.resamples, chunk):
        size = min(chunk, settings.resamples - start)
        drawn = rng.integers(0, g, size=(size, g)) + np.arange(size)[:, None] * g
        counts = np.bincount(drawn.ravel(), minlength=size * g).reshape(size, g)
        weights = counts[:, cluster].astype(np.float64)  # each answer drawn with its group
        samples.append(np.stack([weighted_auroc(scores[:, j], y, weights) for j in range(k)], 1))
    stacked = np.concatenate(samples)
    tail = 100 * (1 - settings.confidence) / 2
    out = []
    for j in range(k):
        value = float(weighted_auroc(scores[:, j], y, np.ones((1, n)))[0])
        finite = stacked[:, j][np.isfinite(stacked[:, j])]
        low, high = (
            (float(v) for v in np.percentile(finite, [tail, 100 - tail]))
            if finite.size
            else (None, None)
        )
        out.append(Estimate(value, low, high, n))
    return out


def weighted_auroc_columns(scores: Array, positive: NDArray[np.bool_]) -> Array:
    """AUROC of each column of `scores` [n, k] (no resampling)."""
    ones = np.ones((1, scores.shape[0]))
    return np.array(
        [weighted_auroc(scores[:, j], positive, ones)[0] for j in range(scores.shape[1])]
    )


def _value(estimate: Estimate) -> float:
    return -1.0 if estimate.value is None else estimate.value


def split_questions(
    questions: Sequence[str], test_fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(train, test) answer indices; a seeded share of the distinct questions is held out."""
    if not 0 < test_fraction < 1:
        raise EmmoeError(f"test_fraction must be in (0, 1), got {test_fraction}")
    distinct = sorted(set(questions))
    if len(distinct) < 2:
        raise EmmoeError(
            f"a held-out split needs at least 2 distinct questions, found {len(distinct)}"
        )
    shuffled = np.random.default_rng(seed).permutation(len(distinct))
    n_test = min(len(distinct) - 1, max(1, math.ceil(test_fraction * len(distinct))))
    test_q = {distinct[i] for i in shuffled[:n_test]}
    is_test = np.array([q in test_q for q in questions], dtype=bool)
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


@dataclass(frozen=True)
class LayerDetection:
    layer: int
    prompt: Estimate  # AUROC of the last prompt token's projection
    answer: Estimate  # AUROC of the answer mean's projection (reference)


@dataclass(frozen=True)
class Detection:
    layers: tuple[LayerDetection, ...]
    # The monitor's layer: highest last-prompt AUROC on the training questions, so the
    # held-out AUROC reported for it is not picked on the held-out data (see `chosen_on`).
    best_layer: int
    chosen_on: str  # "training questions", or "held-out questions" when they lack a class
    train_questions: tuple[str, ...]
    test_questions: tuple[str, ...]
    n_train: dict[str, int]  # misaligned / aligned answers
    n_test: dict[str, int]
    test_fraction: float
    seed: int
    resamples: int
    confidence: float
    roc_prompt: tuple[list[float], list[float]]  # best layer: (fpr, tpr)
    roc_answer: tuple[list[float], list[float]]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["roc_prompt"] = dict(zip(("fpr", "tpr"), self.roc_prompt, strict=True))
        data["roc_answer"] = dict(zip(("fpr", "tpr"), self.roc_answer, strict=True))
        return data


def _counts(labels: NDArray[np.int8]) -> dict[str, int]:
    return {
        "misaligned": int((labels == MISALIGNED).sum()),
        "aligned": int((labels == ALIGNED_LABEL).sum()),
    }


def projections(activations: torch.Tensor, directions: torch.Tensor) -> Array:
    """[n, layers]: each answer's activation at each layer projected on that layer's unit
    direction (a zero direction projects to 0)."""
    units = directions.double() / directions.double().norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.einsum("nlh,lh->nl", activations.double(), units).numpy()


def detect(
    acts: ActivationSet,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
    directions: torch.Tensor | None = None,
) -> Detection:
    """Per layer, AUROC of the last-prompt projection on held-out questions.

    The direction is the training questions' mean difference unless `directions`
    ([layers, hidden], e.g. from another run) is given; the split is made either way.
    """
    labelled = acts.select(np.flatnonzero(acts.labels >= 0))
    train, test = split_questions(labelled.questions, test_fraction, seed)
    train_set, test_set = labelled.select(train), labelled.select(test)
    if directions is None:
        counts = _counts(train_set.labels)
        if not all(counts.values()):
            raise EmmoeError(
                f"the training questions hold {counts['misaligned']} misaligned and "
                f"{counts['aligned']} aligned answers; the direction needs both (change the "
                "seed or the test fraction, or judge more answers)"
            )
        directions = mean_difference(train_set)
    elif directions.shape != acts.answer_mean.shape[1:]:
        raise EmmoeError(
            f"directions {tuple(directions.shape)} do not match the activations' "
            f"[layers, hidden] {tuple(acts.answer_mean.shape[1:])}"
        )
    positive = test_set.labels == MISALIGNED
    if not positive.any() or positive.all():
        raise EmmoeError(
            f"the held-out questions have {int(positive.sum())} misaligned of {len(positive)} "
            "answers; AUROC needs both classes (change --seed or --test-fraction)"
        )
    prompt_scores = projections(test_set.last_prompt, directions)
    answer_scores = projections(test_set.answer_mean, directions)
    num_layers = prompt_scores.shape[1]
    estimates = bootstrap_aurocs(
        np.concatenate([prompt_scores, answer_scores], 1),
        positive,
        test_set.questions,
        bootstrap,
        name="detect",
    )
    layers = tuple(
        LayerDetection(layer, estimates[layer], estimates[num_layers + layer])
        for layer in range(num_layers)
    )
    train_positive = train_set.labels == MISALIGNED
    if train_positive.any() and not train_positive.all():
        train_scores = projections(train_set.last_prompt, directions)
        ranking = weighted_auroc_columns(train_scores, train_positive)
        chosen_on = "training questions"
    else:  # only with given directions: the training split may hold one class
        ranking = np.array([_value(d.prompt) for d in layers])
        chosen_on = "held-out questions"
    best = layers[int(np.argmax(ranking))]
    return Detection(
        layers=layers,
        best_layer=best.layer,
        chosen_on=chosen_on,
        train_questions=tuple(sorted(set(train_set.questions))),
        test_questions=tuple(sorted(set(test_set.questions))),
        n_train=_counts(train_set.labels),
        n_test=_counts(test_set.labels),
        test_fraction=test_fraction,
        seed=seed,
        resamples=bootstrap.resamples,
        confidence=bootstrap.confidence,
        roc_prompt=roc_curve(prompt_scores[:, best.layer], positive),
        roc_answer=roc_curve(answer_scores[:, best.layer], positive),
    )
