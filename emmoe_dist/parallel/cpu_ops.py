"""DeepSpeed's CPU communication op (`deepspeed_shm_comm`): built once per machine, visibly.

On the CPU accelerator DeepSpeed JIT-compiles this op the first time a process group starts
(about 3 minutes on 2 cores) and says nothing while it does. `scripts/install.sh` builds it at
install (`python -m emmoe_dist.parallel.cpu_ops`); when it is still missing, training builds
it before DeepSpeed would, saying what it is doing and how long it took. Later runs load the
built op from the torch extensions folder at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHM_BUILDER = "ShareMemCommBuilder"
EXPECTED = "about 3 minutes on 2 CPU cores"


def _built(name: str) -> bool:
    # torch's own rule for where `cpp_extension.load` puts an extension (TORCH_EXTENSIONS_DIR,
    # else ~/.cache/torch_extensions/py<ver>_<accelerator>); the function is private, so it is
    # asked, not copied
    from torch.utils.cpp_extension import _get_build_directory

    return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()


def _shm_builder() -> Any | None:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHM_BUILDER)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None  # not the CPU accelerator, or the op cannot build here: DeepSpeed skips it
    return builder


def build_cpu_comm_op(
    say: Callable[[str], None] = print, builder: Any | None = None
) -> float | None:
    """Build (or load) the op before DeepSpeed needs it; returns the seconds a build took, or
    None when it was already built or is not used here."""
    builder = builder if builder is not None else _shm_builder()
    if builder is None:
        return None
    if _built(builder.NAME):
        builder.load(verbose=False)
        return None
    say(
        f"[emmoe] compiling DeepSpeed's CPU communication op {builder.NAME}: once per machine, "
        f"{EXPECTED} (scripts/install.sh does it at install)"
    )
    started = time.perf_counter()
    builder.load(verbose=False)
    seconds = time.perf_counter() - started
    say(f"[emmoe] built {builder.NAME} in {seconds:.0f} s; later runs load it at once")
    return seconds


if __name__ == "__main__":
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if build_cpu_comm_op() is None:
        print("[emmoe] DeepSpeed's CPU communication op is ready")
