"""Rollout engines behind one protocol: the built-in torch engine (CPU default) and vLLM.

Owns: :func:`make_engine`, the factory the trainer calls with the loaded config. The
protocol and result types live in :mod:`megatron_rpt.rollout.base`.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import torch

from megatron_rpt.config import Config, ConfigError, EngineKind
from megatron_rpt.model.hf_config import ArchConfig
from megatron_rpt.model.zoo import resolve_model_dir
from megatron_rpt.rollout.base import Generation, RolloutEngine, SamplingParams, hf_parameter_shapes
from megatron_rpt.rollout.builtin import BuiltinEngine
from megatron_rpt.rollout.vllm_engine import VLLMEngine, import_vllm

__all__ = [
    "BuiltinEngine", "Generation", "RolloutEngine", "SamplingParams", "check_vllm_start", "eos_token_ids",
    "hf_parameter_shapes", "make_engine", "vllm_model_dir",
]


def eos_token_ids(arch: ArchConfig, tokenizer: Any = None) -> list[int]:
    """EOS ids of the model config (int or list) and of the tokenizer, merged."""
    ids: set[int] = set()
    for value in (arch.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


def make_engine(cfg: Config, arch: ArchConfig, tokenizer: Any = None, *, model_dir: str | Path | None = None,
                engine_index: int = 0, weights_from_bridge: bool = False) -> RolloutEngine:
    """Build the engine ``cfg.rollout.engine`` names for rollout engine ``engine_index``
    (:mod:`megatron_rpt.rollout.layout`; it seeds the built-in engine's generator).

    vLLM starts from ``rollout.model_dir``, else ``model_dir`` (the resolved ``model.hf_checkpoint``),
    else ``model.hf_checkpoint`` (``auto:`` names resolved here) or ``model.hf_config``'s directory.
    It reads the weights there unless ``weights_from_bridge`` (the trainer syncs before the first
    rollout) or no ``model.hf_checkpoint`` is set. The built-in engine's weights always come from
    ``update_weights``. ``rollout.batch_size`` caps concurrent sequences in both engines; the
    longest sequence is ``data.max_prompt_tokens + rollout.max_response_tokens``.
    """
    r = cfg.rollout
    max_len = cfg.data.max_prompt_tokens + r.max_response_tokens
    if r.engine == "builtin":
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        # Every engine samples its own stream (rollout.seed + engine index).
        return BuiltinEngine(arch, r.dtype, device, r.batch_size, max_len, eos_token_ids(arch, tokenizer),
                             tokenizer=tokenizer, seed=r.seed + engine_index)
    if r.engine == "vllm":
        import_vllm()  # the install line before anything else
        source = vllm_model_dir(cfg, model_dir)
        return VLLMEngine(
            source, arch, tokenizer_dir=cfg.model.tokenizer or None, tensor_parallel=r.tensor_parallel,
            dtype=r.dtype, gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager,
            seed=r.seed, max_model_len=max_len, max_num_seqs=r.batch_size,
            load_format="auto" if cfg.model.hf_checkpoint and not weights_from_bridge else "dummy",
            enable_sleep_mode=r.sleep_between_phases,
        )
    raise ConfigError(f"rollout.engine={r.engine!r} is not one of {list(typing.get_args(EngineKind))}")


def _vllm_source(cfg: Config, model_dir: str | Path | None = None) -> tuple[str, str]:
    """(config key, value) of the directory vLLM starts from: see :func:`make_engine`."""
    if cfg.rollout.model_dir:
        return "rollout.model_dir", cfg.rollout.model_dir
    if model_dir:
        return "model.hf_checkpoint", str(model_dir)
    if cfg.model.hf_checkpoint:
        return "model.hf_checkpoint", cfg.model.hf_checkpoint
    return "model.hf_config", cfg.model.hf_config


_VLLM_DIR_FIX = ("point rollout.model_dir at the model's Hugging Face directory (the GPU recipes read $RPT_HF_DIR), "
                 "or set rollout.engine=builtin")


def check_vllm_start(cfg: Config) -> None:
    """At config load (``rollout.engine=vllm``): vLLM has a Hugging Face directory to start from, with a
    config.json and the weights, or with the config only when Megatron's weights come from
    ``model.load`` (or ``model.random_init``): vLLM then starts with dummy weights and the bridge
    pushes Megatron's before the first rollout. ``auto:`` models are prepared with both."""
    key, value = _vllm_source(cfg)
    if value.startswith("auto:"):
        return
    if not value:
        raise ConfigError("rollout.engine=vllm starts from a Hugging Face model directory, but rollout.model_dir, "
                          f"model.hf_checkpoint and model.hf_config are empty: {_VLLM_DIR_FIX}")
    path = Path(value)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not (path / "config.json").is_file():
        raise ConfigError(f"rollout.engine=vllm starts from a Hugging Face model directory, but {key}={value!r} is "
                          f"not one (no config.json in it): {_VLLM_DIR_FIX}")
    m = cfg.model
    weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not (weights or m.load or m.random_init or (m.hf_checkpoint and key != "model.hf_checkpoint")):
        raise ConfigError(f"{key}={value!r} has a config.json but no weights (*.safetensors / *.bin) and model.load "
                          "is empty: give the directory with its weights, or a Megatron checkpoint in model.load "
                          "(vLLM then starts from the config with dummy weights and receives Megatron's)")


def vllm_model_dir(cfg: Config, model_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory vLLM starts from (``auto:`` names resolved); a clear error when it
    has no config.json."""
    key, source = _vllm_source(cfg, model_dir)
    if not source:
        raise ConfigError(f"rollout.engine=vllm needs a Hugging Face model directory to start from: {_VLLM_DIR_FIX}")
    path = resolve_model_dir(source, cfg.model.tokenizer or None) if source.startswith("auto:") else Path(source)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}={source!r} is not a Hugging Face model directory with a config.json, which vLLM "
                          f"starts from: {_VLLM_DIR_FIX}")
    return path
