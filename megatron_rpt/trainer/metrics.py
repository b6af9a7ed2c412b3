"""Per-step metrics: JSONL file, TensorBoard and (optionally) Weights & Biases.

Owns: :class:`MetricsLogger` (rank 0 writes; other ranks hold a no-op logger), flattening
nested metric dicts to ``section/name`` keys, :class:`PhaseTimer` for time per phase, and
:class:`MemoryReport` (the planner's memory prediction beside the measured peak, every step).

A run that resumes from step N re-does the steps after N, so rows of steps above N (logged
before a crash, after the last checkpoint) are dropped from ``metrics.jsonl`` and purged from
TensorBoard when the logger opens: every step appears once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from megatron_rpt.atomic import write_text_atomic
from megatron_rpt.memory_plan import Hardware, Layout, Workload, estimate_memory

log = logging.getLogger(__name__)


class PhaseTimer:
    """Accumulates wall time per named phase: ``with timer("rollout"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, log_dir: str | Path, jsonl: bool = True, tensorboard: bool = True,
                 wandb_project: str | None = None, run_name: str | None = None, config: dict | None = None,
                 enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.dir = Path(log_dir)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            drop_rows_after(self.dir / "metrics.jsonl", start_step)
            self._jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: optional (tensorboard), only when enabled

            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1)
        if wandb_project:
            try:
                import wandb  # lazy: optional dependency
            except ImportError as exc:
                raise ImportError("logging.wandb_project is set but wandb is not installed: pip install wandb") from exc
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, dir=str(self.dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        if self._jsonl:
            self._jsonl.write(json.dumps(row) + "\n")
        if self._tb:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


def drop_rows_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (atomically) without rows of steps above ``step`` or torn by a kill, saying so."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if (s := _row_step(line)) is not None and s <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))
        log.warning("%s: dropped %d row(s) of steps after %d, where this run starts (they are re-done)",
                    path, len(lines) - len(kept), step)


def _row_step(line: str) -> float | None:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MemoryReport:
    """The planner's per-device prediction for this run's layout, logged beside the measured peak.

    ``memory/planned_train_gib`` is what the planner says PyTorch allocates for training (weights,
    gradients, optimizer state, activations of the worst pipeline stage); ``memory/planned_peak_gib``
    adds the rollout engine's reservation, the weight-sync bucket and the overhead
    (:func:`megatron_rpt.memory_plan.estimate_memory`). ``memory/measured_peak_gib`` is
    ``torch.cuda.max_memory_allocated`` on a GPU, and on CPU the process's peak RSS (which also
    holds Python, the libraries and the rollout engine, so it sits above the planned training part).
    """

    def __init__(self, cfg: Any, arch: Any, world_size: int) -> None:
        on_gpu = torch.cuda.is_available()
        device_gib = (torch.cuda.get_device_properties(0).total_memory if on_gpu
                      else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) / 2**30
        est = estimate_memory(arch, Workload.from_config(cfg, flash_attention=on_gpu),
                              Layout.from_config(cfg, world_size), Hardware(gpus=world_size, gpu_mem_gib=device_gib))
        self.source = "torch.cuda.max_memory_allocated" if on_gpu else "peak RSS of the process"
        self.planned = {"memory/planned_train_gib": (est.weights + est.grads + est.optimizer + est.activations) / 2**30,
                        "memory/planned_peak_gib": est.peak / 2**30}

    def metrics(self) -> dict[str, float]:
        if torch.cuda.is_available():
            measured = torch.cuda.max_memory_allocated()
        else:
            measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return {**self.planned, "memory/measured_peak_gib": measured / 2**30}
