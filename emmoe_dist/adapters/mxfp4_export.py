"""Write a model as an MXFP4 checkpoint in the hub layout of GPT-oss (what transformers'
`Mxfp4Config` and vLLM load): fused expert weights as `*_blocks` / `*_scales`, everything
else (attention, router, expert biases, embeddings) as it is, and the hub's
`quantization_config` in config.json.

An expert whose weights still equal the original MXFP4 checkpoint's (every expert outside an
expert subset, and every expert of an attention-only adapter) is copied byte for byte from that
checkpoint instead of being encoded again: decoding and re-encoding gives the same values but
not always the same bytes (an encoder may pick a smaller scale with larger codes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emmoe_dist.adapters.mxfp4 import (
    dequantize_expert_tensor,
    expert_weights,
    quantize_expert_tensor,
)
from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import MoEFamily

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_SHARD_BYTES = 4 << 30
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def quantization_config(family: MoEFamily) -> dict[str, Any]:
    """config.json's `quantization_config` of an MXFP4 checkpoint, as the hub's GPT-oss has it:
    only the fused experts are MXFP4."""
    return {
        "modules_to_not_convert": [
            f"{family.layers_path}.*.{family.attention}",
            f"{family.layers_path}.*.{family.router_path}",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }


def is_mxfp4_config(config: dict[str, Any]) -> bool:
    quant = config.get("quantization_config") or {}
    return bool(quant.get("quant_method") == "mxfp4")


class Mxfp4Checkpoint:
    """The `*_blocks` / `*_scales` tensors of an MXFP4 checkpoint folder, read on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / _INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self._files = {k: folder / v for k, v in weight_map.items()}
        elif (folder / _SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / _SINGLE), "pt") as f:
                self._files = {k: folder / _SINGLE for k in f.keys()}  # noqa: SIM118
        else:
            raise EmmoeError(f"{folder}: no {_SINGLE} or {_INDEX}")

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(blocks, scales) of the fused expert weight `key`, or None if it is not MXFP4 here."""
        names = (f"{key}_blocks", f"{key}_scales")
        if not all(n in self._files for n in names):
            return None
        from safetensors import safe_open

        out = []
        for n in names:
            with safe_open(str(self._files[n]), "pt") as f:
                out.append(f.get_tensor(n))
        return out[0], out[1]


def find_mxfp4_checkpoint(name_or_path: str, revision: str | None = None) -> Mxfp4Checkpoint | None:
    """The MXFP4 checkpoint behind a local folder or hub id, or None when it is not one."""
    if name_or_path.startswith("tiny:"):
        return None
    from transformers.utils import cached_file

    config_file = cached_file(name_or_path, "config.json", revision=revision)
    if config_file is None:
        return None
    if not is_mxfp4_config(json.loads(Path(config_file).read_text(encoding="utf-8"))):
        return None
    for name in (_INDEX, _SINGLE):
        found = cached_file(
            name_or_path, name, revision=revision, _raise_exceptions_for_missing_entries=False
        )
        if found is not None:
            if name == _INDEX:  # fetch the shards the index names (a no-op for local folders)
                weight_map = json.loads(Path(found).read_text(encoding="utf-8"))["weight_map"]
                for shard in sorted(set(weight_map.values())):
                    cached_file(name_or_path, shard, revision=revision)
            return Mxfp4Checkpoint(Path(found).parent)
    raise EmmoeError(f"{name_or_path}: an MXFP4 config.json but no {_SINGLE} or {_INDEX}")


@dataclass(frozen=True)
class Mxfp4ExportStats:
    """What the export did with each (layer, weight, expert) slice of the fused experts."""

    experts: int
    copied: int  # unchanged since the original MXFP4 checkpoint: its bytes, copied
    encoded: int  # quantized here (changed by training, or no MXFP4 original)
    # Of the weights of the encoded experts, the share whose MXFP4 value differs from the
    # original checkpoint's; None without an original. A LoRA update smaller than half an
    # MXFP4 step of its block rounds back to the original value.
    changed_fraction: float | None


def _expert_tensors(
    model: nn.Module, family: MoEFamily, original: Mxfp4Checkpoint | None
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, int, int, int]]:
    """(key, blocks, scales, copied, changed weights, weights compared) per fused weight."""
    transposed = family.layout.transposed
    for key, weight in expert_weights(model, family):
        w = weight.detach()
        blocks, scales = quantize_expert_tensor(w, transposed=transposed)
        kept = original.get(key) if original is not None else None
        copied = changed = compared = 0
        if kept is not None:
            old_blocks, old_scales = kept
            if old_blocks.shape != blocks.shape:
                raise EmmoeError(
                    f"{key}: the original checkpoint's MXFP4 blocks have shape "
                    f"{tuple(old_blocks.shape)}, the model's {tuple(blocks.shape)}"
                )
            for e in range(w.shape[0]):
                old = dequantize_expert_tensor(
                    old_blocks[e], old_scales[e], transposed=transposed, dtype=w.dtype
                )
                if torch.equal(old.to(w.device), w[e]):
                    blocks[e], scales[e] = old_blocks[e], old_scales[e]
                    copied += 1
                else:
                    new = dequantize_expert_tensor(
                        blocks[e], scales[e], transposed=transposed, dtype=torch.float32
                    )
                    changed += int((new != old.float()).sum())
                    compared += new.numel()
        yield key, blocks, scales, copied, changed, compared


def _state(
    model: nn.Module, family: MoEFamily, original: Mxfp4Checkpoint | None
) -> Iterator[tuple[str, torch.Tensor] | Mxfp4ExportStats]:
    """The checkpoint's tensors in state-dict order, then the export's statistics."""
    experts = {key for key, _ in expert_weights(model, family)}
    encoded = _expert_tensors(model, family, original)
    total = copied = changed = compared = 0
    for key, tensor in model.state_dict().items():
        if key not in experts:
            yield key, tensor.detach()
            continue
        done_key, blocks, scales, n_copied, n_changed, n_compared = next(encoded)
        if done_key != key:
            raise EmmoeError(f"expert tensors out of order: {done_key} != {key}")
        total += blocks.shape[0]
        copied += n_copied
        changed += n_changed
        compared += n_compared
        yield f"{key}_blocks", blocks
        yield f"{key}_scales", scales
    yield Mxfp4ExportStats(
        experts=total,
        copied=copied,
        encoded=total - copied,
        changed_fraction=changed / compared if compared else None,
    )


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], folder: Path) -> None:
    """safetensors files of at most about `_SHARD_BYTES`, with an index when there are several."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    paths: list[Path] = []

    def flush() -> None:
        path = folder / f".shard-{len(paths):05d}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        paths.append(path)

    names: list[list[str]] = [[]]
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > _SHARD_BYTES:
            flush()
            shards.append({})
            names.append([])
            size = 0
        shards[-1][name] = tensor.to("cpu").contiguous()
        names[-1].append(name)
        size += nbytes
    flush()
    if len(paths) == 1:
        os.replace(paths[0], folder / _SINGLE)
        return
    weight_map = {}
    for i, path in enumerate(paths):
        final = f"model-{i + 1:05d}-of-{len(paths):05d}.safetensors"
        os.replace(path, folder / final)
        weight_map.update(dict.fromkeys(names[i], final))
    (folder / _INDEX).write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2), encoding="utf-8"
    )


def save_mxfp4_checkpoint(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    family: MoEFamily,
    folder: Path,
    *,
    original: Mxfp4Checkpoint | None = None,
) -> Mxfp4ExportStats:
    """Write `model` (adapters already merged) into `folder` as an MXFP4 checkpoint.

    `original` is the MXFP4 checkpoint the model was loaded from: experts that still equal it
    keep its bytes. Expert weights are encoded on the device they live on.
    """
    if not family.mxfp4_checkpoint:
        raise EmmoeError(f"family {family.name!r} has no MXFP4 checkpoint format")
    folder.mkdir(parents=True, exist_ok=True)
    stats: Mxfp4ExportStats | None = None

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal stats
        for item in _state(model, family, original):
            if isinstance(item, Mxfp4ExportStats):
                stats = item
            else:
                yield item

    _write_shards(tensors(), folder)
    config: Any = getattr(model, "config", None)
    if config is None:
        raise EmmoeError("the model has no transformers config to write")
    config.save_pretrained(str(folder))
    path = folder / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["quantization_config"] = quantization_config(family)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    assert stats is not None  # the generator ends with it
    return stats
