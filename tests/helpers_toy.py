"""Running the toy trainer as a user does (``python -m megatron_rpt.trainer``), for fault-injection tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def toy_env(toy: Path) -> dict[str, str]:
    env = dict(os.environ, RPT_TOY_DIR=str(toy), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def trainer_args(run: Path, *sets: str, resume: str = "auto") -> list[str]:
    """``-m megatron_rpt.trainer`` on the toy config, logging into ``run``; ``sets`` are ``--set`` overrides
    (a later one wins)."""
    args = ["-m", "megatron_rpt.trainer", "--config", "configs/toy_learn.yaml", "--resume", resume]
    for s in [f"logging.dir={run}", "logging.progress_bar=false", *sets]:
        args += ["--set", s]
    return args


def train_args(run: Path, ckpt: Path | None, *sets: str, resume: str = "auto") -> list[str]:
    """:func:`trainer_args` without evaluation or TensorBoard, checkpointing into ``ckpt`` (None: nowhere)."""
    return trainer_args(run, "logging.tensorboard=false", "train.eval_interval=0",
                        f"checkpoint.dir={ckpt if ckpt is not None else 'null'}", *sets, resume=resume)


def run_trainer(toy: Path, args: list[str], nproc: int = 1, expect: int = 0,
                timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the trainer (``args`` from :func:`trainer_args`) in one process or under torchrun; assert its exit
    code is ``expect``."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=toy_env(toy), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\n" + proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def train(toy: Path, run: Path, ckpt: Path | None, *sets: str, resume: str = "auto", nproc: int = 1,
          expect: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    """The toy trainer as :func:`train_args` sets it up; assert its exit code is ``expect``."""
    return run_trainer(toy, train_args(run, ckpt, *sets, resume=resume), nproc, expect, timeout)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a user error leaves (the last line of stderr); no traceback before it."""
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-4000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, proc.stderr[-4000:]
    return lines[-1]


def listing(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size: to show that a refused run changed nothing."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
