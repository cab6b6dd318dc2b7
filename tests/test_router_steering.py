"""Router steering on tiny models of every family: the registry's routing rule reproduces each
router module's output exactly; an expert switched off is never chosen and the others' weights
are what the rule gives without it; an expert switched on is always chosen."""

from __future__ import annotations

import functools

import pytest
import torch

from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import FAMILIES, moe_layer_indices, num_experts, top_k
from emmoe_dist.interp.router_steering import (
    RouterForcing,
    force_routing,
    random_forcing,
    route,
)
from emmoe_dist.models.anatomy import model_config, moe_layers
from emmoe_dist.models.tiny import build_tiny
from emmoe_dist.routing import RoutingCounter

FAMILY_NAMES = sorted(FAMILIES)


@functools.cache  # read-only here: the hooks leave the weights alone
def _model(name: str):
    model, _ = build_tiny(FAMILIES[name], seed=3)
    return model.eval()


def _hidden(model, tokens: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(tokens, model.config.hidden_size, generator=g)


def _rule_args(name: str, model) -> dict:
    family, config = FAMILIES[name], model_config(model)
    return {
        "top_k": top_k(family, config),
        "renormalize": family.router_rule.renormalizes(config),
    }


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_the_registry_rule_reproduces_every_router_exactly(name: str) -> None:
    model, family = _model(name), FAMILIES[name]
    h = _hidden(model)
    with torch.no_grad():
        for layer in moe_layers(model, family):
            logits, scores, ids = layer.router(h)
            rule = family.router_rule
            read = logits.float() if rule.softmax_first else logits
            weights, chosen = route(
                read, rule, scores_dtype=scores.dtype, **_rule_args(name, model)
            )
            assert torch.equal(chosen, ids)
            assert torch.equal(weights, scores)


def _expected_without(name: str, model, logits: torch.Tensor, expert: int):
    """The family's rule on a router that has no `expert`: drop its column, route, map back."""
    family = FAMILIES[name]
    keep = [e for e in range(logits.shape[-1]) if e != expert]
    read = logits.float() if family.router_rule.softmax_first else logits
    weights, ids = route(
        read[:, keep], family.router_rule, scores_dtype=torch.float32, **_rule_args(name, model)
    )
    return weights, torch.tensor(keep)[ids]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_an_expert_switched_off_is_never_chosen(name: str) -> None:
    model, family = _model(name), FAMILIES[name]
    config = model_config(model)
    layers = moe_layer_indices(family, config)
    expert = 2
    forcing = RouterForcing.everywhere(off=[expert], layers=layers)
    h = _hidden(model)
    with torch.no_grad():
        plain = {layer.index: layer.router(h) for layer in moe_layers(model, family)}
        assert any((p[2] == expert).any() for p in plain.values())  # it was chosen unsteered
        with force_routing(model, family, forcing):
            for layer in moe_layers(model, family):
                logits, weights, ids = layer.router(h)
                assert not (ids == expert).any()
                want_weights, want_ids = _expected_without(
                    name, model, plain[layer.index][0], expert
                )
                # Same experts; same weights (the rule over the other experts)
                assert torch.equal(ids.sort(-1).values, want_ids.sort(-1).values)
                order, want_order = ids.argsort(-1), want_ids.argsort(-1)
                torch.testing.assert_close(
                    weights.float().gather(-1, order),
                    want_weights.gather(-1, want_order),
                    rtol=1e-6,
                    atol=1e-7,
                )
                assert torch.isneginf(logits[:, expert]).all()
        # Whole forwards: the routing profile never counts it, in any MoE layer.
        ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))
        with force_routing(model, family, forcing), RoutingCounter(model, family) as counter:
            model(input_ids=ids)
        counts = counter.counts().token_counts
        assert counts[:, expert].sum() == 0 and counts.sum() > 0
    # The hooks are gone on exit: the router chooses it again.
    with torch.no_grad():
        assert any((layer.router(h)[2] == expert).any() for layer in moe_layers(model, family))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_an_expert_switched_on_is_always_chosen_first(name: str) -> None:
    model, family = _model(name), FAMILIES[name]
    config = model_config(model)
    layer = moe_layer_indices(family, config)[-1]
    forcing = RouterForcing(on={layer: (5,)})
    h = _hidden(model)
    router = {m.index: m.router for m in moe_layers(model, family)}[layer]
    with torch.no_grad(), force_routing(model, family, forcing):
        _, weights, ids = router(h)
    assert (ids == 5).any(dim=-1).all()
    # its weight is the largest of the token's k (the favourite's logit plus the margin)
    top = weights.float().argmax(-1)
    assert (ids.gather(-1, top[:, None]).squeeze(-1) == 5).all()


def test_forcing_is_checked_against_the_model() -> None:
    model = _model("qwen3_moe")  # MoE layers 0 and 2, 8 experts, top-2
    family, config = FAMILIES["qwen3_moe"], model_config(model)
    with pytest.raises(EmmoeError, match="layer 1 is not an MoE layer"):
        RouterForcing(off={1: (0,)}).check(family, config)
    with pytest.raises(EmmoeError, match=r"expert 9 is out of range 0\.\.7"):
        RouterForcing(on={0: (9,)}).check(family, config)
    with pytest.raises(EmmoeError, match="3 experts switched on, but a token chooses only top-2"):
        RouterForcing(on={0: (0, 1, 2)}).check(family, config)
    with pytest.raises(EmmoeError, match="7 of 8 experts switched off leaves fewer than"):
        RouterForcing(off={2: tuple(range(7))}).check(family, config)
    with pytest.raises(EmmoeError, match="switched both off and on"):
        RouterForcing(off={0: (1,)}, on={0: (1,)})
    assert num_experts(family, config) == 8


def test_random_control_switches_as_many_other_experts() -> None:
    forcing = RouterForcing(off={0: (0, 3), 2: (1,)}, on={2: (4,)})
    control = random_forcing(forcing, 8, seed=1)
    assert {k: len(v) for k, v in control.off.items()} == {0: 2, 2: 1}
    assert {k: len(v) for k, v in control.on.items()} == {2: 1}
    for layer in forcing.layers:
        named = set(forcing.off.get(layer, ())) | set(forcing.on.get(layer, ()))
        drawn = set(control.off.get(layer, ())) | set(control.on.get(layer, ()))
        assert not named & drawn
    assert random_forcing(forcing, 8, seed=1) == control
    assert forcing.describe() == "off E0+E3 @ layers 0; E1 @ layers 2; on E4 @ layers 2"
