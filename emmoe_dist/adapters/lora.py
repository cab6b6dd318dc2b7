"""LoRA on attention and fused MoE experts through PEFT, restricted to an expert selection.

PEFT's `target_parameters` gives one rank-r adapter per expert on the fused 3-D tensors but
cannot target a subset of experts. A subset is trained by zeroing *both* factors of every
unchosen expert before training: with A_e = 0 and B_e = 0 the gradients of both are zero
(dL/dB_e = G_e A_e^T, dL/dA_e = B_e^T G_e), AdamW's update of a zero gradient with zero
moments is exactly zero, and so ΔW_e = B_e A_e stays exactly 0 for the whole run, with no
hooks that a sharding engine could bypass. `unselected_expert_max` checks it at save time.

The router never trains, unless the adapter's `train_router` asks for the router-training arm:
then LoRA on the router weight (PEFT `target_parameters`, the router being a module that
applies its weight with `F.linear`, not an `nn.Linear`), or its full weights trainable, saved
as PEFT `modules_to_save` so that stock PEFT loads and merges them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from emmoe_dist.adapters.grouped_lora import GroupedLoraExperts, peft_state_dict, wrap_experts
from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import MoEFamily

if TYPE_CHECKING:
    from peft import LoraConfig

    from emmoe_dist.config import AdapterConfig


def attention_regex(family: MoEFamily) -> str:
    """Full-match regex over module names for the attention projections of decoder layers."""
    mods = "|".join(map(re.escape, family.attention_modules))
    return rf"(.*\.)?{re.escape(family.layers_path)}\.\d+\.{re.escape(family.attention)}\.({mods})"


def router_lora(adapter: AdapterConfig) -> bool:
    return adapter.train_router and adapter.router_weights == "lora"


def router_full(adapter: AdapterConfig) -> bool:
    return adapter.train_router and adapter.router_weights == "full"


def lora_config(family: MoEFamily, adapter: AdapterConfig) -> LoraConfig:
    """The PEFT config of the whole adapter, as saved next to it and read by stock PEFT."""
    from peft import LoraConfig

    on_attention = adapter.targets in ("attention+experts", "attention")
    on_experts = adapter.targets in ("attention+experts", "experts")
    # Experts first: PEFT nests the wrappers of one module's parameters in list order, and the
    # router is another module, so the experts' key names stay what `peft_state_dict` writes.
    parameters = list(family.expert_param_paths()) if on_experts else []
    parameters += [f"{family.router_path}.weight"] if router_lora(adapter) else []
    return LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # PEFT annotates int; float works
        # An explicit empty list: `None` would make PEFT pick its per-architecture defaults.
        target_modules=attention_regex(family) if on_attention else [],
        target_parameters=parameters or None,
        modules_to_save=[family.router_path] if router_full(adapter) else None,
        lora_dropout=0.0,  # PEFT's ParamWrapper cannot factor dropout out of a fused expert
        bias="none",
        task_type="CAUSAL_LM",
    )


def expert_adapters(model: nn.Module) -> Iterator[tuple[int, GroupedLoraExperts]]:
    """(layer index, expert LoRA module) for every MoE layer that has one."""
    for name, module in model.named_modules():
        if isinstance(module, GroupedLoraExperts):
            yield int(_LAYER.findall(name)[-1]), module


_LAYER = re.compile(r"\.(\d+)\.")


def apply_lora(
    model: nn.Module, family: MoEFamily, adapter: AdapterConfig, selection: ExpertSelection
) -> nn.Module:
    """LoRA on the configured targets; unchosen experts get zero factors (module docstring).

    Attention projections go through PEFT (`get_peft_model`); the fused experts through
    `GroupedLoraExperts`, which PEFT's `target_parameters` would otherwise handle by
    materialising every expert's ΔW (see grouped_lora.py). The result saves as one standard
    PEFT adapter (`adapter_state_dict` + `lora_config`).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    on_attention = adapter.targets in ("attention+experts", "attention")
    if on_attention or router_lora(adapter):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=adapter.rank,
                lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # PEFT annotates int; float works
                target_modules=attention_regex(family) if on_attention else [],
                target_parameters=[f"{family.router_path}.weight"]
                if router_lora(adapter)
                else None,
                lora_dropout=0.0,
                bias="none",
                task_type="CAUSAL_LM",
            ),
        )
        _match_base_dtype(model)
    if adapter.targets in ("attention+experts", "experts"):
        wrap_experts(model, family, adapter.rank, adapter.alpha)
        restrict_to_selection(model, selection)
    if router_full(adapter):
        from emmoe_dist.models.anatomy import router_parameters

        for p in router_parameters(model, family).values():
            p.requires_grad_(True)
    if not adapter.train_router:
        assert_router_frozen(model, family)
    return model


