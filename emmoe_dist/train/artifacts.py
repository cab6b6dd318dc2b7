"""What a training run leaves in its output folder, each file written atomically.

<output_dir>/
  manifest.json          config, versions, git revision, data hash, selection, results
  expert_selection.json  which experts trained (ESFT-compatible JSON)
  metrics.jsonl          one line per optimizer step (the loss curve)
  adapter/               standard PEFT adapter (LoRA modes) + expert_selection.json
  expert_delta/          expert deltas (full_experts mode) + expert_selection.json
  base/                  the base model, only for tiny:<family> models (built, not loaded)
  checkpoints/           DeepSpeed checkpoints for resume
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
SELECTION = "expert_selection.json"
ADAPTER_DIR = "adapter"
DELTA_DIR = "expert_delta"
BASE_DIR = "base"
CHECKPOINTS = "checkpoints"

_PACKAGES = (
    "emmoe-dist",
    "torch",
    "transformers",
    "peft",
    "deepspeed",
    "accelerate",
    "bitsandbytes",
)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary folder into place (the old one goes only afterwards)."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    shutil.rmtree(old, ignore_errors=True)


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over exact bytes in name order: equal digests mean bitwise-equal tensors.

    Names only order the tensors, so a wrapped model (PEFT, DeepSpeed) and the plain base,
    whose names differ by a common prefix, give the same digest for the same values."""
    h = hashlib.sha256()
    for _, t in sorted(tensors, key=lambda kv: kv[0]):
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class MetricsLog:
    """Append-only `metrics.jsonl`; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a crash ends the valid prefix
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        tmp.replace(path)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(dict(row)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
