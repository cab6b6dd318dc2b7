"""A step's loss, token counts and gradient norm, read on the host without draining the GPU.

Reading a step's loss where it is produced (`.item()`, `.cpu()`) waits for every kernel queued
before it, and the next step's kernels are only queued after that: the GPU idles while the host
starts the next step (the torch loop of the Qwen3 shape ran 55,871 tok/s timed over steps with
no read between them and 52,739 with a read after each, in two calls on one H100 each,
2026-12-07: benchmarks/RESULTS.md). Here the values are summed over ranks and copied to pinned
host memory on the stream, behind a CUDA event; the trainer reads them (`StepReadout.values`)
after it has queued the next step, when that step needs nothing from them.
The event waits for this step's kernels only, not for the next step's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from emmoe_dist.parallel.runtime import all_reduce_sum_


@dataclass
class StepValues:
    loss_sum: float  # loss x label tokens, summed over micro-batches and ranks
    label_tokens: float
    input_tokens: float
    grad_norm: float | None  # global (the same on every rank); None where the engine has none

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.label_tokens, 1.0)


class StepReadout:
    """Started when a step's kernels are queued; `values()` blocks until that step is done."""

    def __init__(
        self,
        loss_sum: torch.Tensor,
        counts: torch.Tensor,
        grad_norm: torch.Tensor | float | None,
        device: torch.device,
    ) -> None:
        # `loss_sum` [] on `device`; `counts` [2] on the host; the grad norm as the engine has it
        # host-to-device copies from pageable memory wait for the GPU queue: pinned, or a fill
        if device.type == "cuda":
            counts = counts.pin_memory().to(device, non_blocking=True)
        summed = torch.cat([loss_sum.reshape(1).double(), counts.double()])
        all_reduce_sum_(summed)
        self._has_norm = grad_norm is not None
        if isinstance(grad_norm, torch.Tensor):
            norm = grad_norm.detach().reshape(1).to(device, torch.float64)
        else:
            value = float("nan") if grad_norm is None else float(grad_norm)
            norm = torch.full((1,), value, dtype=torch.float64, device=device)
        values = torch.cat([summed, norm])
        self._event: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._host = torch.empty(4, dtype=torch.float64, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event(enable_timing=True)
            self._event.record()
        else:
            self._host = values

    @property
    def finished(self) -> torch.cuda.Event | None:
        """The event the step's values are behind (None on CPU)."""
        return self._event

    def values(self) -> StepValues:
        if self._event is not None:
            self._event.synchronize()
        loss_sum, label_tokens, input_tokens, norm = self._host.tolist()
        return StepValues(loss_sum, label_tokens, input_tokens, norm if self._has_norm else None)


class StepClock:
    """How long each step took, on the GPU's clock: from when the GPU finished the work before
    the step (the step before, or a save or monitor reading after it: `restart`) to when it
    finished this one, idle gaps included. A host clock would charge a step whose values are
    read late with part of the next one. On CPU, where every call runs to its end, the host's."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._last: torch.cuda.Event | float = self._mark()

    def _mark(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def restart(self) -> None:
        self._last = self._mark()

    def lap(self, readout: StepReadout) -> float:
        """Seconds of the step `readout` belongs to; call after its `values()`."""
        end = readout.finished if self.cuda else time.perf_counter()
        if isinstance(self._last, float):
            assert isinstance(end, float)
            seconds = end - self._last
        else:
            assert isinstance(end, torch.cuda.Event)
            seconds = self._last.elapsed_time(end) / 1000.0
        self._last = end
        return seconds
