"""The one configuration tree of megatron-rpt: its sections, their rules, loading and ``explain``.

The tree (:class:`Config`) and its loading live here; its sections live in submodules by area
(:mod:`~megatron_rpt.config.model`: model, parallel; :mod:`~megatron_rpt.config.data`: data and its
corpora; :mod:`~megatron_rpt.config.rl`: rollout, rl; :mod:`~megatron_rpt.config.run`: optim, train,
ntp, checkpoint, logging, eval; the value kinds in :mod:`~megatron_rpt.config.kinds`), and are
re-exported here: ``from megatron_rpt.config import ...`` is the public import path of all of them.
Each field carries its type (``Literal`` choices, ``Annotated`` ranges: checked by the
loader in :mod:`megatron_rpt.config_schema`) and the one-line description under it, which
``python -m megatron_rpt.config explain [KEY]`` prints. A section's own rules are its ``check()``;
:func:`validate` adds only the rules that join sections (and the world size, the architecture and
paths). Every bad value raises :class:`ConfigError` naming the key, both values and the fix.

Relative paths are resolved against the current directory (run from the repository root, as
the README and the SLURM launchers do); ``${VAR}`` and ``${VAR:-default}`` environment
references are expanded; ``base: other.yaml`` merges this file over another one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_rpt.config.data import CorpusConfig, DataConfig
from megatron_rpt.config.kinds import (
    AnswerFormat,
    Dtype,
    EngineKind,
    EvalMode,
    Fp8Format,
    Fp8Recipe,
    Fraction,
    KLType,
    LossAggregation,
    LRSchedule,
    NonNegFloat,
    NonNegInt,
    Objective,
    PosFloat,
    PosInt,
    Recompute,
    RewardKind,
    Template,
    TransformerImpl,
)
from megatron_rpt.config.model import ModelConfig, ParallelConfig
from megatron_rpt.config.rl import RLConfig, RolloutConfig
from megatron_rpt.config.run import CheckpointConfig, EvalConfig, LoggingConfig, NTPConfig, OptimConfig, TrainConfig
from megatron_rpt.config_schema import (
    ConfigError,
    Range,
    Section,
    apply_override,
    build,
    check_fields,
    expand_env,
    explain,
    load_yaml_tree,
    parse_override,
)

__all__ = ["Config", "ConfigError", "load_config", "from_dict", "validate", "dump_yaml", "parse_override",
           "load_yaml_tree",
           # the sections and value kinds, defined in the submodules: this package is their public import path
           "ModelConfig", "ParallelConfig", "CorpusConfig", "DataConfig", "RolloutConfig", "RLConfig",
           "OptimConfig", "TrainConfig", "NTPConfig", "CheckpointConfig", "LoggingConfig", "EvalConfig",
           "Range", "Section", "PosInt", "NonNegInt", "PosFloat", "NonNegFloat", "Fraction", "Dtype",
           "TransformerImpl", "Fp8Format", "Fp8Recipe", "Recompute", "EngineKind", "Template", "KLType",
           "LossAggregation", "RewardKind", "AnswerFormat", "LRSchedule", "EvalMode", "Objective"]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy: architecture, initial weights, tokenizer, precision."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the policy is split over ranks."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and problems."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling responses."""
    rl: RLConfig = field(default_factory=RLConfig)
    """GRPO."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length and seed of the run."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and run directory."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    ntp: NTPConfig = field(default_factory=NTPConfig)
    """The next-token-prediction baseline (train.objective=ntp)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- validation


