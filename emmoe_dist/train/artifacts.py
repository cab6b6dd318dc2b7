"""What the trainer needs to write a run folder (`emmoe_dist.run_folder` names its files):
the versions and revision that made it, exact tensor digests, the loss-curve log."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from emmoe_dist.files import iter_jsonl, write_jsonl_atomic

_PACKAGES = (
    "emmoe-dist",
    "torch",
    "transformers",
    "peft",
    "deepspeed",
    "accelerate",
    "bitsandbytes",
)


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
        kept: list[dict[str, Any]] = []
        if resume_step > 0 and path.exists():
            # a line cut by a crash is the last one and is left out
            rows = iter_jsonl(path, tolerate_torn_tail=True)
            kept = [row for row in rows if row.get("step", 0) <= resume_step]
        write_jsonl_atomic(path, kept)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, row: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(dict(row)) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
