"""Export a fused-expert PEFT adapter in vLLM's per-expert ("2D") MoE LoRA layout.

A PEFT adapter on fused experts (`target_parameters`) holds, per MoE layer, one `lora_A`
`[r·E, in]` (expert e owns rows e·r..(e+1)·r) and one `lora_B` `[out, r·E]` (expert e owns
columns k·E+e) for `gate_up_proj` (behind one `base_layer.`) and for `down_proj`. vLLM reads
that directly only with `enable_mixed_moe_lora_format` + `is_3d_lora_weight`; its default
layout for models whose checkpoints store experts one by one (Qwen3-MoE, Mixtral, OLMoE) is
one LoRA pair per expert projection, named as in the checkpoint:

    <prefix>layers.<L>.<block>.experts.<e>.<gate>.lora_A.weight   [r, hidden]
    <prefix>layers.<L>.<block>.experts.<e>.<gate>.lora_B.weight   [intermediate, r]
    ...<up>... the same shapes; ...<down>.lora_A [r, intermediate], lora_B [hidden, r]

The gate and up halves share the fused pair's A (the fused LoRA has one rank-r code for
both); B is split along its output rows (interleaved for layouts that interleave gate/up).
Checkpoint names come from transformers' own conversion mapping for the model type
(`gate_proj/up_proj/down_proj` under `mlp`, or Mixtral's `w1/w3/w2` under
`block_sparse_moe`); families whose checkpoints keep fused experts (GPT-oss) need no export.
Attention LoRA tensors are copied unchanged; scaling (`lora_alpha / r`) is kept.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.families import MoEFamily

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<path>.+?)\."
    r"(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight$"
)
_PER_EXPERT_SOURCE = re.compile(r"experts\.\*\.(?P<name>\w+)\.weight$")


@dataclass(frozen=True, kw_only=True)
class CheckpointExpertNames:
    """How a checkpoint names one expert's projections, and the MoE block that holds them."""

    block: str  # "mlp", or Mixtral's "block_sparse_moe"
    gate: str
    up: str
    down: str


def checkpoint_expert_names(family: MoEFamily) -> CheckpointExpertNames:
    """Per-expert checkpoint names, read from transformers' conversion mapping (the rules it
    uses to fuse experts at load time and split them again on save)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    rules = get_checkpoint_conversion_mapping(family.model_type) or []
    block = family.moe_block
    names: dict[str, list[str]] = {}
    for rule in rules:
        sources = list(getattr(rule, "source_patterns", []))
        targets = list(getattr(rule, "target_patterns", []))
        if type(rule).__name__ == "WeightRenaming":
            for src, dst in zip(sources, targets, strict=False):
                if dst.strip(".") == family.moe_block:
                    block = src.strip(".")
            continue
        for fused in (family.layout.gate_up, family.layout.down):
            if any(t.endswith(f"experts.{fused}") for t in targets):
                found = [m.group("name") for s in sources if (m := _PER_EXPERT_SOURCE.search(s))]
                names[fused] = found
    gate_up, down = names.get(family.layout.gate_up, []), names.get(family.layout.down, [])
    if len(gate_up) != 2 or len(down) != 1:
        raise EmmoeError(
            f"{family.name} checkpoints keep fused experts (no per-expert names in transformers' "
            "conversion mapping): vLLM loads its PEFT adapter as it is, with "
            "is_3d_lora_weight=True"
        )
    return CheckpointExpertNames(block=block, gate=gate_up[0], up=gate_up[1], down=down[0])


def per_expert_state(
    state: Mapping[str, torch.Tensor],
    family: MoEFamily,
    num_experts: int,
    names: CheckpointExpertNames,
) -> dict[str, torch.Tensor]:
    """The adapter's tensors in the per-expert layout (module docstring)."""
    targets = [p.rsplit(".", 1)[-1] for p in family.expert_param_paths()]
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _EXPERT_KEY.match(key)
        if m is None or m.group("path") != family.experts_path:
            out[key] = tensor
            continue
        # PEFT nests one wrapper per target parameter, the first listed innermost.
        depth = m.group("nest").count("base_layer.")
        param = targets[len(targets) - 1 - depth]
        slot = (m.group("prefix"), int(m.group("layer")), param)
        fused.setdefault(slot, {})[m.group("ab")] = tensor
    for (prefix, layer, param), ab in sorted(fused.items()):
        if set(ab) != {"A", "B"}:
            raise EmmoeError(f"layer {layer} {param}: the adapter lacks lora_A or lora_B")
        a_all = ab["A"].reshape(num_experts, -1, ab["A"].shape[-1])
        b_all = ab["B"].reshape(ab["B"].shape[0], -1, num_experts)
        base = f"{prefix}layers.{layer}.{names.block}.experts"
        for e in range(num_experts):
            a, b = a_all[e].contiguous(), b_all[:, :, e].contiguous()
            pieces: tuple[tuple[str, torch.Tensor, torch.Tensor], ...]
            if param == family.layout.gate_up:
                if family.layout.interleaved_gate_up:
                    gate_b, up_b = b[0::2], b[1::2]
                else:
                    gate_b, up_b = b.chunk(2, dim=0)
                pieces = ((names.gate, a, gate_b), (names.up, a.clone(), up_b))
            else:
                pieces = ((names.down, a, b),)
            for name, pa, pb in pieces:
                out[f"{base}.{e}.{name}.lora_A.weight"] = pa
                out[f"{base}.{e}.{name}.lora_B.weight"] = pb.contiguous()
    return out


def _exported_config(config: dict[str, Any], names: CheckpointExpertNames) -> dict[str, Any]:
    projections = [names.gate, names.up, names.down]
    modules = config.get("target_modules") or []
    if isinstance(modules, str):  # a regex over module names: add the expert projections
        alternatives = "|".join(map(re.escape, projections))
        target: Any = rf"(?:{modules})|(?:.*\.experts\.\d+\.(?:{alternatives}))"
    else:
        target = sorted({*modules, *projections})
    return {**config, "target_modules": target, "target_parameters": None}


def export_per_expert_lora(
    adapter_dir: str | Path,
    out_dir: str | Path,
    family: MoEFamily,
    num_experts: int,
) -> Path:
    """Write `adapter_dir` (a fused-expert PEFT adapter) to `out_dir` in the per-expert layout;
    the folder appears complete or not at all."""
    from safetensors.torch import load_file, save_file

    src, out = Path(adapter_dir), Path(out_dir)
    config_path = src / ADAPTER_CONFIG
    if not config_path.is_file() or not (src / ADAPTER_WEIGHTS).is_file():
        raise EmmoeError(
            f"{src} is not a PEFT adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", file=str(config_path), line=e.lineno) from None
    if not config.get("target_parameters"):
        raise EmmoeError(f"{config_path}: no target_parameters: the adapter has no fused experts")
    names = checkpoint_expert_names(family)
    state = per_expert_state(load_file(str(src / ADAPTER_WEIGHTS)), family, num_experts, names)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(
        json.dumps(_exported_config(config, names), indent=2) + "\n", encoding="utf-8"
    )
    for extra in src.iterdir():  # expert_selection.json, README.md: provenance travels along
        if extra.is_file() and extra.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(extra, tmp / extra.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out
