"""Run a stage's command so that it dies with the trial that started it.

    python -m emmoe_dist.sweep.reaper PARENT_PID -- CMD [ARGS...]

The DeepSpeed launcher starts a tree of processes (launcher -> launch.py -> one per rank) and
forwards no signal to it on one host. When Ray kills a trial's worker (a lost node, a stopped
sweep, a fault), that tree would train on, orphaned, writing into the folder the retry resumes
from. The reaper puts CMD in a process group of its own and kills the whole group when the
parent dies (Linux parent-death signal), when it is told to stop, and when CMD exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with(parent: int) -> None:
    """Ask the kernel for SIGTERM when the parent thread ends; if it is already gone, leave."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(143)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--" or not args[0].isdigit():
        print(
            "usage: python -m emmoe_dist.sweep.reaper PARENT_PID -- CMD [ARGS...]", file=sys.stderr
        )
        return 2
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        if child is not None:
            _kill_group(child.pid)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)  # before the child exists: no window without a handler
    signal.signal(signal.SIGINT, stop)
    _die_with(int(args[0]))
    child = subprocess.Popen(args[2:], start_new_session=True)
    code = child.wait()
    _kill_group(child.pid)  # ranks the launcher left behind
    return code if code >= 0 else 128 - code  # killed by signal N: exit 128 + N, as a shell does


if __name__ == "__main__":
    sys.exit(main())
