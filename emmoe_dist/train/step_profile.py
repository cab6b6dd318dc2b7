"""Where a training step's time goes: one step under `torch.profiler`, GPU time by category.

Every GPU kernel is charged to one category, from the operator that launched it (its name,
its input shapes, its Python stack) and the autograd node or annotated range around it:

| category | what |
|---|---|
| attention | flash / memory-efficient / varlen attention kernels |
| expert GEMMs | grouped GEMMs of the frozen experts |
| LoRA matmuls | any matmul with a rank-sized dimension (attention and expert adapters) |
| other GEMMs | attention projections, router logits, anything else dense |
| permute/sort | sorting pairs by expert, gathers and scatters of token rows |
| router | softmax / top-k of the routers |
| LM head + loss | vocabulary projection and cross-entropy (fused or not) |
| optimizer | the optimizer step |
| ZeRO gather/release | DeepSpeed's parameter fetch, release and gradient partition copies |
| collectives | NCCL/gloo kernels |
| elementwise/norm/copy | everything else: norms, rotary, activations, adds, casts, copies |
| GPU idle | step wall time during which no kernel ran (host syncs, launch gaps) |

`profile_step(fn, ...)` runs `fn` (one whole optimizer step) under the profiler and returns a
`StepProfile`; `markdown()` gives the table that benchmarks/RESULTS.md records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CATEGORIES = (
    "attention",
    "expert GEMMs",
    "LoRA matmuls",
    "other GEMMs",
    "permute/sort",
    "router",
    "LM head + loss",
    "optimizer",
    "ZeRO gather/release",
    "collectives",
    "elementwise/norm/copy",
    "GPU idle",
)

_MATMULS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::_grouped_mm",
    "aten::linear",
    "aten::matmul",
)
_ATTENTION = (
    "flash",
    "efficient_attention",
    "scaled_dot_product",
    "varlen",
    "fmha",
    "cudnn_attention",
)
_PERMUTE = (
    "aten::sort",
    "aten::argsort",
    "aten::searchsorted",
    "aten::index_select",
    "aten::index_copy",
    "aten::index_add",
    "aten::index_put",
    "aten::index",
    "aten::gather",
    "aten::scatter",
    "aten::repeat_interleave",
)
_LOSS = ("cross_entropy", "log_softmax", "nll_loss", "liger", "causal_loss.py")
# Runtime calls that block the host until the GPU has finished (`.item()` and `.tolist()` on a
# GPU tensor end in one of these).
_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
_ROUTER = ("aten::topk", "aten::softmax", "aten::_softmax", "Router", "router")


@dataclass
class StepProfile:
    wall_ms: float
    busy_ms: float
    ms: dict[str, float] = field(default_factory=dict)
    kernels: int = 0
    host_syncs: int = 0

    def share(self, category: str) -> float:
        return self.ms.get(category, 0.0) / self.wall_ms if self.wall_ms else 0.0

    def markdown(self, title: str) -> str:
        lines = [
            f"{title}: step {self.wall_ms:.1f} ms, {self.kernels} kernels, "
            f"{self.host_syncs} host syncs",
            "",
            "| category | ms | share |",
            "|---|---|---|",
        ]
        for c in CATEGORIES:
            lines.append(f"| {c} | {self.ms.get(c, 0.0):.1f} | {100 * self.share(c):.1f}% |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "wall_ms": self.wall_ms,
            "busy_ms": self.busy_ms,
            "kernels": self.kernels,
            "host_syncs": self.host_syncs,
            "ms": self.ms,
        }


def _dims(shapes: Iterable[Any]) -> list[int]:
    out: list[int] = []
    for s in shapes or ():
        if isinstance(s, list | tuple):
            out.extend(int(d) for d in s if isinstance(d, int))
    return out


def classify(
    op: str, shapes: Any, context: str, *, lora_dims: frozenset[int], vocab: int | None
) -> str:
    """The category of a kernel launched by operator `op`; `context` joins the names of the
    enclosing autograd nodes and ranges and the Python stack."""
    text = f"{op} {context}"
    if "nccl" in text.lower() or "c10d::" in text or "all_to_all" in text:
        return "collectives"
    if "deepspeed/runtime/zero" in context or "deepspeed.runtime.zero" in context:
        return "ZeRO gather/release"
    if "Optimizer.step" in context or "adam" in op.lower() or "optim/" in context:
        return "optimizer"
    if any(k in text for k in _ATTENTION):
        return "attention"
    dims = _dims(shapes)
    if op in _MATMULS and vocab is not None and vocab in dims:
        return "LM head + loss"
    if any(k in text for k in _LOSS):
        return "LM head + loss"
    if op in _MATMULS:
        if any(d in lora_dims for d in dims):
            return "LoRA matmuls"
        return "expert GEMMs" if op == "aten::_grouped_mm" else "other GEMMs"
    if op.startswith(_PERMUTE) or "IndexBackward" in context or "SortBackward" in context:
        return "permute/sort"
    if any(k in text for k in _ROUTER):
        return "router"
    return "elementwise/norm/copy"


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total / 1000.0


def profile_step(
    step: Callable[[], None],
    *,
    lora_rank: int,
    vocab: int | None,
    device: torch.device,
) -> StepProfile:
    """Run `step` once under the profiler (after the caller's warm-up) and categorise it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1000.0
    padded = lora_rank + (-lora_rank % 8)
    lora_dims = frozenset({lora_rank, padded})
    result = StepProfile(wall_ms=wall_ms, busy_ms=0.0)
    intervals: list[tuple[float, float]] = []
    from torch.autograd import DeviceType

    scalar_reads = 0
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            intervals.append((float(evt.time_range.start), float(evt.time_range.end)))
            continue
        if evt.name in _SYNCS:
            result.host_syncs += 1
        if evt.name == "aten::_local_scalar_dense":
            scalar_reads += 1
        kernels = getattr(evt, "kernels", None) or []
        if not kernels:
            continue
        context = [evt.name]
        parent = evt.cpu_parent
        while parent is not None:
            context.append(parent.name)
            parent = parent.cpu_parent
        context.extend(getattr(evt, "stack", None) or [])
        category = classify(
            evt.name,
            evt.input_shapes,
            " | ".join(context),
            lora_dims=lora_dims,
            vocab=vocab,
        )
        for k in kernels:
            result.ms[category] = result.ms.get(category, 0.0) + k.duration / 1000.0
            result.kernels += 1
    if device.type != "cuda":
        result.host_syncs = scalar_reads  # no runtime calls to count: the tensor reads
    result.busy_ms = _union_ms(intervals) if intervals else sum(result.ms.values())
    result.ms["GPU idle"] = max(0.0, wall_ms - result.busy_ms)
    return result


def write_profile(profile: StepProfile, title: str, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "step_profile.json").write_text(json.dumps(profile.to_json(), indent=2))
    (folder / "step_profile.md").write_text(profile.markdown(title) + "\n")
