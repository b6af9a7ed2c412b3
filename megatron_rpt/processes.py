"""Helper processes that cannot outlive their parent, and the ports they meet on.

Owns :func:`die_with_parent`, which every helper process we start calls (spawned ranks, the data-prep
workers, the checkpoint writer): a SIGKILL of the parent cannot run cleanup code, so the kernel must
end the children. Owns :func:`free_port`, the port a server we start later (a rendezvous store, a
test cluster's daemons) will listen on. Free of megatron-core and torch: the data-prep workers
import it.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST_CHOSEN_PORT = 10000  # below: well-known and registered services' ports


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for port-0 binds and outgoing connections (Linux's default elsewhere)."""
    try:
        lo, hi = (int(v) for v in open(_EPHEMERAL_RANGE).read().split())
    except (OSError, ValueError):
        return 32768, 60999
    return lo, hi


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now, for a server that some process binds later.

    Why not simply bind port 0 and return what the kernel picked: that port lies in the ephemeral
    range, which every port-0 bind on the machine draws from (gloo's pair sockets, vLLM's, outgoing
    connections), so in the seconds before our server binds it (spawning ranks, importing torch)
    another process could be handed the same port: two test environments running side by side hit
    this as EADDRINUSE. A port below the ephemeral range is never handed out by the kernel, so only
    another explicit chooser can take it first (:func:`megatron_rpt.distributed.spawn` retries then).
    Falls back to a port-0 bind when the range leaves no room below it.
    """
    lo, _ = ephemeral_port_range()
    rng = random.Random(os.urandom(8))
    tries = 100 if lo - 1 > _LOWEST_CHOSEN_PORT else 0
    for _ in range(tries):
        port = rng.randint(_LOWEST_CHOSEN_PORT, lo - 1)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
