"""The on-disk state of a ``tools/prepare_data.py`` run: which worker this is, what was asked, what is done.

An output directory while it is being written::

    run.json                         what the run is: input files (size + sha256), proxy (config and
                                     weights, sha256), tokenizer, mixture, scoring settings; written
                                     once by the first worker, compared by every (re)started one
    workers/w00000/.rpt-lock         held by the live worker 0 (flock: the kernel drops it on kill -9)
    workers/w00000/progress.jsonl    one line per shard worker 0 finished (file, size, sha256, counts)
    shard-00000.parquet ...          written as .shard-00000.parquet.tmp-PID, then renamed
    manifest.json                    written last, by the merge: its presence means finished

Owns :func:`resolve_worker` (worker id and count from flags, torchrun or a SLURM array),
:func:`fingerprint_files`, :func:`claim_output` (create or match ``run.json``), :func:`lock_worker`,
:func:`append_progress` / :func:`read_progress`. A shard is done when a progress line names it and
its file has the recorded size; anything else (a ``.tmp`` file, a shard renamed just before a kill
but not yet recorded, a torn last line) is work in flight and is redone. Progress of every worker
count is read, so a rerun may use another number of workers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_rpt.atomic import OutputExistsError
from megatron_rpt.config import ConfigError
from megatron_rpt.errors import UserError
from megatron_rpt.trainer.ckpt_manifest import file_digest
from megatron_rpt.trainer.run_lock import DirLock

__all__ = ["RUN_FILE", "resolve_worker", "fingerprint", "fingerprint_files", "claim_output", "lock_worker",
           "append_progress", "read_progress", "progress_path", "RunMismatch", "differences"]

RUN_FILE = "run.json"
RUN_FORMAT = "megatron-rpt-prepare-run"
WORKERS = "workers"


class RunMismatch(UserError):
    """``--out`` holds a run of other inputs or settings: its shards must not be mixed with these."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def resolve_worker(worker_id: int | None = None, num_workers: int | None = None) -> tuple[int, int, str]:
    """``(worker, workers, where from)``: the flags, else torchrun's RANK / WORLD_SIZE, else a SLURM array."""
    if (worker_id is None) != (num_workers is None):
        raise ConfigError("give --worker-id and --num-workers together (or neither: torchrun / a SLURM array "
                          "sets them)")
    if worker_id is not None and num_workers is not None:
        w, n, how = worker_id, num_workers, "flags"
    elif _env_int("WORLD_SIZE") is not None and _env_int("RANK") is not None:
        w, n, how = _env_int("RANK"), _env_int("WORLD_SIZE"), "torchrun"
    elif _env_int("SLURM_ARRAY_TASK_ID") is not None:
        task, lo, hi = (_env_int(k) for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX"))
        step, count = _env_int("SLURM_ARRAY_TASK_STEP") or 1, _env_int("SLURM_ARRAY_TASK_COUNT")
        if lo is None or hi is None or count is None or step != 1 or count != hi - lo + 1:
            raise ConfigError(f"the SLURM array must be one contiguous range such as --array=0-7 (got tasks "
                              f"{lo}-{hi}, step {step}, {count} tasks); each task is one worker")
        w, n, how = task - lo, count, "SLURM array"  # type: ignore[operator]
    else:
        return 0, 1, "single process"
    if n is None or n < 1 or w is None or not 0 <= w < n:
        raise ConfigError(f"worker {w} of {n} workers ({how}): the id must be in [0, {n})")
    return w, n, how


def fingerprint(path: Path) -> dict[str, Any]:
    size, sha = file_digest(path)
    return {"bytes": size, "sha256": sha}


def fingerprint_files(paths: list[str | Path]) -> dict[str, dict[str, Any]]:
    """``{resolved path: {bytes, sha256}}`` of every file under ``paths`` (hidden files skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for raw in paths:
        p = Path(raw).resolve()
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(p).parts))
        for f in files:
            out[str(f)] = fingerprint(f)
    return out


def differences(old: Any, new: Any, key: str = "") -> list[str]:
    """``"key: old there, new here"`` for every leaf where two JSON-like values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in differences(old.get(k), new.get(k), f"{key}.{k}".lstrip("."))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{key}[{i}]")]
    return [] if old == new else [f"{key}: {_short(old)} there, {_short(new)} here"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 90 else text[:87] + "..."


def claim_output(out: Path, identity: Mapping[str, Any]) -> None:
    """Make ``out`` this run's directory: write ``run.json``, or check the one there is this run."""
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a directory; choose a new path")
    if out.is_dir() and any(out.iterdir()) and not run_file.is_file():
        raise OutputExistsError(f"--out {out} is not empty and is not a prepare_data output (no {RUN_FILE}); "
                                "choose a new path or delete it")
    record = {"format": RUN_FORMAT, **identity}
    if not run_file.is_file():
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RUN_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.link(tmp, run_file)  # exclusive: of two first workers, one writes and the other compares
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        there = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunMismatch(f"{run_file} is unreadable ({exc}); this output cannot be resumed: choose a new --out")
    diffs = differences(there, json.loads(json.dumps(record)))
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise RunMismatch(f"--out {out} holds a run with other inputs or settings ({'; '.join(diffs[:3])}{more}); "
                          "its shards cannot be mixed with this run's: rerun with the original inputs, proxy and "
                          "flags to resume it, or choose a new --out")


def worker_dir(out: Path, worker: int) -> Path:
    return out / WORKERS / f"w{worker:05d}"


def progress_path(out: Path, worker: int) -> Path:
    return worker_dir(out, worker) / "progress.jsonl"


def lock_worker(out: Path, worker: int) -> DirLock:
    """One live process per worker id and output: a second one is refused with the first one's pid."""
    lock = DirLock(worker_dir(out, worker), f"--out worker {worker}",
                   holder=f"prepare_data worker {worker} is writing {out}")
    try:
        lock.acquire()
    except ConfigError as exc:
        raise OutputExistsError(str(exc)) from None
    return lock


def append_progress(path: Path, record: Mapping[str, Any]) -> None:
    """One line, flushed to disk: after it the shard counts as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        # A line torn by a kill stays a line of its own, so it cannot swallow this record.
        f.write((b"\n" if torn else b"") + (json.dumps(record, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def read_progress(out: Path) -> dict[int, dict[str, Any]]:
    """``{shard: record}`` of the shards done (recorded, file present with the recorded size)."""
    done: dict[int, dict[str, Any]] = {}
    for path in sorted((out / WORKERS).glob("w*/progress.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                shard, name, size = int(rec["shard"]), rec["file"], int(rec["bytes"])
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a kill: that shard is redone
            f = out / name
            if f.is_file() and f.stat().st_size == size:
                done[shard] = rec
    return done
