"""Helper processes that cannot outlive their parent.

Owns :func:`die_with_parent`, which every helper process we start calls (spawned ranks, the data-prep
workers, the checkpoint writer): a SIGKILL of the parent cannot run cleanup code, so the kernel must
end the children. Free of megatron-core and torch: the data-prep workers import it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int, group: bool = False) -> None:
    """Ask the kernel to end this process when its parent (``parent_pid``) exits (Linux).

    Called first thing in a child; the kernel sends SIGKILL. If the parent is already gone (it
    died before the call) the child ends itself. With ``group`` the child also leads a new
    process group and takes all of it down: for a child that forks helpers of its own (Megatron's
    checkpoint writer forks one per bucket), which would otherwise be orphaned mid-work, possibly
    waiting forever on a lock the child held. The kernel then sends SIGTERM, whose handler kills
    the group. Elsewhere than Linux this is a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    sig = signal.SIGKILL
    if group:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, _kill_own_group)
        sig = signal.SIGTERM
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def _kill_own_group(_signum: int, _frame: Any) -> None:
    os.killpg(0, signal.SIGKILL)
