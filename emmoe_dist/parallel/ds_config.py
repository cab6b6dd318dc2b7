"""DeepSpeed config files: read, validate and complete them from the experiment config.

Files in `ds_configs/` are plain DeepSpeed JSON plus keys starting with `_` (`_about`,
`_launch`, `_tested_on`) that document them; those are stripped before DeepSpeed sees them.
Values set to "auto" are filled from the experiment's `train:` section, so batch size,
accumulation and clipping live in one place.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from emmoe_dist.config import TrainConfig
from emmoe_dist.errors import InputError
from emmoe_dist.families import MoEFamily

AUTO = "auto"


def read_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError("DeepSpeed config does not exist", file=str(p))
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"invalid JSON: {e.msg}", file=str(p), line=e.lineno) from None
    if not isinstance(raw, dict):
        raise InputError("a DeepSpeed config must be a JSON object", file=str(p), line=1)
    for key in ("_launch", "_tested_on"):
        if key not in raw:
            raise InputError(
                "every shipped config documents how it is launched and where it was tested",
                file=str(p),
                field=key,
            )
    return raw


def _fill(cfg: dict[str, Any], key: str, value: Any) -> None:
    if cfg.get(key, AUTO) == AUTO:
        cfg[key] = value


def complete_ds_config(
    raw: Mapping[str, Any], *, file: str, train: TrainConfig, family: MoEFamily, bf16: bool
) -> dict[str, Any]:
    """The dict handed to `deepspeed.initialize`: documentation keys dropped, autos filled."""
    cfg = {k: copy.deepcopy(v) for k, v in raw.items() if not k.startswith("_")}
    if "expert_parallel" in cfg:
        raise InputError(
            "expert parallelism is not available in this version: this config asks for "
            "`expert_parallel`; use ds_configs/zero3.json (ZeRO-3, experts gathered per layer)",
            file=file,
            field="expert_parallel",
        )
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from the two below and world size
    _fill(cfg, "train_micro_batch_size_per_gpu", train.micro_batch_size)
    _fill(cfg, "gradient_accumulation_steps", train.grad_accum)
    _fill(cfg, "gradient_clipping", train.max_grad_norm)
    bf16_section = cfg.setdefault("bf16", {})
    if bf16_section.get("enabled", AUTO) == AUTO:
        bf16_section["enabled"] = bf16
    # Our optimizer is torch AdamW over the trainable tensors only (LoRA factors or expert
    # deltas); DeepSpeed asks for this flag before it accepts a client optimizer under ZeRO.
    cfg.setdefault("zero_allow_untested_optimizer", True)
    zero = cfg.get("zero_optimization", {})
    if zero.get("stage") == 3:
        # MoE blocks are ZeRO-3 leaves: gathering expert by expert inside a block whose routing
        # differs per rank deadlocks; the block is fetched whole instead.
        leaf = zero.setdefault("leaf_module", {})
        classes = leaf.setdefault("classes", [])
        if family.block_class not in classes:
            classes.append(family.block_class)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise InputError(f"must be a positive integer, got {cfg[key]!r}", file=file, field=key)
    return cfg


def zero_stage(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))
