"""`emmoe merge` keeps the base checkpoint's dtype: an fp32 base is not rounded to bf16, so the
router and every untrained expert stay bitwise the base's."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from emmoe_dist.adapters.lora import adapter_state_dict, apply_lora, lora_config, save_peft_adapter
from emmoe_dist.adapters.merge import merge_run
from emmoe_dist.config import AdapterConfig, ModelConfig
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import FAMILIES
from emmoe_dist.models.loading import load_model
from emmoe_dist.models.tiny import save_tiny

QWEN = FAMILIES["qwen3_moe"]


def test_merge_keeps_an_fp32_checkpoint_in_fp32(tmp_path: Path) -> None:
    base = save_tiny(QWEN, tmp_path / "checkpoint", seed=0)  # a checkpoint folder, not tiny:
    loaded = load_model(ModelConfig(name_or_path=str(base)), for_training=False)
    selection = ExpertSelection.single(2, QWEN, loaded.model.config.to_dict())
    spec = AdapterConfig(rank=2, alpha=4, targets="experts")
    model = apply_lora(loaded.model, QWEN, spec, selection)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    run = tmp_path / "run"
    save_peft_adapter(
        adapter_state_dict(model, QWEN), lora_config(QWEN, spec), run / "adapter", str(base)
    )
    selection.save(run / "expert_selection.json")
    manifest = {
        "family": "qwen3_moe",
        "artifact": "adapter",
        "base_model": str(base),
        "config": {"model": {"name_or_path": str(base)}},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))

    merged = merge_run(run, tmp_path / "merged")
    info = json.loads((merged / "merge_info.json").read_text())
    assert info["dtype"] == "float32"
    before = load_model(ModelConfig(name_or_path=str(base)), for_training=False).model
    after = load_model(ModelConfig(name_or_path=str(merged)), for_training=False).model
    old = dict(before.named_parameters())
    changed = []
    for name, p in after.named_parameters():
        assert p.dtype == torch.float32, name
        if not torch.equal(p, old[name]):
            changed.append(name)
    assert changed and all("experts" in n for n in changed)  # routers untouched, bit for bit
    for name in changed:  # and in the fused expert tensors, only the trained expert moved
        moved = [
            e
            for e in range(old[name].shape[0])
            if not torch.equal(after.get_parameter(name)[e], old[name][e])
        ]
        assert moved == [2], (name, moved)
