"""Every shipped DeepSpeed config documents itself, completes for every family, and parses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from emmoe_dist.config import TrainConfig
from emmoe_dist.errors import InputError
from emmoe_dist.families import FAMILIES
from emmoe_dist.parallel.ds_config import complete_ds_config, read_ds_config, zero_stage

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
TRAIN = TrainConfig(micro_batch_size=3, grad_accum=5, max_grad_norm=0.5)


def test_the_documented_configs_ship() -> None:
    names = {p.name for p in CONFIGS}
    assert {"zero3.json", "zero2_qlora.json", "zero3_multinode.json", "zero3_ep.json"} <= names


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if p.name != "zero3_ep.json"], ids=lambda p: p.name
)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_completes_and_deepspeed_accepts_it(path: Path, family: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = read_ds_config(path)
    assert raw["_launch"].strip() and raw["_tested_on"].strip()
    cfg = complete_ds_config(raw, file=str(path), train=TRAIN, family=FAMILIES[family], bf16=False)
    assert not [k for k in cfg if k.startswith("_")]
    parsed = DeepSpeedConfig(cfg)
    assert parsed.train_micro_batch_size_per_gpu == 3
    assert parsed.gradient_accumulation_steps == 5
    assert parsed.gradient_clipping == 0.5
    if zero_stage(cfg) == 3:
        # the family's MoE block is fetched whole (GPT-oss's GptOssMLP is not a DeepSpeed default)
        assert FAMILIES[family].block_class in parsed.zero_config.leaf_module.classes


def test_undocumented_or_broken_config_is_rejected(tmp_path: Path) -> None:
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(InputError, match="_launch"):
        read_ds_config(bare)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "_launch": "x",\n  "stage": 3,,\n}')
    with pytest.raises(InputError) as err:
        read_ds_config(broken)
    assert err.value.line == 3


def test_qlora_with_zero3_is_refused_before_loading(tmp_path: Path) -> None:
    import torch

    from emmoe_dist.config import load_config
    from emmoe_dist.parallel.runtime import Runtime
    from emmoe_dist.train.trainer import run_training

    cfg = load_config(None, ["adapter.quantize=nf4", f"output_dir={tmp_path}"])
    with pytest.raises(InputError) as err:
        run_training(cfg, REPO / "ds_configs" / "zero3.json", Runtime(0, 1, 0, torch.device("cpu")))
    assert err.value.field == "zero_optimization.stage" and "zero2_qlora" in str(err.value)
