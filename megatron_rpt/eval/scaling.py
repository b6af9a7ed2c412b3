"""Training compute in FLOPs and the paper's compute-scaling fit ``P(C) = A / C^alpha + P*``.

Owns:
  * the FLOP model: training ``6 * N * trained_tokens`` (forward + backward), rollout
    ``2 * N * generated_tokens`` (forward only), with ``N`` from ``ArchConfig.num_parameters()``;
  * :func:`cumulative_compute`: cumulative FLOPs per step from ``metrics.jsonl`` rows;
  * :func:`fit_power_law`: least-squares fit (``scipy.optimize.curve_fit``) with R^2.

Token counts per step are read from the metrics rows, global over all data-parallel ranks:
``compute/trained_tokens`` and ``compute/generated_tokens`` when the trainer logs them. Older runs
only have ``rollout/generated_tokens``, which the trainer averages over ranks: it is multiplied by
the data-parallel size, and the trained tokens then fall back to the generated (response) tokens
times ``rl.updates_per_batch`` -- prompt tokens are not counted in that case (:class:`ComputeModel`
says which source it used).

The fit works on ``x = C / C0`` (``C0`` = the smallest compute) so the optimiser sees numbers near
1 instead of 1e20; ``A`` is reported in the original units, ``A = A0 * C0^alpha``. Accuracy that
grows with compute has ``A < 0`` and ``P*`` is the asymptote it approaches from below.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_rpt.atomic import write_text_atomic

__all__ = [
    "RUN_MODEL_FILE",
    "write_run_model",
    "read_run_model",
    "training_flops",
    "rollout_flops",
    "ComputeModel",
    "cumulative_compute",
    "PowerLawFit",
    "fit_power_law",
    "power_law",
]


# Written by the trainer into logging.dir: which model the run trained (an auto:... spec resolved),
# so that the compute axis of a finished run does not depend on what the cache holds today.
RUN_MODEL_FILE = "model.json"


def write_run_model(run_dir: str | Path, num_parameters: int, hf_dir: str | None, spec: str | None) -> Path:
    path = Path(run_dir) / RUN_MODEL_FILE
    write_text_atomic(path, json.dumps({"num_parameters": int(num_parameters), "hf_dir": hf_dir, "spec": spec},
                                       indent=2) + "\n")
    return path


def read_run_model(run_dir: str | Path) -> dict[str, Any] | None:
    """The trainer's record of the run's model, or None for runs written before it existed."""
    path = Path(run_dir) / RUN_MODEL_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it and pass --num-params N") from None
    return info if isinstance(info, dict) and isinstance(info.get("num_parameters"), int) else None


def training_flops(num_params: int, tokens: float) -> float:
    """Forward + backward of a dense transformer: 6 FLOPs per parameter per token."""
    return 6.0 * float(num_params) * float(tokens)


def rollout_flops(num_params: int, tokens: float) -> float:
    """Generation is forward only: 2 FLOPs per parameter per generated token."""
    return 2.0 * float(num_params) * float(tokens)


def _number(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class ComputeModel:
    """How one metrics row turns into FLOPs."""

    num_params: int
    data_parallel: int = 1
    updates_per_batch: int = 1
    include_rollout: bool = True

    def __post_init__(self) -> None:
        if self.num_params <= 0:
            raise ValueError(f"num_params={self.num_params} must be > 0 (use ArchConfig.num_parameters())")
        if self.data_parallel < 1 or self.updates_per_batch < 1:
            raise ValueError("data_parallel and updates_per_batch must be >= 1")

    def step_tokens(self, row: dict[str, Any]) -> tuple[float, float, str]:
        """(trained tokens, generated tokens, source) of one step, global over all ranks."""
        generated = _number(row, "compute/generated_tokens")
        trained = _number(row, "compute/trained_tokens")
        if generated is not None and trained is not None:
            return trained, generated, "compute/*"
        per_rank = _number(row, "rollout/generated_tokens")
        if per_rank is None:
            raise KeyError(
                f"metrics row of step {row.get('step')} has neither compute/trained_tokens + "
                "compute/generated_tokens nor rollout/generated_tokens; cannot measure compute"
            )
        generated = per_rank * self.data_parallel if generated is None else generated
        if trained is None:
            trained = generated * self.updates_per_batch
        return trained, generated, "rollout/generated_tokens (prompt tokens not counted)"

    def step_flops(self, row: dict[str, Any]) -> float:
        trained, generated, _ = self.step_tokens(row)
        flops = training_flops(self.num_params, trained)
        if self.include_rollout:
            flops += rollout_flops(self.num_params, generated)
        return flops


def cumulative_compute(rows: Iterable[dict[str, Any]], model: ComputeModel) -> list[tuple[int, float]]:
    """[(step, cumulative FLOPs after that step)] in step order; rows without a step are skipped.

    A step logged twice (a resumed run re-logs steps after its last checkpoint) counts once: the
    last row of that step wins.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        step = row.get("step")
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            by_step[int(step)] = row
    out: list[tuple[int, float]] = []
    total = 0.0
    for step in sorted(by_step):
        try:
            total += model.step_flops(by_step[step])
        except KeyError:
            continue  # e.g. an evaluation-only row: no compute spent in it
        out.append((step, total))
    return out


