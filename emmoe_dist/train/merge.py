"""`emmoe merge`: fold a run's adapter (or expert deltas) into a full model folder.

vLLM on CPU cannot apply LoRA to MoE experts, and some users prefer merged weights. QLoRA
runs merge into a bf16 base loaded fresh, never into the dequantized NF4 weights, which would
bake quantization error into every weight the adapter did not touch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from emmoe_dist.config import ModelConfig
from emmoe_dist.errors import EmmoeError
from emmoe_dist.records import write_json_atomic
from emmoe_dist.train import artifacts as art


def merge_run(run_dir: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    from safetensors.torch import load_file

    from emmoe_dist.adapters.expert_delta import DELTA_FILE, merge_expert_delta
    from emmoe_dist.models.loading import load_model

    run, out = Path(run_dir), Path(out)
    manifest_path = run / art.MANIFEST
    if not manifest_path.is_file():
        raise EmmoeError(f"{run} is not a finished training run (no {art.MANIFEST})")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    base = manifest["base_model"]
    is_tiny_base = manifest["config"]["model"]["name_or_path"].startswith("tiny:")
    # Real checkpoints merge in bf16 (their training dtype); tiny ones stay fp32 for exactness.
    dtype = dtype or ("float32" if is_tiny_base else "bfloat16")
    loaded = load_model(
        ModelConfig(name_or_path=base, family=manifest["family"], dtype=dtype),
        for_training=False,
        device="cpu",
    )
    model = loaded.model
    if manifest["artifact"] == art.ADAPTER_DIR:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run / art.ADAPTER_DIR)).merge_and_unload()
    elif manifest["artifact"] == art.DELTA_DIR:
        merge_expert_delta(model, load_file(str(run / art.DELTA_DIR / DELTA_FILE)))
    else:
        raise EmmoeError(f"{manifest_path}: unknown artifact {manifest['artifact']!r}")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    shutil.copy2(run / art.SELECTION, tmp / art.SELECTION)
    write_json_atomic(
        tmp / "merge_info.json",
        {"run": str(run.resolve()), "base": base, "artifact": manifest["artifact"], "dtype": dtype},
    )
    art.replace_dir(tmp, out)
    return out
