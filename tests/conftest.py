"""Test-wide setup: the data directory and offline hub access.

Tests read the EM datasets from the shared data folder beside the checkout (never committed);
`EMMOE_DATA_DIR` wins when set.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("EMMOE_DATA_DIR", str(_SHARED_DATA))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["EMMOE_DATA_DIR"])
    if not (path / "emergent-misalignment").is_dir():
        pytest.fail(f"the EM data directory is missing: {path} (set EMMOE_DATA_DIR)")
    return path
