"""Routing shift: how the router's choices move between a base and a fine-tuned model.

Both models are profiled on the same tokens (`routing.profile_batches`); per MoE layer the
token-share distributions p (fine-tuned) and q (base) are compared by

- KL(p || q) in nats, on shares smoothed as (share + eps) / (1 + E * eps) so that an expert
  one model never picks does not make it infinite (eps = 1e-6 by default, stated in the output);
- total variation, 1/2 sum |p - q|: the share of routing decisions that moved;
- per expert, the change of share p_e - q_e.

Did the trained experts move? Per layer, the trained experts' ranks among |change| (1 = moved
most; ties to the lower id), and the within-layer AUROC of |change| for trained versus
untrained experts (0.5: no relation; 1: the trained experts moved most), averaged over the
layers that have both kinds, with a permutation p-value: the same average under random
choices of as many experts per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertProfile, ExpertSelection

DEFAULT_EPSILON = 1e-6


@dataclass(frozen=True)
class LayerShift:
    layer: int
    kl: float  # KL(fine-tuned || base), nats, smoothed
    total_variation: float
    delta_share: tuple[float, ...]  # fine-tuned minus base, per expert
    trained: tuple[int, ...]  # experts trained in this layer (empty: unknown or none)
    trained_ranks: tuple[int, ...]  # rank of each trained expert among |delta_share|
    trained_auroc: float | None  # None unless the layer has trained and untrained experts


@dataclass(frozen=True)
class RoutingShift:
    base: str
    tuned: str
    dataset: str
    tokens: int
    epsilon: float
    layers: tuple[LayerShift, ...]
    selection_rule: str | None
    mean_trained_auroc: float | None
    permutation_p: float | None
    permutations: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def kl_divergence(p: np.ndarray, q: np.ndarray, epsilon: float = DEFAULT_EPSILON) -> float:
    """KL(p || q) in nats of two share vectors after additive smoothing by `epsilon`."""
    e = len(p)
    ps = (np.asarray(p, dtype=np.float64) + epsilon) / (1 + e * epsilon)
    qs = (np.asarray(q, dtype=np.float64) + epsilon) / (1 + e * epsilon)
    return float(np.sum(ps * np.log(ps / qs)))


def _ranks_desc(values: np.ndarray) -> np.ndarray:
    """1-based rank of each entry by value, largest first; ties to the lower index."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ascending ranks, ties sharing their mean rank (the Mann-Whitney convention)."""
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    out = np.empty(len(values))
    out[order] = np.repeat(mean_rank, ends - starts)
    return out


def _auroc_from_rank_sum(rank_sum: np.ndarray | float, k: int, e: int) -> np.ndarray | float:
    return (rank_sum - k * (k + 1) / 2) / (k * (e - k))


def routing_shift(
    base: ExpertProfile,
    tuned: ExpertProfile,
    *,
    epsilon: float = DEFAULT_EPSILON,
    trained: ExpertSelection | None = None,
    permutations: int = 2000,
    seed: int = 0,
) -> RoutingShift:
    """Compare the fine-tuned profile with the base one, layer by layer."""
    if (base.layer_indices, base.num_experts) != (tuned.layer_indices, tuned.num_experts):
        raise EmmoeError(
            f"profiles of different shapes: MoE layers {base.layer_indices} x "
            f"{base.num_experts} experts vs {tuned.layer_indices} x {tuned.num_experts}"
        )
    if base.tokens != tuned.tokens:
        raise EmmoeError(
            f"the profiles counted different tokens ({base.tokens} vs {tuned.tokens}); "
            "profile both models on the same inputs"
        )
    if epsilon <= 0:
        raise EmmoeError(f"epsilon must be positive, got {epsilon}")
    e = base.num_experts
    if trained is not None:
        stray = sorted(set(trained.layers) - set(base.layer_indices))
        wide = [x for layer in trained.layers for x in trained.experts_for(layer) if x >= e]
        if stray or wide:
            raise EmmoeError(
                f"the expert selection ({trained.rule}) does not fit these profiles: "
                + (f"layers {stray} are not MoE layers here" if stray else f"no expert {wide[0]}")
                + f" (MoE layers {base.layer_indices}, {e} experts)"
            )
    rng = np.random.default_rng(seed)
    layers, observed, null = [], [], []
    for rb, rt in zip(base.layers, tuned.layers, strict=True):
        q, p = np.array(rb.token_share), np.array(rt.token_share)
        delta = p - q
        moved = np.abs(delta)
        chosen = tuple(trained.experts_for(rb.layer)) if trained is not None else ()
        ranks = _ranks_desc(moved)
        layer_auroc = None
        k = len(chosen)
        if 0 < k < e:
            avg = _average_ranks(moved)
            layer_auroc = float(_auroc_from_rank_sum(avg[list(chosen)].sum(), k, e))
            observed.append(layer_auroc)
            # Null: k experts of this layer drawn at random, `permutations` times.
            picks = np.argsort(rng.random((permutations, e)), axis=1)[:, :k]
            null.append(_auroc_from_rank_sum(avg[picks].sum(1), k, e))
        layers.append(
            LayerShift(
                layer=rb.layer,
                kl=kl_divergence(p, q, epsilon),
                total_variation=float(0.5 * moved.sum()),
                delta_share=tuple(delta.tolist()),
                trained=chosen,
                trained_ranks=tuple(int(ranks[x]) for x in chosen),
                trained_auroc=layer_auroc,
            )
        )
    mean_auroc = p_value = None
    if observed:
        mean_auroc = float(np.mean(observed))
        null_mean = np.mean(np.stack(null), axis=0)
        # One-sided, with the observed arrangement counted among the permutations.
        p_value = float((1 + np.sum(null_mean >= mean_auroc - 1e-12)) / (1 + permutations))
    return RoutingShift(
        base=base.model,
        tuned=tuned.model,
        dataset=tuned.dataset,
        tokens=tuned.tokens,
        epsilon=epsilon,
        layers=tuple(layers),
        selection_rule=trained.rule if trained is not None else None,
        mean_trained_auroc=mean_auroc,
        permutation_p=p_value,
        permutations=permutations if observed else 0,
    )
