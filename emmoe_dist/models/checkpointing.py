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
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from emmoe_dist.families import MoEFamily
from emmoe_dist.models.anatomy import base_model, decoder_layers

GIB = 2**30
T = TypeVar("T")

# The phase (recording or replaying) of the checkpointed layer running in this thread. The
# autograd engine recomputes a layer in its own thread, entering the recompute context there.
_phase = threading.local()


class _Phase(AbstractContextManager["_Phase"]):
    """One checkpointed call's host values: recorded in its forward, replayed in order in its
    recomputation (the two phases of one call share `values`)."""

    def __init__(self, values: list[Any], replay: bool) -> None:
        self.values = values
        self.replay = replay
        self.position = 0
        self.outer: _Phase | None = None

    def __enter__(self) -> _Phase:
        self.outer = getattr(_phase, "current", None)
        self.position = 0
        _phase.current = self
        return self

    def __exit__(self, *exc: object) -> None:
        _phase.current = self.outer

    def next(self, compute: Callable[[], T]) -> T:
        if self.replay and self.position < len(self.values):
            value: T = self.values[self.position]
        else:
            value = compute()
            if not self.replay:
                self.values.append(value)
        self.position += 1
        return value


def recompute_contexts() -> tuple[_Phase, _Phase]:
    """`context_fn` for `torch.utils.checkpoint` (non-reentrant): the forward context records
    what `same_in_recompute` computes; the recompute context of the same call replays it."""
    values: list[Any] = []
    return _Phase(values, replay=False), _Phase(values, replay=True)


def same_in_recompute(compute: Callable[[], T]) -> T:
    """`compute()`, except in a checkpointed layer's recomputation, where it is the value the
    layer's forward computed at the same point.

    For host values that cost a device sync and cannot change between the passes: the
    recomputation replays the forward on the same inputs (which is what makes checkpointing
    correct at all), so expert-parallel split sizes read in forward hold in recompute too.
    Outside checkpointed layers it is plain `compute()`.
    """
    phase: _Phase | None = getattr(_phase, "current", None)
    return compute() if phase is None else phase.next(compute)


def checkpoint_layers(model: nn.Module, family: MoEFamily, count: int) -> None:
    """Recompute the first `count` decoder layers in backward; keep the others' activations.

    The first layers are the ones whose activations would live longest. Their recomputation
    replays the host values their forward read (`same_in_recompute`) instead of syncing again.
    """
    hf: Any = base_model(model)
    layers: list[Any] = decoder_layers(model, family)
    if count > 0:
        hf.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": recompute_contexts}
        )
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
