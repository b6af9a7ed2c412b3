"""One live trainer per run directory.

Owns :class:`DirLock`, an exclusive lock on ``<dir>/.rpt-lock``, and :func:`lock_run_dirs`,
which takes it on ``checkpoint.dir`` and ``logging.dir`` for the whole run. Two trainers on one
directory would delete each other's in-flight checkpoints, resume from each other's and
interleave ``metrics.jsonl``; the second one is refused with the first one's pid and host.

The lock is ``flock(2)`` on the open file: the kernel drops it when the last process holding
that open file exits, kill -9 included, so a lock file left behind by a dead trainer is stale
by construction and is taken over with a log line. (Not a POSIX ``lockf``, which any close of
the file anywhere in the process would silently drop.) Forked children share it, which is
right: a forked checkpoint writer still writing keeps the directory busy, and our children die
with the trainer. Linux emulates flock with byte-range locks on NFS; on a file system without
locks the file alone decides: a holder on this host that is gone is stale; a holder on another
host cannot be checked, and the message says how to clear it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_rpt.config import Config, ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".rpt-lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD: set[Path] = set()  # to tell "this process already holds it" from another holder


def _describe(holder: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {since})"


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode() or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one that is not ours to signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirLock:
    """Exclusive use of ``directory`` by this process (``what`` names it in messages)."""

    def __init__(self, directory: str | os.PathLike, what: str, holder: str = "another trainer runs there"):
        self.dir = Path(directory)
        self.what = what
        self.holder = holder  # who the other process is, in the refusal
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`ConfigError` naming the holder."""
        self.dir.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _HELD:
            raise ConfigError(f"{self.what}={str(self.dir)!r} is already used by this process")
        for _ in range(5):  # the holder may unlink the file between our open and our lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EACCES, errno.EAGAIN, errno.EWOULDBLOCK):
                    raise self._in_use(self._read()) from None
                if exc.errno in _UNSUPPORTED:
                    self._acquire_without_locks()
                    break
                raise
            if self._same_file(fd):
                self._fd = fd
                self._take_over(_parse(os.pread(fd, 1 << 16, 0)))
                break
            os.close(fd)
        else:
            raise ConfigError(f"{self.what}={str(self.dir)!r}: could not lock {self.path} (it keeps changing)")
        _HELD.add(key)
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the lock file (while still holding it) and drop the lock; idempotent."""
        key = self.path.resolve()
        if key not in _HELD:
            return
        _HELD.discard(key)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- helpers
    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _read(self) -> dict[str, Any]:
        try:
            return _parse(self.path.read_bytes())
        except OSError:
            return {}

    def _record(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})

    def _in_use(self, holder: dict[str, Any]) -> ConfigError:
        pid = int(holder.get("pid", -1))
        if holder.get("host") == socket.gethostname() and pid > 0 and not pid_alive(pid):
            return ConfigError(f"{self.what}={str(self.dir)!r} is locked by a leftover child process of pid {pid} "
                               f"(which is gone) on this host; stop it (fuser -v {self.path} names it) and retry")
        return ConfigError(f"{self.what}={str(self.dir)!r} is in use by {_describe(holder)}: {self.holder}; "
                           "wait for it to finish or stop it, or give this run another directory")

    def _take_over(self, previous: dict[str, Any]) -> None:
        if previous:
            log.warning("%s: the lock of %s is stale (that process is gone); taking it over", self.path,
                        _describe(previous))
        os.ftruncate(self._fd, 0)  # type: ignore[arg-type]
        os.pwrite(self._fd, self._record().encode(), 0)  # type: ignore[arg-type]

    def _acquire_without_locks(self) -> None:
        """The lock file alone, created exclusively (file systems without POSIX locks)."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                holder = self._read()
                same_host = holder.get("host") == socket.gethostname()
                if holder and same_host and not pid_alive(int(holder.get("pid", -1))):
                    log.warning("%s: the lock of %s is stale (that process is gone); taking it over", self.path,
                                _describe(holder))
                    self.path.unlink(missing_ok=True)
                    continue
                err = self._in_use(holder)
                if holder and not same_host:
                    err = ConfigError(f"{err} (this file system has no POSIX locks, so a holder on another host "
                                      f"cannot be checked: delete {self.path} if that run is over)")
                raise err from None
            with os.fdopen(fd, "w") as f:
                f.write(self._record())
            return
        raise ConfigError(f"{self.what}={str(self.dir)!r}: could not create {self.path}")


def lock_run_dirs(cfg: Config) -> list[DirLock]:
    """Collective: rank 0 locks ``checkpoint.dir`` and ``logging.dir``; every rank raises if it could not."""
    locks: list[DirLock] = []
    error = ""
    if not dist.is_initialized() or dist.get_rank() == 0:
        wanted = [("checkpoint.dir", cfg.checkpoint.dir), ("logging.dir", cfg.logging.dir)]
        seen: set[Path] = set()
        try:
            for what, directory in wanted:
                if directory and Path(directory).resolve() not in seen:
                    seen.add(Path(directory).resolve())
                    lock = DirLock(directory, what)
                    lock.acquire()
                    locks.append(lock)
        except ConfigError as exc:
            for lock in locks:
                lock.release()
            error = str(exc)
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ConfigError(error)
    return locks