def validate(cfg: Config, world_size: int | None = None, check_paths: bool = False) -> None:
    """Raise :class:`ConfigError` naming the first bad key.

    Every section's fields (types, choices, ranges) and its own ``check()``, then the rules that
    join sections: the world size (``world_size``, default ``parallel.world_size``) against the
    parallel layout, the vLLM TP size and the prompts per step; the layout against the model's
    architecture; with ``check_paths``, that the paths it names exist.
    """
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        check_fields(section, f.name)
        section.check()
    p = cfg.parallel
    world = world_size if world_size is not None else p.world_size
    if world is not None:
        dp = p.data_parallel_size(world)
        if cfg.train.objective == "ntp" and cfg.ntp.sequences_per_step % dp:
            raise ConfigError(f"ntp.sequences_per_step={cfg.ntp.sequences_per_step} is not divisible by the "
                              f"data-parallel size {dp}; make it a multiple of {dp}")
        # lazy: cycle config <-> rollout.layout, and loading a config imports no torch until here
        from megatron_rpt.rollout.layout import check_rollout_layout

        check_rollout_layout(cfg, world)
    if cfg.optim.cpu_offload and not p.distributed_optimizer:
        raise ConfigError("optim.cpu_offload=true needs parallel.distributed_optimizer=true (megatron-core offloads "
                          "the distributed optimizer's state shards); set parallel.distributed_optimizer=true")
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    if cfg.rl.sequence_packing and cfg.rl.micro_batch_tokens is not None and cfg.rl.micro_batch_tokens < longest:
        raise ConfigError(f"rl.micro_batch_tokens={cfg.rl.micro_batch_tokens} is below the longest sample, "
                          f"data.max_prompt_tokens + rollout.max_response_tokens = {longest}; raise it to at least "
                          f"{longest} (a sample is never split over micro-batches)")
    if cfg.model.hf_config or _is_local_dir(cfg.model.hf_checkpoint):
        _validate_against_architecture(cfg)
    elif check_paths and not cfg.model.hf_checkpoint:
        raise ConfigError("model.hf_config and model.hf_checkpoint are both empty: point one at a Hugging Face "
                          "config.json / model directory")
    if check_paths:
        _validate_paths(cfg)


def _is_local_dir(value: str | None) -> bool:
    return bool(value) and not str(value).startswith("auto:") and Path(str(value)).is_dir()


def _validate_against_architecture(cfg: Config) -> None:
    from megatron_rpt.model.hf_config import check_parallel_layout, load_hf_config  # lazy: cycle config <-> hf_config

    key = "model.hf_config" if cfg.model.hf_config else "model.hf_checkpoint"
    path = Path(cfg.model.hf_config or cfg.model.hf_checkpoint or "")
    if not path.exists():
        raise ConfigError(f"{key}={str(path)!r} does not exist; give a config.json or HF model dir")
    check_parallel_layout(load_hf_config(path), cfg.parallel)


def _validate_paths(cfg: Config) -> None:
    for key, value in (("model.load", cfg.model.load), ("model.tokenizer", cfg.model.tokenizer),
                       ("data.prepared", cfg.data.prepared), ("data.proxy_model", cfg.data.proxy_model),
                       ("eval.scorer_model", cfg.eval.scorer_model)):
        if value and not Path(value).exists():
            raise ConfigError(f"{key}={value!r} does not exist; fix the path or set it to null")
    hf = cfg.model.hf_checkpoint
    if hf and not hf.startswith("auto:") and not Path(hf).exists():
        raise ConfigError(f"model.hf_checkpoint={hf!r} does not exist; give an HF model dir or auto:smollm2")
    if hf and hf.startswith("auto:") and hf not in ("auto:smollm2", "auto:tiny-qwen2"):
        raise ConfigError(f"model.hf_checkpoint={hf!r}: the automatic models are auto:smollm2 and auto:tiny-qwen2")
    for i, value in enumerate(cfg.data.paths):
        if not Path(value).exists():
            raise ConfigError(f"data.paths[{i}]={value!r} does not exist; fix the path")
    for corpus in cfg.data.mixture:
        for i, value in enumerate(corpus.paths):
            if not Path(value).exists():
                raise ConfigError(f"data.mixture corpus {corpus.name!r}: paths[{i}]={value!r} does not exist; "
                                  "fix the path")
    if cfg.rollout.engine == "vllm":
        from megatron_rpt.rollout import check_vllm_start  # lazy: cycle config <-> rollout; rollout imports torch

        check_vllm_start(cfg)


# ----------------------------------------------------------------------------- loading


def from_dict(data: dict[str, Any], overrides: list[str] | None = None, validate_paths: bool = False) -> Config:
    """The validated config of a YAML-shaped mapping with ``--set`` overrides applied."""
    tree = expand_env(json.loads(json.dumps(data)))
    for text in overrides or []:
        path, value = parse_override(text)
        apply_override(tree, path, value)
    cfg = build(Config, tree)
    validate(cfg, check_paths=validate_paths)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                validate_paths: bool = True) -> Config:
    """Load a YAML config (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    tree = load_yaml_tree(path) if path else {}
    return from_dict(tree, overrides, validate_paths=validate_paths)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m megatron_rpt.config explain [KEY]``: every config key, its type, default and meaning."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "explain" or len(args) > 2:
        print("usage: python -m megatron_rpt.config explain [SECTION | SECTION.KEY]", file=sys.stderr)
        return 2
    try:
        print(explain(Config, args[1] if len(args) == 2 else None))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

