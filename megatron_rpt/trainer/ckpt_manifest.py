"""Checksums of a training checkpoint: written when it is saved, checked before it is loaded.

Owns the ``files`` manifest in a checkpoint's ``complete.json`` (``{relative path: [size,
sha256]}`` of every file of the checkpoint) and the two collective operations on it:
:func:`collect_manifest` (at save) and :func:`verify_manifest` (before a load). Both split the
files over the ranks (file ``i`` goes to rank ``i % world``), so hashing costs one read of the
checkpoint spread over every rank, not one rank reading all of it.

Why: torch's distributed checkpoint loader reads flipped bytes inside a shard without a word
(the tensors are just different), and truncated or missing shards raise a ``BaseException``.
Verifying first lets the trainer skip a damaged checkpoint *before* any of it is loaded into
the model, so a fallback never trains on a mixture of two checkpoints.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch.distributed as dist

COMPLETE = "complete.json"
_MAX_LISTED = 4


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def file_digest(path: Path) -> list[Any]:
    """``[size, sha256 hex]`` of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return [path.stat().st_size, digest.hexdigest()]


def checkpoint_files(root: Path) -> list[str]:
    """Every file under ``root`` except ``complete.json``, as sorted relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != COMPLETE)


def collect_manifest(root: str | Path) -> dict[str, list[Any]]:
    """Collective: the manifest of the files under ``root`` (the same dict on every rank)."""
    root = Path(root)
    rank, world = _rank_world()
    files = checkpoint_files(root)
    mine = {name: file_digest(root / name) for i, name in enumerate(files) if i % world == rank}
    manifest: dict[str, list[Any]] = {}
    for part in _gather(mine):
        manifest.update(part)
    return dict(sorted(manifest.items()))


def _check(root: Path, name: str, expected: list[Any]) -> str | None:
    path = root / name
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if size != expected[0]:
        return f"{name} has {size} bytes, the manifest {expected[0]}"
    actual = file_digest(path)[1]
    if actual != expected[1]:
        return f"{name} does not match its checksum (sha256 {actual[:12]}... != {expected[1][:12]}...)"
    return None


def verify_manifest(root: str | Path, manifest: dict[str, list[Any]]) -> str | None:
    """Collective: why the files under ``root`` differ from ``manifest`` (None when they match).

    Every rank returns the same answer.
    """
    root = Path(root)
    rank, world = _rank_world()
    mine = [p for i, name in enumerate(sorted(manifest)) if i % world == rank
            if (p := _check(root, name, manifest[name])) is not None]
    problems = sorted(p for part in _gather(mine) for p in part)
    if not problems:
        return None
    more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    return "; ".join(problems[:_MAX_LISTED]) + more
