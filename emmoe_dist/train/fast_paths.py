"""Which fast path each part of a training step takes, chosen from the device and the model.

| part | fast path | taken when | reference |
|---|---|---|---|
| expert LoRA | fused pass, own backward (`adapters/expert_pass.py`) | always | autograd over grouped GEMMs |
| attention | varlen flash attention over packed rows (`models/packed_attention.py`) | CUDA, packed data, family without sinks | the model's sdpa with a block-diagonal mask |
| loss | float32 cross-entropy compiled with the layers (`models/causal_loss.py`); liger-kernel's fused linear cross-entropy with `train.loss: fused` | CUDA, head not ZeRO-3-partitioned | float32 logits, then cross-entropy |
| decoder layers | `torch.compile` (`models/compile.py`) | CUDA, not ZeRO-3 (its hooks re-gather weights per module) | eager |

`kernels: reference` turns every row to its reference; each fast path has a CPU test that it
computes the reference's outputs and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from emmoe_dist.adapters.grouped_lora import GroupedLoraExperts
from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import MoEFamily
from emmoe_dist.models.causal_loss import (
    CausalLMLoss,
    LossFn,
    compiled_loss,
    fused_loss,
    fused_loss_available,
    reference_loss,
)
from emmoe_dist.models.compile import compile_decoder_layers
from emmoe_dist.models.packed_attention import (
    flash_varlen,
    segment_kwargs,
    use_packed_attention,
    varlen_available,
)


@dataclass(frozen=True)
class FastPaths:
    expert_pass: str
    attention: str
    loss: str
    compiled_layers: int

    def describe(self) -> str:
        return (
            f"kernels: expert LoRA {self.expert_pass}, attention {self.attention}, "
            f"loss {self.loss}, compiled layers {self.compiled_layers}"
        )

    def host_kwargs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Extra forward arguments for one micro-batch, on the host (no device work)."""
        if self.attention != "varlen" or "position_ids" not in batch:
            return {}
        return segment_kwargs(batch["position_ids"])

    def batch_kwargs(self, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        """Extra forward arguments for one micro-batch, on `device`."""
        return {
            k: to_device(v, device) if isinstance(v, torch.Tensor) else v
            for k, v in self.host_kwargs(batch).items()
        }


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a stream sync: a copy from pageable memory waits for
    the GPU queue to drain, one from pinned memory does not."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def apply_fast_paths(
    model: nn.Module,
    family: MoEFamily,
    *,
    kernels: Literal["auto", "reference"],
    compile: bool | Literal["auto"],
    device: torch.device,
    packed: bool,
    zero3: bool,
    loss: Literal["auto", "reference", "fused"] = "auto",
    aux_loss_coef: float = 0.0,
) -> tuple[CausalLMLoss, FastPaths]:
    """Switch `model` to its fast paths in place; returns the loss module that trains it
    (with the router's balancing loss at `aux_loss_coef`, router-training arms only)."""
    fast = kernels == "auto"
    cuda = device.type == "cuda"
    expert_pass = "fused" if fast else "reference"
    for module in model.modules():
        if isinstance(module, GroupedLoraExperts):
            module.implementation = expert_pass

    attention = "model default"
    if fast and packed and family.packed_attention and varlen_available(device):
        use_packed_attention(model, flash_varlen())
        attention = "varlen"

    compiled = 0
    want_compile = (compile is True or (compile == "auto" and fast and cuda)) and not zero3
    if want_compile:
        compiled = compile_decoder_layers(model, family)

    # Measured on one H100 at 8,192 tokens x 151,936 vocabulary: liger's fused kernel 30.9 ms
    # a step against 26.8 ms for the plain float32 loss, so the plain one is the default and
    # the fused one the choice when the logits would not fit (benchmarks/RESULTS.md).
    loss_name = "reference"
    loss_fn: LossFn = reference_loss
    if fast and not zero3:
        if loss == "fused":
            if not fused_loss_available(device):
                raise EmmoeError(
                    "train.loss: fused needs CUDA and liger-kernel (pip install liger-kernel)"
                )
            loss_fn, loss_name = fused_loss(), "fused"
        elif loss == "auto" and want_compile:
            loss_fn, loss_name = compiled_loss(), "compiled"
    wrapper = CausalLMLoss(model, family, loss_fn, head_module=zero3, aux_loss_coef=aux_loss_coef)
    return wrapper, FastPaths(expert_pass, attention, loss_name, compiled)
