"""DeepSpeed config files: read, validate and complete them from the experiment config.

Files in `ds_configs/` are plain DeepSpeed JSON plus keys starting with `_` (`_about`,
`_launch`, `_tested_on`) that document them; those are stripped before DeepSpeed sees them.
Values set to "auto" are filled from the experiment's `train:` section, so batch size,
accumulation and clipping live in one place.

`expert_parallel: {"ep_size": N}` asks for this project's expert-parallel layer
(`emmoe_dist.parallel.expert_parallel`). It is taken out before DeepSpeed sees the config:
DeepSpeed reads the same key as the section of its own AutoEP, which swaps MoE layers inside
`deepspeed.initialize`, after the adapters exist, and so loses the expert LoRA.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emmoe_dist.config import TrainConfig
from emmoe_dist.errors import InputError
from emmoe_dist.families import MoEFamily
from emmoe_dist.files import read_json_object

AUTO = "auto"
EXPERT_PARALLEL = "expert_parallel"
# Keys of DeepSpeed's AutoEP section: a config written for AutoEP is refused with a pointer,
# never half-read.
_AUTOEP_KEYS = frozenset({"enabled", "autoep_size", "preset_model", "expert_tensor_parallel_size"})


@dataclass(frozen=True)
class ExpertParallelConfig:
    """The `expert_parallel` section: experts split over groups of `ep_size` ranks.

    `"auto"` is the largest group that divides both the experts of a layer and the ranks of
    a node: every rank of a node holds different experts, and the all-to-all never leaves it.
    """

    ep_size: int | str
    source: str  # the config file, named in every error about this section

    def resolve(self, *, num_experts: int, local_world_size: int) -> int:
        if isinstance(self.ep_size, int):
            return self.ep_size
        return math.gcd(num_experts, max(1, local_world_size))

    def error(self, message: str) -> InputError:
        """An error about `ep_size`, pointing at its line in the config file when found."""
        return InputError(
            message,
            file=self.source,
            line=_key_line(self.source, "ep_size"),
            field=f"{EXPERT_PARALLEL}.ep_size",
        )


def _key_line(file: str, key: str) -> int | None:
    try:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return next((i for i, text in enumerate(lines, 1) if f'"{key}"' in text), None)


def expert_parallel_config(raw: Mapping[str, Any], *, file: str) -> ExpertParallelConfig | None:
    """The validated `expert_parallel` section of a DeepSpeed config, or None without one."""
    section = raw.get(EXPERT_PARALLEL)
    if section is None:
        return None
    line = _key_line(file, EXPERT_PARALLEL)
    if not isinstance(section, dict):
        raise InputError(
            'must be an object such as {"ep_size": 2}', file=file, line=line, field=EXPERT_PARALLEL
        )
    autoep = sorted(_AUTOEP_KEYS & section.keys())
    if autoep:
        raise InputError(
            f"{', '.join(autoep)}: this looks like DeepSpeed AutoEP's section, which this project "
            "does not use (it swaps layers after PEFT and loses the expert LoRA); write "
            '{"ep_size": N} for emmoe-dist\'s expert-parallel layer',
            file=file,
            line=line,
            field=EXPERT_PARALLEL,
        )
    unknown = sorted(section.keys() - {"ep_size"})
    if unknown:
        raise InputError(
            f"unknown key(s) {', '.join(unknown)}; the section takes only ep_size",
            file=file,
            line=line,
            field=EXPERT_PARALLEL,
        )
    size = section.get("ep_size")
    if size != AUTO and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise InputError(
            f'must be a positive integer or "auto", got {size!r}',
            file=file,
            line=_key_line(file, "ep_size") or line,
            field=f"{EXPERT_PARALLEL}.ep_size",
        )
    return ExpertParallelConfig(ep_size=size, source=file)


def read_ds_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError("DeepSpeed config does not exist", file=str(p))
    raw = read_json_object(p, "DeepSpeed config")
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
    expert_parallel_config(raw, file=file)  # validated here, applied by the trainer
    cfg = {
        k: copy.deepcopy(v)
        for k, v in raw.items()
        if not k.startswith("_") and k != EXPERT_PARALLEL
    }
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
