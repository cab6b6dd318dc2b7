"""Router steering: switch chosen experts off (never in the top-k) or on (always in the top-k)
while a model runs, per MoE layer; the intervention of SteerMoE (Fayyaz et al., ICLR 2026)
and of SAFEx's expert disabling.

`force_routing(model, family, forcing)` is a context manager of forward hooks on the routers of
the layers `forcing` names. Each hook edits the router's logits and re-applies the family's own
routing rule (`MoEFamily.router_rule`) to them:

- off: the logit becomes -inf. The expert gets probability 0 and is never chosen; the other
  experts' weights are what the rule gives without it (renormalised over the chosen ones where
  the rule renormalises, a softmax over the chosen k where it takes the top-k of the logits).
- on: the logit becomes the token's largest logit plus `margin`. The expert is always chosen,
  with a weight just above the token's favourite expert: SteerMoE's activation, which sets the
  expert's log-probability to the largest one plus a margin; a log-softmax only shifts a
  token's logits, so this is the same edit of the logits.

The edited logits are what the router returns as its logits, so a routing profile taken under
the hooks counts the steered choices. `random_forcing` draws the control: as many experts per
layer, in the same direction, chosen at random among the others.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import MoEFamily, RouterRule, moe_layer_indices, num_experts, top_k
from emmoe_dist.interp.steering import Intervention
from emmoe_dist.models.anatomy import model_config, moe_layers
from emmoe_dist.models.hooks import ForwardHooks

DEFAULT_MARGIN = 0.01  # SteerMoE's epsilon, in log-probability (= logit) units

Layers = Mapping[int, tuple[int, ...]]


def _frozen(layers: Mapping[int, Sequence[int]]) -> Layers:
    return MappingProxyType(
        {int(k): tuple(sorted({int(e) for e in v})) for k, v in sorted(layers.items()) if v}
    )


def _describe(layers: Layers) -> str:
    by_ids: dict[tuple[int, ...], list[int]] = {}
    for layer, ids in layers.items():
        by_ids.setdefault(ids, []).append(layer)
    return "; ".join(
        f"{'+'.join(f'E{e}' for e in ids)} @ layers {','.join(map(str, ls))}"
        for ids, ls in by_ids.items()
    )


@dataclass(frozen=True)
class RouterForcing:
    """Experts switched off and on, per MoE layer (layer index -> expert ids)."""

    off: Layers = field(default_factory=dict)
    on: Layers = field(default_factory=dict)
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "off", _frozen(self.off))
        object.__setattr__(self, "on", _frozen(self.on))
        if self.margin <= 0:
            raise EmmoeError(
                f"the margin of switched-on experts must be positive, got {self.margin}"
            )
        for layer in set(self.off) & set(self.on):
            both = sorted(set(self.off[layer]) & set(self.on[layer]))
            if both:
                raise EmmoeError(f"layer {layer}: expert {both[0]} is switched both off and on")

    @classmethod
    def everywhere(
        cls, off: Sequence[int] = (), on: Sequence[int] = (), *, layers: Sequence[int]
    ) -> RouterForcing:
        """The same expert ids in every one of `layers` (the MoE layers: the paper's E0..E7)."""
        return cls(
            off={i: tuple(off) for i in layers if off},
            on={i: tuple(on) for i in layers if on},
        )

    @property
    def layers(self) -> list[int]:
        return sorted(set(self.off) | set(self.on))

    @property
    def is_empty(self) -> bool:
        return not self.layers

    def describe(self) -> str:
        """e.g. `off E0 @ layers 0,2`: how records and reports name the condition."""
        parts = [
            f"{word} {_describe(layers)}"
            for word, layers in (("off", self.off), ("on", self.on))
            if layers
        ]
        return "; ".join(parts) or "no experts forced"

    def check(self, family: MoEFamily, config: Mapping[str, Any]) -> None:
        """Fail (naming the layer and expert) unless every forced expert exists and each layer
        keeps at least top-k experts to choose from and forces at most top-k on."""
        n, k = num_experts(family, config), top_k(family, config)
        moe = moe_layer_indices(family, config)
        if self.is_empty:
            raise EmmoeError("router steering needs at least one expert switched off or on")
        for word, layers in (("off", self.off), ("on", self.on)):
            for layer, ids in layers.items():
                if layer not in moe:
                    raise EmmoeError(
                        f"switched {word}: layer {layer} is not an MoE layer (MoE layers: {moe})"
                    )
                wide = [e for e in ids if not 0 <= e < n]
                if wide:
                    raise EmmoeError(
                        f"switched {word}: layer {layer}: expert {wide[0]} is out of range "
                        f"0..{n - 1}"
                    )
        for layer in self.layers:
            off, on = self.off.get(layer, ()), self.on.get(layer, ())
            if len(on) > k:
                raise EmmoeError(
                    f"layer {layer}: {len(on)} experts switched on, but a token chooses only "
                    f"top-{k}"
                )
            if n - len(off) < k:
                raise EmmoeError(
                    f"layer {layer}: {len(off)} of {n} experts switched off leaves fewer than "
                    f"the top-{k} a token must choose"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "off": {str(k): list(v) for k, v in self.off.items()},
            "on": {str(k): list(v) for k, v in self.on.items()},
            "margin": self.margin,
        }


def random_forcing(
    forcing: RouterForcing, n_experts: int, *, seed: int = 0, exclude: Layers | None = None
) -> RouterForcing:
    """The control: per layer, as many experts switched off and on as `forcing` switches, drawn
    (seeded) from the experts that `forcing` (and `exclude`) leave alone in that layer."""
    rng = random.Random(seed)
    off: dict[int, tuple[int, ...]] = {}
    on: dict[int, tuple[int, ...]] = {}
    for layer in forcing.layers:
        named = set(forcing.off.get(layer, ())) | set(forcing.on.get(layer, ()))
        named |= set((exclude or {}).get(layer, ()))
        pool = [e for e in range(n_experts) if e not in named]
        n_off, n_on = len(forcing.off.get(layer, ())), len(forcing.on.get(layer, ()))
        if n_off + n_on > len(pool):
            raise EmmoeError(
                f"layer {layer}: no random control: {n_off + n_on} experts to draw from the "
                f"{len(pool)} that the condition leaves alone"
            )
        drawn = rng.sample(pool, n_off + n_on)
        if n_off:
            off[layer] = tuple(drawn[:n_off])
        if n_on:
            on[layer] = tuple(drawn[n_off:])
    return RouterForcing(off=off, on=on, margin=forcing.margin)


def route(
    logits: torch.Tensor,
    rule: RouterRule,
    *,
    top_k: int,
    renormalize: bool,
    scores_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights, top-k expert ids) of `[tokens, experts]` logits under `rule`, computed
    as the routers of transformers 5 compute them (so unedited logits give their output)."""
    if rule.softmax_first:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        top, ids = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(top, dim=-1, dtype=top.dtype)
    return weights.to(scores_dtype), ids


def forced_logits(
    logits: torch.Tensor, off: Sequence[int], on: Sequence[int], margin: float
) -> torch.Tensor:
    """`logits` `[tokens, experts]` with `off` at -inf and `on` at each token's largest + margin."""
    out = logits.clone()
    if on:
        top = logits.max(dim=-1, keepdim=True).values
        out[:, list(on)] = (top + margin).expand(-1, len(on)).to(out.dtype)
    if off:
        out[:, list(off)] = float("-inf")
    return out


def router_intervention(condition: str, forcing: RouterForcing) -> Intervention:
    """Router steering as a steering condition (`steering.Intervention`), named for the records."""
    return Intervention(
        tag=f"route {condition}: {forcing.describe()}",
        apply=lambda model, family: force_routing(model, family, forcing),
    )


def _hook(
    rule: RouterRule,
    k: int,
    renormalize: bool,
    off: Sequence[int],
    on: Sequence[int],
    margin: float,
) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        logits, scores, _ = output
        # Softmax-first rules read the logits in float32: edit them there, as the rule reads them.
        work = logits.float() if rule.softmax_first else logits
        edited = forced_logits(work, off, on, margin)
        weights, ids = route(
            edited, rule, top_k=k, renormalize=renormalize, scores_dtype=scores.dtype
        )
        return edited.to(logits.dtype), weights, ids

    return hook


@contextmanager
def force_routing(model: nn.Module, family: MoEFamily, forcing: RouterForcing) -> Iterator[None]:
    """While open, the routers of `forcing`'s layers switch its experts off and on (module
    docstring); the hooks are removed on exit, error or not."""
    config = model_config(model)
    forcing.check(family, config)
    k = top_k(family, config)
    renormalize = family.router_rule.renormalizes(config)
    routers = {layer.index: layer.router for layer in moe_layers(model, family)}
    hooks = [
        (
            routers[layer],
            _hook(
                family.router_rule,
                k,
                renormalize,
                forcing.off.get(layer, ()),
                forcing.on.get(layer, ()),
                forcing.margin,
            ),
        )
        for layer in forcing.layers
    ]
    with ForwardHooks(hooks):
        yield
