"""Where the routers and experts of a loaded model are, found through the family registry.

Works on a plain transformers model and on one wrapped by PEFT: `get_base_model()` is
unwrapped, and so are the `.base_layer` chains PEFT puts around a module it adapts
(`target_parameters` wraps the whole `*Experts` module, one wrapper per targeted tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import MoEFamily, family_for_model_type, moe_layer_indices


@dataclass(frozen=True)
class MoELayer:
    """One decoder layer's MoE block; `router` and `experts` are the unwrapped base modules."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


def unwrap(module: nn.Module) -> nn.Module:
    """The innermost module under PEFT's `.base_layer` wrappers (the module itself if none)."""
    inner = getattr(module, "base_layer", None)
    while isinstance(inner, nn.Module):
        module, inner = inner, getattr(inner, "base_layer", None)
    return module


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT `PeftModel` (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def model_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(base_model(model), "config", None)
    if config is None:
        raise EmmoeError(f"{type(model).__name__} has no transformers config")
    return dict(config.to_dict())


def family_of(model: nn.Module) -> MoEFamily:
    return family_for_model_type(model_config(model)["model_type"])


def _resolve(root: nn.Module, path: str, family: MoEFamily, where: str) -> nn.Module:
    obj: Any = root
    for part in path.split("."):
        nxt = getattr(obj, part, None)
        if nxt is None:
            raise EmmoeError(
                f"family {family.name!r}: {where}: path {path!r} does not resolve "
                f"({type(obj).__name__} has no {part!r}); the registry entry does not match "
                f"this model"
            )
        obj = unwrap(nxt) if isinstance(nxt, nn.Module) else nxt
    if not isinstance(obj, nn.Module):
        raise EmmoeError(f"family {family.name!r}: {where}: {path!r} is not a module")
    return obj


def decoder_layers(model: nn.Module, family: MoEFamily) -> list[nn.Module]:
    layers = _resolve(base_model(model), family.layers_path, family, "model")
    return list(layers.children())


def moe_layers(model: nn.Module, family: MoEFamily) -> list[MoELayer]:
    """Every MoE layer, in order; raises when the registry and the model disagree."""
    config = model_config(model)
    indices = moe_layer_indices(family, config)
    layers = decoder_layers(model, family)
    if len(layers) != int(config["num_hidden_layers"]):
        raise EmmoeError(
            f"family {family.name!r}: {family.layers_path} holds {len(layers)} layers, the "
            f"config says {config['num_hidden_layers']}"
        )
    # Cross-check the config's dense/sparse rule against the blocks actually built.
    built = [
        i
        for i, layer in enumerate(layers)
        if type(getattr(layer, family.moe_block, None)).__name__ == family.block_class
    ]
    if built != indices:
        raise EmmoeError(
            f"family {family.name!r}: layers holding {family.block_class} are {built}, the config "
            f"implies {indices}"
        )
    found = []
    for i in indices:
        where = f"layer {i}"
        block = _resolve(layers[i], family.moe_block, family, where)
        found.append(
            MoELayer(
                index=i,
                block=block,
                router=_resolve(layers[i], family.router_path, family, where),
                experts=_resolve(layers[i], family.experts_path, family, where),
            )
        )
    return found


def _full_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}


def router_parameters(model: nn.Module, family: MoEFamily) -> dict[str, nn.Parameter]:
    """Router weights (and GPT-oss router biases) under their names in `model`."""
    names = _full_names(model)
    return {
        names[id(p)]: p
        for layer in moe_layers(model, family)
        for p in layer.router.parameters(recurse=False)
    }


def expert_parameters(model: nn.Module, family: MoEFamily) -> dict[str, nn.Parameter]:
    """The fused 3-D expert tensors (and GPT-oss expert biases) under their names in `model`."""
    names = _full_names(model)
    attrs = (family.layout.gate_up, family.layout.down, *family.layout.biases)
    out: dict[str, nn.Parameter] = {}
    for layer in moe_layers(model, family):
        for attr in attrs:
            param = getattr(layer.experts, attr, None)
            if not isinstance(param, nn.Parameter):
                raise EmmoeError(
                    f"family {family.name!r}: layer {layer.index}: "
                    f"{family.experts_path}.{attr} is not a parameter of "
                    f"{type(layer.experts).__name__}"
                )
            out[names[id(param)]] = param
    return out
