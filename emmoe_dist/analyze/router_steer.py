"""Router steering as a condition of `emmoe interp steer`: chosen experts switched off (never in
the top-k) or on (always in the top-k), beside direction steering, through the same
generate-judge-report path; with a random-expert control that switches as many other experts
per layer. The intervention itself is `interp.router_steering`.

Conditions are generated as the `alpha = 1` point of their curve (the switch is on or off; alpha
0 is the shared unsteered answer set): `experts` in `<out>/experts/alpha_+1/`, the control in
`<out>/random_experts/alpha_+1/`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from emmoe_dist.errors import InputError
from emmoe_dist.families import MoEFamily, moe_layer_indices, num_experts

EXPERTS = "experts"
RANDOM_EXPERTS = "random_experts"


@dataclass(frozen=True, kw_only=True)
class RouterSteer:
    """Which experts the router switches off and on: ids in every MoE layer (`off`, `on`, the
    paper's E0..E7) and ids of single layers (`off_layers`, `on_layers`)."""

    off: tuple[int, ...] = ()
    on: tuple[int, ...] = ()
    off_layers: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    on_layers: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    margin: float | None = None  # switched-on experts: the largest logit plus this (None: 0.01)
    control: bool = True  # also a random choice of as many other experts per layer

    def __post_init__(self) -> None:
        if not (self.off or self.on or self.off_layers or self.on_layers):
            raise InputError("router steering names no expert to switch off or on", field="router")

    def layers_of(
        self, family: MoEFamily, config: Mapping[str, Any]
    ) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
        """(off, on) as MoE layer -> expert ids for this model."""
        moe = moe_layer_indices(family, config)
        off: dict[int, set[int]] = {i: set(self.off) for i in moe if self.off}
        on: dict[int, set[int]] = {i: set(self.on) for i in moe if self.on}
        for target, extra in ((off, self.off_layers), (on, self.on_layers)):
            for layer, ids in extra.items():
                target.setdefault(layer, set()).update(ids)
        return (
            {k: tuple(sorted(v)) for k, v in off.items()},
            {k: tuple(sorted(v)) for k, v in on.items()},
        )


def router_conditions(
    steer: RouterSteer, family: MoEFamily, config: Mapping[str, Any], *, seed: int
) -> dict[str, Any]:
    """Condition name -> `RouterForcing`: the experts as asked, and the random control."""
    from emmoe_dist.interp.router_steering import DEFAULT_MARGIN, RouterForcing, random_forcing

    off, on = steer.layers_of(family, config)
    margin = DEFAULT_MARGIN if steer.margin is None else steer.margin
    forcing = RouterForcing(off=off, on=on, margin=margin)
    forcing.check(family, config)
    out: dict[str, Any] = {EXPERTS: forcing}
    if steer.control:
        out[RANDOM_EXPERTS] = random_forcing(forcing, num_experts(family, config), seed=seed)
    return out
