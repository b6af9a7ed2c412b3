"""Per-step metrics: JSONL file, TensorBoard and (optionally) Weights & Biases.

Owns: :class:`MetricsLogger` (rank 0 writes; other ranks hold a no-op logger), flattening
nested metric dicts to ``section/name`` keys, and :class:`PhaseTimer` for time per phase.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


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
                 enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(log_dir)
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            self._jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
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


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
