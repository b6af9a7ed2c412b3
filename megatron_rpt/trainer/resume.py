"""What a starting trainer resumes from, decided before the model is built.

Owns :func:`plan_resume` and the rules it applies (the README's "Checkpoints" section states
them for users):

* ``--resume auto``: the newest checkpoint of ``checkpoint.dir`` that verifies (complete, same
  parallel layout, every file matching its checksum). A newer one that fails is skipped with a
  log line and, once the older one is loaded, set aside as ``iter_X.rejected``; when none
  verifies the run does not start (it never trains from step 0 on top of a failed load).
* ``--resume none``: a new run; refused when ``checkpoint.dir`` already holds checkpoints,
  since the new run's saves and pruning would mix with (and delete) the old run's.
* ``--resume PATH``: that ``iter_X`` (no fallback: it was named explicitly) or the newest good
  checkpoint under that directory. Rewinding inside ``checkpoint.dir`` sets the newer
  checkpoints aside as ``iter_X.superseded``; from another directory, ``checkpoint.dir`` must
  hold no checkpoints of its own.
* The parallel layout (TP, PP and its stage split, VP, CP, EP, expert TP, DP and the number of rollout
  engines) must be the checkpoint's: the optimizer state is saved per data-parallel rank and the data-stream state per
  rollout engine (each engine reads its own shard), neither is resharded. The message says how to
  carry the weights over instead (``model.load``, which reshards them).
* Identity: a checkpoint records its run id and config. Resuming one's own ``checkpoint.dir``
  with a different model, tokenizer, data source or seed is another run and is refused unless
  forced; any other changed value is logged and applied (the optimizer schedule included).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_rpt.atomic import write_text_atomic
from megatron_rpt.config import Config, ConfigError
from megatron_rpt.rollout.layout import engine_count
from megatron_rpt.trainer.checkpointing import candidates, iter_step, read_complete
from megatron_rpt.trainer.ckpt_manifest import verify_manifest
from megatron_rpt.weights.hf_io import CheckpointError

log = logging.getLogger(__name__)

# Settings that make a run a different run: resuming across a change of these is refused.
IDENTITY_KEYS = (
    "model.hf_config", "model.hf_checkpoint", "model.load", "model.random_init", "model.tokenizer",
    "data.paths", "data.hf_dataset", "data.hf_split", "data.prepared", "data.text_fields", "data.seed",
    "data.mixture", "data.dedup",
    "train.seed", "rl.reward", "rl.answer_format",
    "rl.box_escapes", "train.objective",
)


@dataclass
class ResumePlan:
    """The verified checkpoint to load (None: start at step 0) and what a save records about the run."""

    checkpoint: Path | None
    run_id: str
    layout: dict[str, Any]
    config: dict[str, Any]
    set_aside: list[tuple[Path, str]] = field(default_factory=list)
    pointer: Path | None = None  # checkpoint.dir whose ``latest`` must name ``checkpoint`` after the load

    @property
    def info(self) -> dict[str, Any]:
        """What ``complete.json`` records next to the checksums."""
        return {"run_id": self.run_id, "layout": self.layout, "config": self.config}

    def commit(self) -> None:
        """Collective, after a successful load: set newer checkpoints aside and point ``latest`` here."""
        if not dist.is_initialized() or dist.get_rank() == 0:
            for path, suffix in self.set_aside:
                target = _free_name(path.with_name(f"{path.name}.{suffix}"))
                path.rename(target)
                log.warning("set %s aside as %s (%s than the checkpoint resumed from)", path.name, target.name,
                            "failed verification and newer" if suffix == "rejected" else "newer")
            if self.pointer is not None and self.checkpoint is not None:
                write_text_atomic(self.pointer / "latest", self.checkpoint.name + "\n")
        if dist.is_initialized():
            dist.barrier()


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def layout_of(cfg: Config, world_size: int) -> dict[str, Any]:
    p = cfg.parallel
    return {"tensor_parallel": p.tensor_parallel, "pipeline_parallel": p.pipeline_parallel,
            "virtual_pipeline": p.virtual_pipeline, "context_parallel": p.context_parallel,
            "expert_parallel": p.expert_parallel, "data_parallel": p.data_parallel_size(world_size),
            "expert_tensor_parallel": p.expert_tensor_size, "first_stage_layers": p.first_stage_layers,
            "last_stage_layers": p.last_stage_layers,
            "rollout_engines": engine_count(world_size, cfg.rollout.tensor_parallel), "world_size": world_size}


def _layout_text(layout: dict[str, Any]) -> str:
    uneven = "".join(f" {key}={layout[key]}" for key in ("first_stage_layers", "last_stage_layers")
                     if layout.get(key) is not None)
    etp = layout.get("expert_tensor_parallel")
    return (f"TP={layout.get('tensor_parallel')} PP={layout.get('pipeline_parallel')}{uneven} "
            f"{f'ETP={etp} ' if etp != layout.get('tensor_parallel') else ''}"
            f"VP={layout.get('virtual_pipeline')} CP={layout.get('context_parallel')} "
            f"EP={layout.get('expert_parallel')} DP={layout.get('data_parallel')} "
            f"with {layout.get('rollout_engines')} rollout engines ({layout.get('world_size')} ranks)")


def _saved_layout(meta: dict[str, Any]) -> dict[str, Any]:
    """The layout a checkpoint records; one written before rollout engines were recorded read its
    data stream per data-parallel rank, i.e. with one engine per replica."""
    layout = dict(meta.get("layout") or {})
    if layout and "rollout_engines" not in layout:
        layout["rollout_engines"] = layout.get("data_parallel")
    if layout:  # written before expert TP and uneven stages were settings: megatron-core's defaults
        layout.setdefault("expert_tensor_parallel", layout.get("tensor_parallel"))
        layout.setdefault("first_stage_layers", None)
        layout.setdefault("last_stage_layers", None)
    return layout


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every leaf that differs (keys in both)."""
    old, new = _flat(saved), _flat(json.loads(json.dumps(current)))
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def _has_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and iter_step(p) is not None), key=iter_step)


