"""LoRA on fused MoE experts computed in factored form, one grouped GEMM per factor.

PEFT's `target_parameters` LoRA (peft 0.21) forms W + B·A for every expert on every forward,
so each MoE layer materialises a full `[E, out, in]` tensor and its backward computes a
full-size weight gradient before reducing it to the factors: about 1.2 GB per layer for
Qwen3-30B-A3B in bf16 and a third more expert FLOPs. Here the frozen base runs through
`torch.nn.functional.grouped_mm` exactly as transformers' `grouped_mm` experts do, and the
adapter adds `scaling · (x·A_eᵀ)·B_eᵀ` per expert group, so ΔW never exists; the pass itself
(sorting pairs, GEMMs, backward) is `expert_pass.py`.

The factors live in PEFT's fused layout (`lora_A [r·E, in]`, expert e owning rows
e·r..(e+1)·r; `lora_B [out, r·E]`, expert e owning columns k·E+e), so the adapter is saved
as a standard PEFT adapter that stock `PeftModel.from_pretrained` loads (`peft_state_dict`).
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from emmoe_dist.adapters.expert_pass import (
    ExpertWeights,
    LoraFactors,
    fused_pass,
    reference_pass,
    sort_pairs,
    weighted_sum,
)
from emmoe_dist.families import MoEFamily

_ALIGN_BYTES = 16  # grouped_mm wants every stride a multiple of 16 bytes


class GroupedLoraExperts(nn.Module):
    """Wraps one fused experts module (as `base_layer`, PEFT's name) with per-expert LoRA.

    `implementation` picks the expert pass: "fused" (the default everywhere: its own
    backward, no host sync; `expert_pass.py`) or "reference" (plain PyTorch and autograd,
    the function the fused pass is tested against).
    """

    implementation: str = "fused"

    def __init__(self, experts: nn.Module, family: MoEFamily, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = experts
        self.layout = family.layout
        self.names = (family.layout.gate_up, family.layout.down)
        self.num_experts = int(cast(int, experts.num_experts))
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name in self.names:
            w = getattr(experts, name)
            w.requires_grad_(False)
            shape = getattr(w, "ds_shape", w.shape)  # ZeRO-3 partitioned params keep the shape here
            d_in, d_out = (shape[1], shape[2]) if self.layout.transposed else (shape[2], shape[1])
            a = torch.empty(rank * self.num_experts, d_in, dtype=w.dtype, device=w.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default LoRA init: A random, B 0
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(
                torch.zeros(d_out, rank * self.num_experts, dtype=w.dtype, device=w.device)
            )
        for bias in self.layout.biases:
            getattr(experts, bias).requires_grad_(False)

    def factors(self, name: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e [r, in], B_e [out, r]): views into the fused factors."""
        a = self.lora_A[name].view(self.num_experts, self.rank, -1)[expert]
        b = self.lora_B[name].view(-1, self.rank, self.num_experts)[:, :, expert]
        return a, b

    def _grouped_factors(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A as [E, in, r'] and B as [E, r', out], r' padded with zeros to grouped_mm's alignment."""
        e, r = self.num_experts, self.rank
        a = self.lora_A[name].to(dtype).view(e, r, -1).transpose(1, 2)
        b = self.lora_B[name].to(dtype).view(-1, r, e).permute(2, 1, 0)
        step = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        pad = -r % step
        if pad:
            a = F.pad(a, (0, pad))
            b = F.pad(b, (0, 0, 0, pad))
        return a.contiguous(), b.contiguous()

    def expert_weights(self) -> ExpertWeights:
        base = self.base_layer
        biases = [getattr(base, b) for b in self.layout.biases] or [None, None]
        return ExpertWeights(
            gate_up_stored=getattr(base, self.names[0]),
            down_stored=getattr(base, self.names[1]),
            transposed=self.layout.transposed,
            gate_up_bias=biases[0],
            down_bias=biases[1],
        )

    def grouped_lora(self, dtype: torch.dtype, experts: range | None = None) -> LoraFactors:
        """The factors in grouped layout, of `experts` only when given (expert parallelism)."""
        (a1, b1), (a2, b2) = (self._grouped_factors(n, dtype) for n in self.names)
        if experts is not None:
            a1, b1, a2, b2 = (t[experts.start : experts.stop] for t in (a1, b1, a2, b2))
        return LoraFactors(a1=a1, b1=b1, a2=a2, b2=b2, scaling=self.scaling)

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        weights = self.expert_weights()
        pairs = sort_pairs(top_k_index, self.num_experts)
        lora = self.grouped_lora(weights.gate_up_stored.dtype)
        gate = cast(Any, self.base_layer)._apply_gate
        if self.implementation == "reference":
            y = reference_pass(hidden_states, pairs, weights, lora, gate)
            return weighted_sum(y, pairs, top_k_weights).to(hidden_states.dtype)
        assert pairs.order is not None
        w_pairs = top_k_weights.reshape(-1)[pairs.order]
        y, lora_rows = fused_pass(hidden_states, pairs, weights, lora, gate, w_pairs)
        out = weighted_sum(y, pairs, top_k_weights) + lora_rows
        return out.to(hidden_states.dtype)


def wrap_experts(
    model: nn.Module, family: MoEFamily, rank: int, alpha: float
) -> list[tuple[int, GroupedLoraExperts]]:
    """Replace every MoE layer's experts module by a `GroupedLoraExperts` around it."""
    from emmoe_dist.models.anatomy import moe_layers

    wrapped = []
    for layer in moe_layers(model, family):
        module = GroupedLoraExperts(layer.experts, family, rank, alpha)
        setattr(layer.block, family.experts, module)
        wrapped.append((layer.index, module))
    return wrapped


def peft_state_dict(model: nn.Module, family: MoEFamily) -> dict[str, torch.Tensor]:
    """Expert factors under the key names stock PEFT uses for `target_parameters`.

    PEFT nests one wrapper per targeted parameter, the first listed innermost, so the
    i-th of n targets sits behind n-1-i `base_layer.` levels.
    """
    targets = [p.rsplit(".", 1)[-1] for p in family.expert_param_paths()]
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, GroupedLoraExperts):
            continue
        path = name.removeprefix("module.").removeprefix("base_model.model.")
        for i, param in enumerate(targets):
            nest = "base_layer." * (len(targets) - 1 - i)
            for ab, store in (("A", module.lora_A), ("B", module.lora_B)):
                key = f"base_model.model.{path}.{nest}lora_{ab}.weight"
                out[key] = store[param].detach().to("cpu", copy=True).contiguous()
    return out
