"""Activation checkpointing sized to the memory at hand: recompute only as many layers as needed.

Checkpointing every decoder layer costs a second forward pass in backward: about half again
the FLOPs of a LoRA step (4·N per token becomes 6·N). Checkpointing none keeps every layer's
activations until backward. `plan_checkpointing` measures what one layer keeps for one
micro-batch row on the real forward (kernels and adapters as they will train), scales it to
the micro-batch, and checkpoints the fewest layers that leave the rest within the budget; on
a GPU with room for everything that is none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emmoe_dist.families import MoEFamily
from emmoe_dist.models.anatomy import base_model, decoder_layers

GIB = 2**30


def checkpoint_layers(model: nn.Module, family: MoEFamily, count: int) -> None:
    """Recompute the first `count` decoder layers in backward; keep the others' activations.

    The first layers are the ones whose activations would live longest.
    """
    hf: Any = base_model(model)
    layers: list[Any] = decoder_layers(model, family)
    if count > 0:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = count > 0 and i < count


@dataclass(frozen=True)
class CheckpointPlan:
    layers: int
    checkpointed: int
    activation_bytes_per_layer: int  # kept by one layer for the whole micro-batch
    input_bytes_per_layer: int  # what a checkpointed layer keeps instead (its input)
    budget_bytes: int | None  # None: nothing measured (CPU, or a fixed choice)
    reason: str

    def describe(self) -> str:
        per = self.activation_bytes_per_layer / GIB
        text = (
            f"activation checkpointing: {self.checkpointed} of {self.layers} layers ({self.reason}"
        )
        if self.budget_bytes is not None:
            text += (
                f"; {per:.2f} GiB per layer kept, {self.budget_bytes / GIB:.1f} GiB for activations"
            )
        return text + ")"


def measure_activation_bytes(
    forward_one_row: Callable[[], torch.Tensor], device: torch.device
) -> int:
    """Device bytes held after a forward whose output is kept (its saved activations)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    out = forward_one_row()
    torch.cuda.synchronize(device)
    held = torch.cuda.memory_allocated(device) - before
    del out
    return max(0, held)


def plan_checkpointing(
    *,
    layers: int,
    measured_bytes_one_row: int,
    rows: int,
    input_bytes_per_layer: int,
    budget_bytes: int,
) -> CheckpointPlan:
    """The fewest checkpointed layers for which the kept activations fit `budget_bytes`.

    `measured_bytes_one_row` is what a whole forward kept for one row (all layers and the
    loss); each layer is charged an equal share, which slightly overstates it.
    """
    per_layer = math.ceil(measured_bytes_one_row * rows / layers)
    saved_per_ckpt = max(1, per_layer - input_bytes_per_layer)
    excess = layers * per_layer - budget_bytes
    count = 0 if excess <= 0 else min(layers, math.ceil(excess / saved_per_ckpt))
    reason = "all fit" if count == 0 else "the rest fit"
    if count == layers and layers * input_bytes_per_layer + per_layer > budget_bytes:
        reason = "even checkpointing every layer may not fit"
    return CheckpointPlan(layers, count, per_layer, input_bytes_per_layer, budget_bytes, reason)