# ----------------------------------------------------------------------------- the fit


def power_law(c: np.ndarray | float, a: float, alpha: float, p_star: float) -> np.ndarray | float:
    """``P(C) = A / C^alpha + P*``."""
    return a / np.power(c, alpha) + p_star


@dataclass(frozen=True)
class PowerLawFit:
    a: float  # in the original compute units
    alpha: float
    p_star: float
    r2: float
    c0: float  # compute normalisation used by the optimiser
    num_points: int

    def predict(self, compute: np.ndarray | float) -> np.ndarray | float:
        x = np.asarray(compute, dtype=np.float64) / self.c0
        return (self.a / self.c0 ** self.alpha) / np.power(x, self.alpha) + self.p_star

    def label(self) -> str:
        return f"P(C) = {self.a:.3g} / C^{self.alpha:.3f} + {self.p_star:.4f}  (R² = {self.r2:.4f})"

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def r_squared(y: np.ndarray, y_hat: np.ndarray) -> float:
    ss_res = float(np.sum((y - y_hat) ** 2))
    ss_tot = float(np.sum((y - np.mean(y)) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def fit_power_law(compute: Sequence[float], accuracy: Sequence[float]) -> PowerLawFit:
    """Least-squares fit of ``accuracy = A / compute^alpha + P*``; needs >= 4 points with compute > 0."""
    from scipy.optimize import curve_fit  # lazy: slow to import, and only the fit needs it

    c = np.asarray(compute, dtype=np.float64)
    y = np.asarray(accuracy, dtype=np.float64)
    if c.shape != y.shape or c.ndim != 1:
        raise ValueError(f"compute and accuracy must be 1-D lists of one length, got {c.shape} and {y.shape}")
    keep = np.isfinite(c) & np.isfinite(y) & (c > 0)
    c, y = c[keep], y[keep]
    if len(c) < 4:
        raise ValueError(f"the fit has 3 parameters and needs at least 4 points with compute > 0; got {len(c)}")
    c0 = float(np.min(c))
    x = c / c0
    # Start from several exponents and keep the best: the problem is not convex in alpha.
    best: tuple[float, np.ndarray] | None = None
    span = float(np.ptp(y)) or 1.0
    rising = y[np.argmax(x)] >= y[np.argmin(x)]
    for alpha0 in (0.05, 0.2, 0.5, 1.0, 2.0):
        p0_star = float(np.max(y) + 0.1 * span) if rising else float(np.min(y) - 0.1 * span)
        a0 = float(y[np.argmin(x)] - p0_star)
        try:
            params, _ = curve_fit(power_law, x, y, p0=(a0, alpha0, p0_star),
                                  bounds=([-np.inf, 1e-6, -np.inf], [np.inf, 20.0, np.inf]), maxfev=20000)
        except (RuntimeError, ValueError):
            continue
        sse = float(np.sum((power_law(x, *params) - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, params)
    if best is None:
        raise RuntimeError("the power-law fit did not converge from any starting point; check the points")
    a0, alpha, p_star = (float(v) for v in best[1])
    r2 = r_squared(y, power_law(x, a0, alpha, p_star))
    return PowerLawFit(a=a0 * c0 ** alpha, alpha=alpha, p_star=p_star, r2=r2, c0=c0, num_points=len(c))
