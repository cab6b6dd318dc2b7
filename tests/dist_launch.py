"""Start a 2-rank CPU DeepSpeed job through the DeepSpeed launcher, as users launch training.

The distributed test modules each run one such job (start-up is paid once) and then read what
it left on disk.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_two_ranks(driver: str, spec: Any, out: Path, **env: str) -> None:
    """Run `tests/<driver>` on 2 gloo ranks with `spec` (written to out/spec.json); the
    combined output goes to out/driver.log and a failure shows its tail."""
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    full_env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        **env,
    }
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / driver),
        str(spec_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=900)
    (out / "driver.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
