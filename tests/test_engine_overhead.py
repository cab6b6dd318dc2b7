"""The LoRA plan's DeepSpeed engine adds little host work per step over a plain optimizer loop.

A LoRA step on a GPU is bound by the host launching kernels, so what the engine dispatches per
trainable tensor (gradient buckets, overflow scans) shows up as GPU idle time. This counts the
ATen operators of each phase with `benchmarks/engine_overhead.py` (bf16, CPU) for the shipped
plan and for the same plan with DeepSpeed's defaults restored, which must exceed the bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "ds_configs" / "zero2_ep.json"
# operators the engine may add per trainable tensor and step (about 8 today): the gradient
# norm (a cast and a norm), the reduction hook's bookkeeping, the copy into the fp32 partition
PER_TENSOR = 10


def test_the_lora_plan_dispatches_a_few_operators_per_trainable_tensor(tmp_path: Path) -> None:
    defaults = json.loads(PLAN.read_text())
    defaults["bf16"] = {"enabled": "auto"}  # check_grad_overflow back on
    defaults["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
    defaults_path = tmp_path / "zero2_defaults.json"
    defaults_path.write_text(json.dumps(defaults))
    out = tmp_path / "overhead.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "engine_overhead.py"),
            "--layers", "2", "--steps", "3", "--warmup", "1", "--bf16",
            "--ds", str(PLAN), str(defaults_path),
            "--out", str(out),
        ],
        check=True,
        cwd=REPO,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=600,
    )  # fmt: skip
    result = json.loads(out.read_text())
    tensors = result["trainable_tensors"]
    assert tensors == 2 * 12  # 2 layers x (q, k, v, o) x (A, B) + (gate_up, down) x (A, B)
    ops = {name: sum(arm["aten_ops"].values()) for name, arm in result["arms"].items()}
    plan, with_defaults = ops["zero2_ep"] - ops["plain"], ops["zero2_defaults"] - ops["plain"]
    assert 0 < plan <= PER_TENSOR * tensors, ops
    assert with_defaults > 2 * PER_TENSOR * tensors, ops  # what the shipped settings remove
    # the forward is the model's own: the engine adds nothing there
    arms = result["arms"]
    assert arms["zero2_ep"]["aten_ops"]["forward"] <= arms["plain"]["aten_ops"]["forward"]
