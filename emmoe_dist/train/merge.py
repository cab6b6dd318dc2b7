"""`emmoe merge`: fold a run's adapter (or expert deltas) into a full model folder.

vLLM on CPU cannot apply LoRA to MoE experts, and some users prefer merged weights. QLoRA
runs merge into a bf16 base loaded fresh, never into the dequantized NF4 weights, which would
bake quantization error into every weight the adapter did not touch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from emmoe_dist import run_folder as rf
from emmoe_dist.config import TINY_PREFIX, ModelConfig
from emmoe_dist.files import replace_dir, write_json_atomic


def merge_run(run_dir: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    from safetensors.torch import load_file

    from emmoe_dist.adapters.expert_delta import DELTA_FILE, merge_expert_delta
    from emmoe_dist.models.loading import load_model

    run, out = Path(run_dir), Path(out)
    manifest = rf.read_manifest(run)
    base = manifest.base_model
    is_tiny_base = (manifest.model_name or base).startswith(TINY_PREFIX)
    # Real checkpoints merge in bf16 (their training dtype); tiny ones stay fp32 for exactness.
    dtype = dtype or ("float32" if is_tiny_base else "bfloat16")
    loaded = load_model(
        ModelConfig(name_or_path=base, family=manifest.family, dtype=dtype),
        for_training=False,
        device="cpu",
    )
    model = loaded.model
    if manifest.artifact == rf.ADAPTER_DIR:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run / rf.ADAPTER_DIR)).merge_and_unload()
    else:
        merge_expert_delta(model, load_file(str(run / rf.DELTA_DIR / DELTA_FILE)))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    shutil.copy2(run / rf.SELECTION, tmp / rf.SELECTION)
    write_json_atomic(
        tmp / "merge_info.json",
        {"run": str(run.resolve()), "base": base, "artifact": manifest.artifact, "dtype": dtype},
    )
    replace_dir(tmp, out)
    return out
