"""Full fine-tune of chosen experts only: a trainable delta over just those experts.

Training the fused `[E, ...]` tensors directly would keep AdamW state for all E experts and
let nothing stop an unchosen expert from moving. Instead the fused tensors stay frozen and
each MoE layer gets `delta[k, ...]` for its k chosen experts; on every forward the experts
module sees `W.index_add(0, ids, delta)` through a temporary `torch.nn.utils.parametrize`
parametrization (the mechanism PEFT's `ParamWrapper` uses for fused experts), so optimizer
state exists for k experts, not E, and unchosen experts are untouched by construction.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import MoEFamily
from emmoe_dist.models.anatomy import moe_layers

DELTA_FILE = "expert_delta.safetensors"


class _AddRows(nn.Module):
    """Parametrization W -> W with `delta` added to rows `ids` of the expert axis."""

    def __init__(self, ids: torch.Tensor, delta: torch.Tensor) -> None:
        super().__init__()
        self.ids, self.delta = ids, delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.index_add(0, self.ids.to(weight.device), self.delta.to(weight.dtype))


class ExpertDelta(nn.Module):
    """Wraps one fused experts module; only `deltas` train.

    The wrapped module is `base_layer` (the attribute name PEFT uses too), so code that
    looks through adapter wrappers finds the experts the same way for both.
    """

    def __init__(self, experts: nn.Module, names: tuple[str, ...], ids: list[int]) -> None:
        super().__init__()
        self.base_layer = experts
        self.register_buffer("expert_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.names = names
        self.deltas = nn.ParameterDict()
        for name in names:
            w = getattr(experts, name)
            w.requires_grad_(False)
            shape = getattr(w, "ds_shape", w.shape)  # ZeRO-3 partitioned params keep it here
            self.deltas[name] = nn.Parameter(
                torch.zeros((len(ids), *shape[1:]), dtype=w.dtype, device=w.device)
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name in self.names:
            parametrize.register_parametrization(
                self.base_layer,
                name,
                _AddRows(cast(torch.Tensor, self.expert_ids), self.deltas[name]),
            )
        try:
            with parametrize.cached():
                return self.base_layer(*args, **kwargs)
        finally:
            for name in self.names:
                parametrize.remove_parametrizations(self.base_layer, name, leave_parametrized=False)


def _expert_param_names(family: MoEFamily) -> tuple[str, ...]:
    lay = family.layout
    return (lay.gate_up, lay.down, *lay.biases)


def apply_expert_delta(model: nn.Module, family: MoEFamily, selection: ExpertSelection) -> int:
    """Freeze the whole model and add trainable deltas for the chosen experts; returns k total."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = _expert_param_names(family)
    total = 0
    for layer in moe_layers(model, family):
        i, block = layer.index, layer.block
        ids = sorted(selection.experts_for(i))
        if not ids:
            continue
        experts = block.get_submodule(family.experts)
        if isinstance(experts, ExpertDelta):
            raise EmmoeError(f"layer {i} already has an expert delta")
        setattr(block, family.experts, ExpertDelta(experts, names, ids))
        total += len(ids)
    if total == 0:
        raise EmmoeError("the expert selection chooses no expert in any MoE layer")
    return total


def expert_delta_modules(model: nn.Module) -> Iterator[tuple[str, ExpertDelta]]:
    for name, module in model.named_modules():
        if isinstance(module, ExpertDelta):
            yield name, module


def delta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<module path>.<param>` -> delta, plus `<module path>.expert_ids`: all a merge needs."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in expert_delta_modules(model):
        path = name.removeprefix("module.")
        out[f"{path}.expert_ids"] = cast(torch.Tensor, mod.expert_ids).detach().cpu()
        for p, d in mod.deltas.items():
            out[f"{path}.{p}"] = d.detach().cpu().contiguous()
    return out


def save_expert_delta(
    state: Mapping[str, torch.Tensor], folder: Path, meta: dict[str, str]
) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{DELTA_FILE}.tmp"
    save_file(dict(state), str(tmp), metadata=meta)
    tmp.replace(folder / DELTA_FILE)
    return folder / DELTA_FILE


@torch.no_grad()
def merge_expert_delta(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int:
    """Add saved deltas into a plain model's fused expert tensors; returns experts merged."""
    merged = 0
    for key, ids in state.items():
        if not key.endswith(".expert_ids"):
            continue
        path = key.removesuffix(".expert_ids")
        experts = model.get_submodule(path)
        for pkey, delta in state.items():
            if pkey.startswith(path + ".") and pkey != key:
                w = getattr(experts, pkey[len(path) + 1 :])
                w.index_add_(0, ids.to(w.device), delta.to(w.device, w.dtype))
        merged += len(ids)
    return merged
