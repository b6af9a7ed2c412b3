"""Figures of a run: training curves from ``metrics.jsonl`` and the compute-scaling fit.

Owns: reading ``metrics.jsonl`` (:func:`read_metrics_file`), :func:`plot_training_curves`
(reward, accuracy by difficulty, response length, and the ``val/...`` metrics when present),
:func:`scaling_points` (cumulative training FLOPs per step vs an accuracy metric, per
difficulty bucket), :func:`load_points` (a JSON list given by hand) and
:func:`plot_scaling` (points, fitted ``P(C) = A / C^alpha + P*`` with its parameters and R^2
in the legend). ``tools/plot.py`` is the command line. Matplotlib runs headless (Agg) and
every PNG is written to a temporary name first, then renamed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import yaml

from megatron_rpt.eval.scaling import (  # noqa: E402
    ComputeModel,
    PowerLawFit,
    cumulative_compute,
    fit_power_law,
    read_run_model,
)
from megatron_rpt.model.hf_config import load_hf_config
from megatron_rpt.model.zoo import cached_model_dir  # noqa: E402

__all__ = [
    "read_metrics_file",
    "plot_training_curves",
    "scaling_points",
    "load_points",
    "fit_series",
    "plot_scaling",
    "run_compute_model",
]

BUCKETS = ("easy", "medium", "hard")
_COLORS = {"easy": "tab:green", "medium": "tab:orange", "hard": "tab:red"}


def read_metrics_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (a run dir or the file); a torn last line is ignored."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; pass --run <logging.dir> of a training run "
                                "(it holds metrics.jsonl)")
    lines = p.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):  # the run is still writing (or was killed mid-line)
                continue
            raise ValueError(f"{p}:{i} is not valid JSON ({exc})") from None
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        raise ValueError(f"{p} holds no metric rows yet")
    return rows


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value, step = row.get(key), row.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and isinstance(step, (int, float)):
            xs.append(float(step))
            ys.append(float(value))
    return xs, ys


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return path


def plot_training_curves(rows: Sequence[dict[str, Any]], out_path: str | os.PathLike, title: str = "") -> Path:
    """One PNG with a panel per quantity; panels without data are left out."""
    panels: list[tuple[str, list[tuple[str, str, str | None]]]] = [
        ("Reward (mean)", [("reward/mean", "reward", None)]),
        ("Training accuracy by difficulty", [(f"accuracy/{b}", b, _COLORS[b]) for b in BUCKETS]),
        ("Response length (tokens)", [("response_length/mean", "mean", None), ("response_length/max", "max", None)]),
        ("Validation: standard next-token accuracy", [(f"val/standard_acc_{b}", b, _COLORS[b]) for b in BUCKETS]),
        ("Validation: next-token reasoning Random@1", [(f"val/reasoning_random1_{b}", b, _COLORS[b]) for b in BUCKETS]),
    ]
    present = [(t, [s for s in series if _series(rows, s[0])[0]]) for t, series in panels]
    present = [(t, s) for t, s in present if s]
    if not present:
        raise ValueError("the metrics hold none of reward/mean, accuracy/*, response_length/*, val/*; nothing to plot")
    cols = 2 if len(present) > 1 else 1
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 3.6 * nrows), squeeze=False)
    for ax, (panel_title, series) in zip(axes.flat, present):
        for key, label, color in series:
            xs, ys = _series(rows, key)
            many = len(xs) > 40
            ax.plot(xs, ys, label=label, color=color, linewidth=1.2 if many else 1.5,
                    marker=None if many else "o", markersize=3)
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1 or series[0][1] in BUCKETS:
            ax.legend(fontsize=9)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return _save(fig, Path(out_path))


def run_compute_model(run_dir: str | os.PathLike, num_params: int | None = None,
                      hf_config: str | None = None, data_parallel: int | None = None) -> ComputeModel:
    """The FLOP model of a run: parameters from ``hf_config`` / ``num_params`` or the run's config.yaml."""
    cfg: dict[str, Any] = {}
    cfg_path = Path(run_dir) / "config.yaml"
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    model, parallel, rl = cfg.get("model") or {}, cfg.get("parallel") or {}, cfg.get("rl") or {}
    recorded = read_run_model(run_dir) if num_params is None and hf_config is None else None
    if recorded is not None:  # the trainer's record of the model it trained (auto:... resolved)
        num_params = recorded["num_parameters"]
    if num_params is None:
        source = hf_config or model.get("hf_config") or model.get("hf_checkpoint")
        if source and str(source).startswith("auto:"):
            source = cached_model_dir(str(source), model.get("tokenizer") or None) or source
        if not source or str(source).startswith("auto:") or not Path(source).exists():
            raise ValueError(
                f"cannot count the model's parameters: {Path(run_dir) / 'model.json'} is missing and {cfg_path} "
                f"names no readable model.hf_config{f' ({source})' if source else ''}; pass --hf-config "
                "CONFIG.json or --num-params N")
        num_params = load_hf_config(source).num_parameters()
    if data_parallel is None:
        world = parallel.get("world_size")
        mp = int(parallel.get("tensor_parallel", 1)) * int(parallel.get("pipeline_parallel", 1)) * int(
            parallel.get("context_parallel", 1))
        data_parallel = max(1, int(world) // mp) if world else 1
    return ComputeModel(num_params=int(num_params), data_parallel=int(data_parallel),
                        updates_per_batch=int(rl.get("updates_per_batch", 1) or 1))


# What each accuracy series is, for the plot, the JSON and the console.
METRIC_NAMES = {
    "val/reasoning_random1_{bucket}": "held-out next-token reasoning accuracy (Random@1)",
    "val/reasoning_passk_{bucket}": "held-out next-token reasoning accuracy (Pass@k)",
    "val/standard_acc_{bucket}": "held-out standard next-token accuracy",
    "accuracy/{bucket}": "TRAINING accuracy (the rollouts' reward on the training positions, not held-out)",
}


class NoHeldOutAccuracy(ValueError):
    """The run logged no held-out accuracy, and training accuracy was not asked for."""


def describe_metric(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def default_metric(rows: Sequence[dict[str, Any]]) -> str:
    """The held-out accuracy to fit: next-token reasoning if logged, else standard next-token accuracy.

    Training accuracy is never picked silently (the paper's scaling curves are held-out accuracy):
    fitting it needs ``--metric 'accuracy/{bucket}'``.
    """
    for template in ("val/reasoning_random1_{bucket}", "val/standard_acc_{bucket}"):
        if any(_series(rows, template.format(bucket=b))[0] for b in BUCKETS):
            return template
    raise NoHeldOutAccuracy(
        "the metrics hold no held-out accuracy (val/*): set train.eval_interval (e.g. 100, the paper's "
        "schedule) to log it, or pass --metric 'accuracy/{bucket}' to fit training accuracy instead")


def scaling_points(rows: Sequence[dict[str, Any]], model: ComputeModel,
                   metric: str | None = None) -> dict[str, list[tuple[float, float]]]:
    """{series name: [(cumulative FLOPs at that step, accuracy)]}.

    ``metric`` is a key, or a template with ``{bucket}`` (one series per difficulty bucket).
    """
    metric = metric or default_metric(rows)
    compute = dict(cumulative_compute(rows, model))
    keys = {b: metric.format(bucket=b) for b in BUCKETS} if "{bucket}" in metric else {metric: metric}
    out: dict[str, list[tuple[float, float]]] = {}
    for name, key in keys.items():
        xs, ys = _series(rows, key)
        # A validation row may be logged at a step whose compute row came separately: use the
        # compute of the latest step not after it.
        pts = []
        steps = sorted(compute)
        for step, y in zip(xs, ys):
            before = [s for s in steps if s <= step]
            if before and compute[before[-1]] > 0:
                pts.append((compute[before[-1]], y))
        if pts:
            out[name] = pts
    if not out:
        raise ValueError(f"no (compute, accuracy) points: no step has both token counts and {metric}")
    return out


def load_points(path: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """Points from JSON: ``[{"compute": C, "accuracy": P, "series": "hard"}, ...]`` (series optional),
    ``[[C, P], ...]``, or ``{"series": [[C, P], ...], ...}``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--points {p}: cannot read JSON ({exc})") from None
    out: dict[str, list[tuple[float, float]]] = {}

    def add(series: str, item: Any, where: str) -> None:
        if isinstance(item, dict):
            c, a = item.get("compute"), item.get("accuracy")
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            c, a = item
        else:
            c = a = None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (c, a)):
            raise ValueError(f"--points {p}: {where} is {item!r}; "
                             "expected {\"compute\": C, \"accuracy\": P} or [C, P]")
        out.setdefault(series, []).append((float(c), float(a)))

    if isinstance(data, dict):
        for series, items in data.items():
            if not isinstance(items, list):
                raise ValueError(f"--points {p}: series {series!r} must be a list of points")
            for i, item in enumerate(items):
                add(str(series), item, f"{series}[{i}]")
    elif isinstance(data, list):
        for i, item in enumerate(data):
            series = str(item.get("series", "accuracy")) if isinstance(item, dict) else "accuracy"
            add(series, item, f"item {i}")
    else:
        raise ValueError(f"--points {p}: expected a JSON list or object of points")
    if not out:
        raise ValueError(f"--points {p}: no points")
    return out


def fit_series(points: dict[str, list[tuple[float, float]]]) -> dict[str, PowerLawFit | str]:
    """Fit each series; a series that cannot be fitted maps to the reason (a string)."""
    fits: dict[str, PowerLawFit | str] = {}
    for name, pts in points.items():
        try:
            fits[name] = fit_power_law([c for c, _ in pts], [a for _, a in pts])
        except (ValueError, RuntimeError) as exc:
            fits[name] = str(exc)
    return fits


def plot_scaling(points: dict[str, list[tuple[float, float]]], fits: dict[str, PowerLawFit | str],
                 out_path: str | os.PathLike, title: str = "Next-token accuracy vs training compute",
                 metric: str | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, pts) in enumerate(points.items()):
        color = _COLORS.get(name, f"C{i}")
        c = np.array([p[0] for p in pts])
        a = np.array([p[1] for p in pts])
        ax.scatter(c, a, s=18, color=color, alpha=0.8, label=f"{name} (points)")
        fit = fits.get(name)
        if isinstance(fit, PowerLawFit):
            grid = np.geomspace(c.min(), c.max(), 200)
            ax.plot(grid, fit.predict(grid), color=color, linewidth=1.8,
                    label=f"{name}: A={fit.a:.3g}, α={fit.alpha:.3f}, P*={fit.p_star:.4f}, R²={fit.r2:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel(describe_metric(metric) if metric else "next-token accuracy", fontsize=9)
    ax.set_title(f"{title}\nfit: P(C) = A / C^α + P*" + (f"  [{metric}]" if metric else ""), fontsize=11)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, Path(out_path))
