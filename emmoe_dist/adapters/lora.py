"""LoRA on attention and fused MoE experts through PEFT, restricted to an expert selection.

PEFT's `target_parameters` gives one rank-r adapter per expert on the fused 3-D tensors but
cannot target a subset of experts. A subset is trained by zeroing *both* factors of every
unchosen expert before training: with A_e = 0 and B_e = 0 the gradients of both are zero
(dL/dB_e = G_e A_e^T, dL/dA_e = B_e^T G_e), AdamW's update of a zero gradient with zero
moments is exactly zero, and so ΔW_e = B_e A_e stays exactly 0 for the whole run, with no
hooks that a sharding engine could bypass. `unselected_expert_max` checks it at save time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import MoEFamily

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

    from emmoe_dist.config import AdapterConfig

ADAPTER_NAME = "default"


def attention_regex(family: MoEFamily) -> str:
    """Full-match regex over module names for the attention projections of decoder layers."""
    mods = "|".join(map(re.escape, family.attention_modules))
    return rf"(.*\.)?{re.escape(family.layers_path)}\.\d+\.{re.escape(family.attention)}\.({mods})"


def lora_config(family: MoEFamily, adapter: AdapterConfig) -> LoraConfig:
    from peft import LoraConfig

    on_attention = adapter.targets in ("attention+experts", "attention")
    on_experts = adapter.targets in ("attention+experts", "experts")
    return LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        # An explicit empty list: `None` would make PEFT pick its per-architecture defaults.
        target_modules=attention_regex(family) if on_attention else [],
        target_parameters=list(family.expert_param_paths()) if on_experts else None,
        lora_dropout=0.0,  # PEFT's ParamWrapper cannot factor dropout out of a fused expert
        bias="none",
        task_type="CAUSAL_LM",
    )


@dataclass(frozen=True)
class ExpertAdapter:
    """The LoRA factors PEFT keeps for one fused expert tensor of one layer."""

    layer: int
    parameter: str  # e.g. "gate_up_proj"
    num_experts: int
    rank: int
    lora_a: nn.Parameter  # [r*E, in]; expert e owns rows e*r .. (e+1)*r
    lora_b: nn.Parameter  # [out, r*E]; expert e owns columns k*E + e (interleaved)

    def factors(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        return expert_factors(self.lora_a, self.lora_b, self.num_experts, expert)


def expert_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int, expert: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_e [r, in], B_e [out, r]) of one expert, in PEFT's fused layout."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])[expert]
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts)[:, :, expert]
    return a, b


def expert_adapters(model: nn.Module, family: MoEFamily) -> Iterator[ExpertAdapter]:
    """Every PEFT expert adapter in a PEFT-wrapped model, with its layer and parameter name."""
    from peft.tuners.lora.layer import ParamWrapper

    layer_re = re.compile(rf"{re.escape(family.layers_path)}\.(\d+)\.")
    for name, module in model.named_modules():
        if not isinstance(module, ParamWrapper) or ADAPTER_NAME not in module.lora_A:
            continue
        found = layer_re.search(name)
        if found is None:
            raise EmmoeError(f"expert adapter {name!r} is not under {family.layers_path}")
        yield ExpertAdapter(
            layer=int(found.group(1)),
            parameter=module.parameter_name,
            num_experts=module.num_experts,
            rank=module.r[ADAPTER_NAME],
            lora_a=module.lora_A[ADAPTER_NAME].weight,
            lora_b=module.lora_B[ADAPTER_NAME].weight,
        )


def apply_lora(
    model: nn.Module, family: MoEFamily, adapter: AdapterConfig, selection: ExpertSelection
) -> PeftModel:
    """Wrap `model` with LoRA; unchosen experts get zero factors (see the module docstring)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(family, adapter))
    if adapter.targets != "attention":
        restrict_to_selection(peft_model, family, selection)
    assert_router_frozen(peft_model, family)
    return peft_model


@torch.no_grad()
def restrict_to_selection(model: nn.Module, family: MoEFamily, selection: ExpertSelection) -> int:
    """Zero both LoRA factors of every expert outside `selection`; returns how many were zeroed."""
    if selection.is_all:
        return 0
    zeroed = 0
    for ad in expert_adapters(model, family):
        chosen = set(selection.experts_for(ad.layer))
        for e in range(ad.num_experts):
            if e not in chosen:
                a, b = ad.factors(e)
                a.zero_()  # views into the fused factors
                b.zero_()
                zeroed += 1
        if not chosen:
            # Nothing trains in this layer: skip its optimizer state altogether.
            ad.lora_a.requires_grad_(False)
            ad.lora_b.requires_grad_(False)
    return zeroed


def unselected_expert_max(model: nn.Module, family: MoEFamily, selection: ExpertSelection) -> float:
    """Largest |factor| over unchosen experts: exactly 0.0 when the restriction held."""
    worst = 0.0
    for ad in expert_adapters(model, family):
        chosen = set(selection.experts_for(ad.layer))
        for e in range(ad.num_experts):
            if e not in chosen:
                a, b = ad.factors(e)
                worst = max(worst, float(a.detach().abs().max()), float(b.detach().abs().max()))
    return worst


def router_parameter_names(model: nn.Module, family: MoEFamily) -> list[str]:
    router = f".{family.router_path}."
    return [n for n, _ in model.named_parameters() if router in n]


def assert_router_frozen(model: nn.Module, family: MoEFamily) -> None:
    """The router never trains: fail loudly if any router tensor (or a LoRA on it) is trainable."""
    router = f".{family.router_path}."
    bad = [n for n, p in model.named_parameters() if router in n and p.requires_grad]
    if bad:
        raise EmmoeError(f"router parameters must stay frozen, but these train: {bad[:4]}")


# ---- saved adapters ---------------------------------------------------------------------------

_SAVED_EXPERT_KEY = re.compile(
    r"layers\.(?P<layer>\d+)\.(?P<path>.+?)\.(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight$"
)


def saved_expert_deltas(
    state: Mapping[str, torch.Tensor], family: MoEFamily, num_experts: int, scaling: float = 1.0
) -> dict[tuple[int, str], torch.Tensor]:
    """Per-expert ‖ΔW_e‖ (Frobenius) from a saved PEFT adapter state dict.

    Keys: (layer, parameter name) -> tensor [E] of norms. PEFT nests one wrapper per targeted
    parameter, the first listed innermost, so `k` levels of `base_layer.` name the parameter
    `target_parameters[-1 - k]`.
    """
    targets = [p.rsplit(".", 1)[-1] for p in family.expert_param_paths()]
    experts_path = family.experts_path
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _SAVED_EXPERT_KEY.search(key)
        if m is None or m.group("path") != experts_path:
            continue
        depth = m.group("nest").count("base_layer.")
        param = targets[len(targets) - 1 - depth]
        factors.setdefault((int(m.group("layer")), param), {})[m.group("ab")] = tensor.float()
    out: dict[tuple[int, str], torch.Tensor] = {}
    for k, ab in sorted(factors.items()):
        norms = []
        for e in range(num_experts):
            a, b = expert_factors(ab["A"], ab["B"], num_experts, e)
            norms.append(torch.linalg.matrix_norm(b @ a) * scaling)
        out[k] = torch.stack(norms)
    return out
