"""Loading a checkpoint into ZeRO-3 partitions, in one process (the 2-rank runs that compare
its training with a whole-model load are in test_train_distributed.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import json, sys, torch
from emmoe_dist.adapters.lora import apply_lora
from emmoe_dist.config import AdapterConfig, ModelConfig, TrainConfig
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import FAMILIES
from emmoe_dist.models.loading import load_model
from emmoe_dist.models.tiny import save_tiny
from emmoe_dist.parallel.ds_config import complete_ds_config, read_ds_config
from emmoe_dist.parallel.runtime import init_runtime
from emmoe_dist.parallel.zero_init import partitioned_loading, resident_elements
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

init_runtime()
family = FAMILIES["qwen3_moe"]
folder = save_tiny(family, sys.argv[1], seed=0)
ds = complete_ds_config(
    read_ds_config("ds_configs/zero3.json"), file="zero3.json", train=TrainConfig(),
    family=family, bf16=True,
)
with partitioned_loading(ds):
    model = load_model(ModelConfig(name_or_path=str(folder), dtype="bfloat16")).model
after = is_deepspeed_zero3_enabled()
partitioned = all(hasattr(p, "ds_tensor") for p in model.parameters())
model = apply_lora(
    model, family, AdapterConfig(targets="attention+experts"),
    ExpertSelection.all(family, model.config.to_dict()),
)
dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
print(json.dumps({"partitioned": partitioned, "zero3_after": after, "trainable_dtypes": dtypes,
                  "resident": resident_elements(model)}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_checkpoint_loads_partitioned_and_adapters_take_its_dtype(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path / "tiny")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["partitioned"]  # every parameter was created as a ZeRO-3 partition
    assert not result["zero3_after"]  # transformers' ZeRO-3 switch is off after the block
    # PEFT left attention LoRA in float32 on partitioned weights: DeepSpeed then refused to
    # build its bf16 partitions on the GPU
    assert result["trainable_dtypes"] == ["torch.bfloat16"]
