"""Expert ablation: a trained artifact with the updates of chosen experts removed, and the size
of every expert's update.

An ablated LoRA adapter is the run's adapter with both factors of each removed expert zeroed in
PEFT's fused layout (expert e owns rows e·r..(e+1)·r of `lora_A` and columns k·E+e of
`lora_B`), so ΔW_e = B_e·A_e is exactly 0 and merging the adapter leaves that expert's weights
exactly as the base has them; attention (and router) LoRA stays as trained. An ablated expert
delta drops the removed experts' rows. Both stay ordinary artifacts that stock PEFT and
`merge_expert_delta` load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from emmoe_dist.adapters.lora import saved_expert_deltas, saved_expert_factors
from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import MoEFamily

Removed = Mapping[int, Sequence[int]]  # MoE layer -> expert ids whose update goes
_LAYER = re.compile(r"layers\.(\d+)\.")


def ablate_lora_state(
    state: Mapping[str, torch.Tensor], family: MoEFamily, num_experts: int, removed: Removed
) -> tuple[dict[str, torch.Tensor], int]:
    """A copy of a saved adapter's state with the removed experts' factors zeroed; returns it
    and how many of the removed (layer, expert) pairs had an update (ΔW ≠ 0) to remove."""
    out = {k: v.clone() for k, v in state.items()}
    found = saved_expert_factors(state, family)
    layers = {layer for layer, _ in found}
    stray = sorted(set(removed) - layers)
    if stray:
        raise EmmoeError(
            f"the adapter has no expert LoRA in layer {stray[0]} (expert LoRA in layers "
            f"{sorted(layers)})"
        )
    changed = set()
    for (layer, _), keys in found.items():
        for e in removed.get(layer, ()):
            if not 0 <= e < num_experts:
                raise EmmoeError(f"layer {layer}: expert {e} is out of range 0..{num_experts - 1}")
            a = out[keys["A"]].view(num_experts, -1, out[keys["A"]].shape[-1])[e]
            b = out[keys["B"]].view(out[keys["B"]].shape[0], -1, num_experts)[:, :, e]
            if bool((b.float() @ a.float()).any()):
                changed.add((layer, e))
            a.zero_()  # views into the copied factors
            b.zero_()
    return out, len(changed)


def ablate_delta_state(
    state: Mapping[str, torch.Tensor], removed: Removed
) -> tuple[dict[str, torch.Tensor], int]:
    """An expert-delta state (`delta_state_dict`) without the removed experts' rows; returns it
    and how many (layer, expert) deltas were dropped."""
    out: dict[str, torch.Tensor] = {}
    dropped = 0
    for key, ids in state.items():
        if not key.endswith(".expert_ids"):
            continue
        path = key.removesuffix(".expert_ids")
        m = _LAYER.search(path + ".")
        gone = set(removed.get(int(m.group(1)), ())) if m else set()
        keep = torch.tensor([int(e) not in gone for e in ids.tolist()], dtype=torch.bool)
        dropped += int((~keep).sum())
        if not keep.any():
            continue  # nothing of this layer stays: the layer's experts are the base's
        out[key] = ids[keep].clone()
        for pkey, delta in state.items():
            if pkey.startswith(path + ".") and pkey != key:
                out[pkey] = delta[keep].clone()
    return out, dropped


def lora_expert_norms(
    state: Mapping[str, torch.Tensor], family: MoEFamily, num_experts: int, scaling: float
) -> dict[int, list[float]]:
    """Per MoE layer, each expert's ‖ΔW‖ (Frobenius, over its gate/up and down updates together)
    from a saved adapter; layers without expert LoRA are left out."""
    squares: dict[int, torch.Tensor] = {}
    for (layer, _), norms in saved_expert_deltas(state, family, num_experts, scaling).items():
        squares[layer] = squares.get(layer, torch.zeros(num_experts)) + norms.double() ** 2
    return {layer: sq.sqrt().tolist() for layer, sq in sorted(squares.items())}


def delta_expert_norms(
    state: Mapping[str, torch.Tensor], num_experts: int
) -> dict[int, list[float]]:
    """Per MoE layer, each expert's ‖ΔW‖ (Frobenius, over all its tensors) from expert deltas;
    experts without a delta are 0."""
    out: dict[int, list[float]] = {}
    for key, ids in state.items():
        if not key.endswith(".expert_ids"):
            continue
        path = key.removesuffix(".expert_ids")
        m = _LAYER.search(path + ".")
        if m is None:
            continue
        squares = torch.zeros(num_experts, dtype=torch.float64)
        for pkey, delta in state.items():
            if pkey.startswith(path + ".") and pkey != key:
                rows = delta.double().reshape(delta.shape[0], -1).pow(2).sum(dim=1)
                squares.index_add_(0, ids.long(), rows)
        out[int(m.group(1))] = squares.sqrt().tolist()
    return dict(sorted(out.items()))