def _unusable(path: Path, layout: dict[str, Any]) -> str | None:
    """Collective: why ``path`` cannot be resumed (None when it verifies); raises on a layout change."""
    meta = read_complete(path)
    if meta is None:
        return "no complete.json: it was interrupted mid-save or damaged"
    if not isinstance(meta.get("files"), dict):
        return "complete.json has no checksums (written by an older megatron-rpt, or damaged)"
    if _saved_layout(meta) != layout:
        raise CheckpointError(
            f"checkpoint {path} was written at {_layout_text(_saved_layout(meta))}; this run is "
            f"{_layout_text(layout)}. A training checkpoint resumes only at its own parallel layout (the optimizer "
            "state is saved per data-parallel rank and the data stream per rollout engine = world size / "
            "rollout.tensor_parallel; neither is resharded). Relaunch with the checkpoint's layout, "
            f"or carry its weights over to this layout with a fresh optimizer: --set model.load={path}/dist and a "
            "new checkpoint.dir")
    return verify_manifest(path, meta["files"])


def _choose(paths: list[Path], layout: dict[str, Any], fallback: bool) -> tuple[Path, dict[str, Any], list[Path]]:
    """The first checkpoint of ``paths`` that verifies, its complete.json, and the ones that failed."""
    failed: list[tuple[Path, str]] = []
    for i, path in enumerate(paths):
        reason = _unusable(path, layout)
        if reason is None:
            return path, read_complete(path) or {}, [p for p, _ in failed]
        failed.append((path, reason))
        if not fallback or i == len(paths) - 1:
            break
        log.warning("checkpoint %s is unusable (%s); falling back to the previous one", path, reason)
    listed = "; ".join(f"{p.name}: {r}" for p, r in failed)
    raise CheckpointError(f"no usable checkpoint in {paths[0].parent} ({listed}); the run does not start rather "
                          "than train on a partial state: restore a good checkpoint, or move the directory away "
                          "and start over with --resume none")


def _new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def plan_resume(cfg: Config, resume: str | None, world_size: int, force: bool = False) -> ResumePlan:
    """Collective: the checkpoint this run starts from (see the module docstring for the rules)."""
    layout = layout_of(cfg, world_size)
    current = cfg.to_dict()
    own = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    existing = _has_checkpoints(own) if own is not None else []
    fresh = ResumePlan(None, _new_run_id(), layout, current)
    if resume in (None, "none"):
        if existing:
            raise ConfigError(
                f"--resume none: checkpoint.dir={str(own)!r} already holds checkpoints (up to {existing[-1].name}); "
                "a new run there would mix its checkpoints with them and prune them away: give the new run another "
                "checkpoint.dir, delete that one, or continue it with --resume auto")
        return fresh
    if resume == "auto":
        if not existing:
            return fresh
        root, paths, explicit = own, candidates(own), False
    else:
        root, paths, explicit = _explicit(resume)
    inside = own is not None and root.resolve() == own.resolve()
    if not inside and existing:
        raise ConfigError(
            f"--resume {resume}: checkpoint.dir={str(own)!r} already holds checkpoints of its own (up to "
            f"{existing[-1].name}); resuming another directory's checkpoint into it would mix two runs: point "
            f"checkpoint.dir at {str(root)!r} to continue that run there, or at an empty directory")
    chosen, meta, failed = _choose(paths, layout, fallback=not explicit)
    _check_identity(chosen, meta, current, enforce=inside and not force)
    plan = ResumePlan(chosen, str(meta.get("run_id") or _new_run_id()) if inside else _new_run_id(), layout, current)
    if inside:
        step = iter_step(chosen)
        plan.set_aside = [(p, "rejected" if p in failed else "superseded") for p in existing if iter_step(p) > step]
        plan.pointer = own
    return plan


def _explicit(resume: str) -> tuple[Path, list[Path], bool]:
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such directory; give a checkpoint (iter_XXXXXXX), a checkpoint "
                          "directory, auto or none")
    if iter_step(path) is not None:
        return path.parent, [path], True
    found = candidates(path)
    if not found:
        raise ConfigError(f"--resume {resume}: no checkpoints (iter_XXXXXXX directories) there")
    return path, found, False


def _check_identity(path: Path, meta: dict[str, Any], current: dict[str, Any], enforce: bool) -> None:
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return
    changes = config_changes(saved, current)
    identity = {k: v for k, v in changes.items() if k in IDENTITY_KEYS}
    if identity and enforce:
        listed = "; ".join(f"{k}={old!r} there, {new!r} here" for k, (old, new) in identity.items())
        raise ConfigError(
            f"checkpoint {path} belongs to run {meta.get('run_id')}, whose settings differ from this config: "
            f"{listed}. That is another run: give it its own checkpoint.dir, or pass --force-resume to continue "
            "that run with these values")
    if changes:
        listed = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        log.warning("config changed since %s; the new values apply: %s", path.name, listed)
