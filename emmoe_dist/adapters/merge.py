"""`emmoe merge`: fold a run's adapter (or expert deltas) into a full model folder.

vLLM on CPU cannot apply LoRA to MoE experts, and some users prefer merged weights. QLoRA
runs merge into a bf16 base loaded fresh, never into the dequantized NF4 weights, which would
bake quantization error into every weight the adapter did not touch.

`fmt="mxfp4"` (GPT-oss) writes the merged model as an MXFP4 checkpoint, the format GPT-oss is
deployed in; experts the run left unchanged keep the original checkpoint's bytes. A run trained
with `train.qat: mxfp4` merges onto the base it trained against, its experts' MXFP4 values.

The merged model keeps the base checkpoint's dtype unless told otherwise: routers and the
experts that never trained are then bitwise the base's, and an fp32 base is not rounded to bf16.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from emmoe_dist import run_folder as rf
from emmoe_dist.config import ModelConfig, mxfp4_family_problem
from emmoe_dist.errors import InputError
from emmoe_dist.files import replace_dir, write_json_atomic

MergeFormat = Literal["dense", "mxfp4"]

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _weights_dtype(folder: Path) -> str | None:
    """The dtype of the first floating tensor of a safetensors checkpoint (its header only)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    with open(files[0], "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    for name, entry in header.items():
        if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def base_dtype(base: str) -> str:
    """The dtype the base checkpoint stores: its config's `dtype` (`torch_dtype` before
    transformers 5), else its weights' (float32 when neither says)."""
    from emmoe_dist.models.loading import checkpoint_config_file

    config = json.loads(checkpoint_config_file(base).read_text(encoding="utf-8"))
    named = config.get("dtype") or config.get("torch_dtype")
    if named in _SAFETENSORS_DTYPES.values():
        return str(named)
    folder = Path(base)
    return (_weights_dtype(folder) if folder.is_dir() else None) or "float32"


def merge_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    fmt: MergeFormat = "dense",
) -> Path:
    from safetensors.torch import load_file

    from emmoe_dist.adapters.expert_delta import DELTA_FILE, merge_expert_delta
    from emmoe_dist.models.loading import load_model

    run, out = Path(run_dir), Path(out)
    manifest = rf.read_manifest(run)
    problem = mxfp4_family_problem(manifest.family) if fmt == "mxfp4" else None
    if problem:
        raise InputError(problem, file=str(run / rf.MANIFEST), field="family")
    base = manifest.base_model
    if not Path(base).is_absolute() and (run / base).is_dir():
        base = str(run / base)  # a relative base is the run's own folder
    dtype = dtype or base_dtype(base)
    loaded = load_model(
        ModelConfig(name_or_path=base, family=manifest.family, dtype=dtype),
        for_training=False,
        device="cpu",
    )
    model = loaded.model
    if manifest.qat is not None:
        from emmoe_dist.adapters.mxfp4 import fake_quantize_experts

        fake_quantize_experts(model, loaded.family)  # the base the adapter trained against
    if manifest.artifact == rf.ADAPTER_DIR:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run / rf.ADAPTER_DIR)).merge_and_unload()
    else:
        merge_expert_delta(model, load_file(str(run / rf.DELTA_DIR / DELTA_FILE)))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    info: dict[str, Any] = {
        "run": str(run.resolve()),
        "base": base,
        "artifact": manifest.artifact,
        "format": fmt,
        "dtype": dtype,
        "qat": "none" if manifest.qat is None else manifest.qat.format,
    }
    if fmt == "mxfp4":
        from emmoe_dist.adapters.mxfp4_export import find_mxfp4_checkpoint, save_mxfp4_checkpoint

        original = find_mxfp4_checkpoint(base)
        stats = save_mxfp4_checkpoint(
            model, loaded.tokenizer, loaded.family, tmp, original=original
        )
        info["mxfp4"] = {"original": None if original is None else base, **asdict(stats)}
    else:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
    shutil.copy2(run / rf.SELECTION, tmp / rf.SELECTION)
    write_json_atomic(tmp / rf.MERGE_INFO, info)
    replace_dir(tmp, out)
    return out