def _match_base_dtype(model: nn.Module) -> None:
    """PEFT gives a LoRA layer its base weight's dtype only when that weight holds data; a
    ZeRO-3-partitioned weight (an empty placeholder) leaves the factors in float32, and
    DeepSpeed needs one dtype across the trainable partitions."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        if not isinstance(weight, torch.Tensor):
            continue
        if not hasattr(weight, "ds_shape") or not weight.dtype.is_floating_point:
            continue  # PEFT placed these itself (a 4-bit base keeps its own compute dtype)
        dtype = weight.dtype
        for factors in (module.lora_A, module.lora_B):
            for p in factors.parameters():
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)


def adapter_state_dict(
    model: nn.Module, family: MoEFamily, *, router_weights: bool = False
) -> dict[str, torch.Tensor]:
    """Every LoRA tensor under stock PEFT's key names (attention, experts and a router LoRA);
    with `router_weights`, the router's own tensors too, as PEFT saves `modules_to_save`."""
    state = peft_state_dict(model, family)
    if router_weights:
        from emmoe_dist.models.anatomy import router_parameters

        for name, p in router_parameters(model, family).items():
            path = name.removeprefix("module.").removeprefix("base_model.model.")
            state[f"base_model.model.{path}"] = p.detach().to("cpu", copy=True).contiguous()
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        experts = f".{family.experts_path}."
        attention = {
            n: p for n, p in model.named_parameters() if ".lora_" in n and experts not in n
        }
        for key, value in get_peft_model_state_dict(model, state_dict=attention).items():
            state.setdefault(key, value.detach().to("cpu", copy=True))
    return state


def save_peft_adapter(
    state: Mapping[str, torch.Tensor], config: LoraConfig, folder: Path, base_model: str
) -> None:
    """Write `adapter_config.json` + `adapter_model.safetensors` exactly as PEFT does."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    config.save_pretrained(str(folder))
    save_file(dict(state), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


@torch.no_grad()
def restrict_to_selection(model: nn.Module, selection: ExpertSelection) -> int:
    """Zero both LoRA factors of every expert outside `selection`; returns how many were zeroed."""
    if selection.is_all:
        return 0
    zeroed = 0
    for layer, module in expert_adapters(model):
        chosen = set(selection.experts_for(layer))
        for name in module.names:
            for e in range(module.num_experts):
                if e not in chosen:
                    a, b = module.factors(name, e)
                    a.zero_()  # views into the fused factors
                    b.zero_()
                    zeroed += 1
        if not chosen:
            # Nothing trains in this layer: skip its optimizer state altogether.
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            for store in (module.lora_A, module.lora_B):
                for p in store.values():
                    p.requires_grad_(False)
    return zeroed


def unselected_expert_max(model: nn.Module, selection: ExpertSelection) -> float:
    """Largest |factor| over unchosen experts: exactly 0.0 when the restriction held."""
    worst = 0.0
    for layer, module in expert_adapters(model):
        chosen = set(selection.experts_for(layer))
        for name in module.names:
            for e in range(module.num_experts):
                if e not in chosen:
                    for t in module.factors(name, e):
                        worst = max(worst, float(t.detach().abs().max()))
    return worst


def assert_router_frozen(model: nn.Module, family: MoEFamily) -> None:
    """The router never trains: fail loudly if any router tensor (or a LoRA on it) is trainable."""
    router = f".{family.router_path}."
    bad = [n for n, p in model.named_parameters() if router in n and p.requires_grad]
    if bad:
        raise EmmoeError(f"router parameters must stay frozen, but these train: {bad[:4]}")


def expert_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int, expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_e [r, in], B_e [out, r]) of one expert, in PEFT's fused layout."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])[expert]
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts)[:, :, expert]
    return a, b


# ---- saved adapters ---------------------------------------------------------------------------

_SAVED_EXPERT_KEY = re.compile(
    r"layers\.(?P<layer>\d+)\.(?P<path>.+?)\.(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight$"
)


def saved_expert_factors(
    state: Mapping[str, torch.Tensor], family: MoEFamily
) -> dict[tuple[int, str], dict[str, str]]:
    """The keys of the expert LoRA factors in a saved PEFT adapter state dict:
    (layer, parameter name) -> {"A": key, "B": key}.

    PEFT nests one wrapper per targeted parameter, the first listed innermost, so `k` levels
    of `base_layer.` name the parameter `target_parameters[-1 - k]`.
    """
    targets = [p.rsplit(".", 1)[-1] for p in family.expert_param_paths()]
    experts_path = family.experts_path
    found: dict[tuple[int, str], dict[str, str]] = {}
    for key in state:
        m = _SAVED_EXPERT_KEY.search(key)
        if m is None or m.group("path") != experts_path:
            continue
        depth = m.group("nest").count("base_layer.")
        param = targets[len(targets) - 1 - depth]
        found.setdefault((int(m.group("layer")), param), {})[m.group("ab")] = key
    return dict(sorted(found.items()))


def saved_expert_deltas(
    state: Mapping[str, torch.Tensor], family: MoEFamily, num_experts: int, scaling: float = 1.0
) -> dict[tuple[int, str], torch.Tensor]:
    """Per-expert ‖ΔW_e‖ (Frobenius) from a saved PEFT adapter state dict.

    Keys: (layer, parameter name) -> tensor [E] of norms (`saved_expert_factors`).
    """
    out: dict[tuple[int, str], torch.Tensor] = {}
    for k, keys in saved_expert_factors(state, family).items():
        lora_a, lora_b = state[keys["A"]].float(), state[keys["B"]].float()
        norms = []
        for e in range(num_experts):
            a, b = expert_factors(lora_a, lora_b, num_experts, e)
            norms.append(torch.linalg.matrix_norm(b @ a) * scaling)
        out[k] = torch.stack(norms)
    return out
