"""Layer rules: pure and single-process modules never load distributed or service backends.

Each module is imported in a fresh interpreter, because a module imported earlier in the test
process would hide what the one under test pulls in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("deepspeed", "ray", "vllm", "openai", "wandb")
# Layer 0 must not even load torch.
LAYER0 = ("config", "errors", "families", "catalog", "experts", "metrics", "records")
LAYER1_PACKAGES = ("models", "data", "adapters", "interp")
LAYER1_MODULES = ("routing", "routing_plots")


def _modules() -> list[tuple[str, bool]]:
    pkg = REPO / "emmoe_dist"
    found = [(f"emmoe_dist.{m}", True) for m in LAYER0 if (pkg / f"{m}.py").exists()]
    found += [(f"emmoe_dist.{m}", False) for m in LAYER1_MODULES if (pkg / f"{m}.py").exists()]
    for sub in LAYER1_PACKAGES:
        for f in sorted((pkg / sub).glob("*.py")) if (pkg / sub).is_dir() else []:
            name = f"emmoe_dist.{sub}" if f.stem == "__init__" else f"emmoe_dist.{sub}.{f.stem}"
            found.append((name, False))
    return found


_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
roots = {m.split('.')[0] for m in sys.modules}
print(json.dumps(sorted(roots)))
"""


@pytest.mark.parametrize(("module", "pure"), _modules(), ids=lambda v: str(v))
def test_module_imports_no_heavy_backend(module: str, pure: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert not loaded & set(HEAVY), f"{module} loads {sorted(loaded & set(HEAVY))}"
    if pure:
        assert "torch" not in loaded, f"layer-0 module {module} loads torch"


def test_package_import_is_light() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "emmoe_dist.cli.main"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert "torch" not in loaded, "`emmoe --help` must not import torch"
