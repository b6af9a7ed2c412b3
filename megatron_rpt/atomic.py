"""All-or-nothing writes: files and output directories.

Owns :func:`write_text_atomic` / :func:`write_json_atomic` (temp file + ``os.replace``) and
:func:`atomic_output_dir`: the caller writes into ``<out>.tmp-XXXX`` next to the final path; on
success the directory is renamed to ``<out>`` (one ``rename``, atomic on a POSIX file system),
on any error — including Ctrl-C — it is removed, so nothing half-written is ever left at ``<out>``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from megatron_rpt.errors import UserError


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class OutputExistsError(UserError, FileExistsError):
    """The output path exists (or appeared while this process was writing)."""


def check_output_dir(out: str | Path, force: bool) -> Path:
    """``out`` as a Path, unless it exists (an empty directory does not count) and ``force`` is off."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory; remove it first")
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"output {out} already exists; choose a new path or pass --force to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, prefix: str = "tmp") -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` when the block succeeds.

    Two processes writing the same ``out`` at once: the first to finish wins; the other one
    raises :class:`OutputExistsError` and removes its temporary directory (unless ``force``,
    where the last one replaces the first).
    """
    out = check_output_dir(out, force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.{prefix}-", dir=out.parent))
    try:
        yield tmp
        if force and out.exists() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            old.rmdir()
            out.rename(old)  # move the old one aside first so the swap itself is one rename
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _rename_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_into_place(tmp: Path, out: Path) -> None:
    """One rename; it replaces nothing but an empty directory (POSIX rename semantics)."""
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        raise OutputExistsError(f"output {out} was created by another process while this one was writing it; "
                                "this result was discarded (choose a new path, or pass --force to replace it)"
                                ) from None


@contextlib.contextmanager
def scratch_dir(near: str | Path, prefix: str = "scratch") -> Iterator[Path]:
    """A temporary directory next to ``near`` (same file system), always removed afterwards."""
    near = Path(near).absolute()
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{near.name}.{prefix}-", dir=near.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
