"""A step's micro-batches built on the host while the GPU still runs the step before.

Padding, the label and token counts and the packed-attention segment bounds of a step cost a
few milliseconds of Python per micro-batch. Built in the training loop they leave the GPU idle
between the end of one step (the loss is read on the host) and the first kernel of the next;
built one step ahead on a worker thread they overlap the GPU's work, the way a DataLoader's
workers do. A DataLoader is not used because the loop asks for whole optimizer steps of a
deterministic plan (`BatchPlan`, resumable at any step), not for a stream of samples.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from emmoe_dist.data.chat import IGNORE_INDEX


@dataclass(frozen=True)
class HostMicroBatch:
    """One micro-batch, ready to copy: tensors in pinned memory when a GPU will read them."""

    inputs: dict[str, torch.Tensor]  # the model's tensor inputs
    extra: dict[str, Any]  # forward keywords of the fast paths (tensors and host ints)
    label_tokens: int  # tokens whose next token is scored
    input_tokens: int  # real (unpadded) tokens

    def to(self, device: torch.device) -> dict[str, Any]:
        """The forward's keywords on `device`; copies from pinned memory do not wait for the
        GPU queue to drain."""
        cuda = device.type == "cuda"
        return {
            k: v.to(device, non_blocking=cuda) if isinstance(v, torch.Tensor) else v
            for k, v in {**self.inputs, **self.extra}.items()
        }


def host_micro_batch(
    batch: dict[str, torch.Tensor],
    model_inputs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    extra: Callable[[dict[str, torch.Tensor]], dict[str, Any]],
    *,
    pin: bool,
) -> HostMicroBatch:
    """`batch` (a padded collation) as the forward will take it."""
    inputs = model_inputs(batch)
    kwargs = extra(batch)
    if pin:
        inputs = {k: v.pin_memory() for k, v in inputs.items()}
        kwargs = {
            k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }
    return HostMicroBatch(
        inputs=inputs,
        extra=kwargs,
        label_tokens=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        input_tokens=int(batch["attention_mask"].sum()),
    )


def prefetched(
    steps: Sequence[int], build: Callable[[int], list[HostMicroBatch]]
) -> Generator[list[HostMicroBatch], None, None]:
    """`build(step)` for each of `steps` in order, each one built while the caller works on the
    one before. An exception in `build` is raised where that step is asked for."""
    if not steps:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="emmoe-batches") as pool:
        pending: Future[list[HostMicroBatch]] = pool.submit(build, steps[0])
        for nxt in steps[1:]:
            ready = pending.result()
            pending = pool.submit(build, nxt)
            yield ready
        yield pending.result()
