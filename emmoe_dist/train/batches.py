"""Which examples each rank sees at each optimizer step: a pure function of (seed, step).

Resuming at step s replays exactly the micro-batches an uninterrupted run would have seen,
so the loss curve continues unchanged. Examples are shuffled per epoch; within windows of
consecutive micro-batches they are grouped by length, which keeps padding low without
making batch composition depend on anything but the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_WINDOW = 32  # global micro-batches whose examples are sorted by length together


@dataclass(frozen=True)
class BatchPlan:
    lengths: tuple[int, ...]
    micro_batch_size: int
    world_size: int
    grad_accum: int
    seed: int
    group_by_length: bool = True

    @property
    def global_micro(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_micro // self.grad_accum

    def total_steps(self, steps: int | None, epochs: float) -> int:
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.lengths)} examples are fewer than one optimizer step needs "
                f"({self.global_micro * self.grad_accum} = micro_batch_size x ranks x grad_accum)"
            )
        return steps if steps is not None else max(1, math.ceil(epochs * self.steps_per_epoch))

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        usable = len(order) // self.global_micro * self.global_micro
        order = order[:usable]
        if self.group_by_length:
            span = _WINDOW * self.global_micro
            order = [
                i
                for s in range(0, usable, span)
                for i in sorted(order[s : s + span], key=lambda i: -self.lengths[i])
            ]
        return [order[s : s + self.global_micro] for s in range(0, usable, self.global_micro)]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's `grad_accum` micro-batches (example indices) for optimizer step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        chosen = order[within * self.grad_accum : (within + 1) * self.grad_accum]
        mbs = self.micro_batch_size
        return [g[rank * mbs : (rank + 1) * mbs] for g in chosen]
