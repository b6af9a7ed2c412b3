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
from megatron_rpt.rollout.base import Generation, RolloutEngine, SamplingParams, hf_parameter_shapes
from megatron_rpt.rollout.builtin import BuiltinEngine

__all__ = [
    "BuiltinEngine", "Generation", "RolloutEngine", "SamplingParams", "eos_token_ids",
    "hf_parameter_shapes", "make_engine",
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


def make_engine(cfg: Config, arch: ArchConfig, tokenizer: Any = None) -> RolloutEngine:
    """Build the engine ``cfg.rollout.engine`` names. Its weights come from ``update_weights``
    (the vLLM engine also loads ``model.hf_checkpoint`` when one is given).

    ``rollout.batch_size`` caps concurrent sequences in both engines; the longest sequence
    is ``data.max_prompt_tokens + rollout.max_response_tokens``.
    """
    r = cfg.rollout
    max_len = cfg.data.max_prompt_tokens + r.max_response_tokens
    if r.engine == "builtin":
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        # Data-parallel ranks sample different streams (rollout.seed + rank).
        return BuiltinEngine(arch, r.dtype, device, r.batch_size, max_len, eos_token_ids(arch, tokenizer),
                             tokenizer=tokenizer, seed=r.seed + rank)
    if r.engine == "vllm":
        from megatron_rpt.rollout.vllm_engine import VLLMEngine

        source = cfg.model.hf_checkpoint or cfg.model.hf_config
        if not source:
            raise ConfigError("rollout.engine=vllm needs model.hf_checkpoint or model.hf_config (a HF model directory)")
        model_dir = Path(source)
        if model_dir.is_file():  # a config.json path
            model_dir = model_dir.parent
        return VLLMEngine(
            model_dir, arch, tokenizer_dir=cfg.model.tokenizer or None, tensor_parallel=r.tensor_parallel,
            dtype=r.dtype, gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager,
            seed=r.seed, max_model_len=max_len, max_num_seqs=r.batch_size,
            # Without a checkpoint the weights arrive from Megatron before the first rollout.
            load_format="auto" if cfg.model.hf_checkpoint else "dummy",
            enable_sleep_mode=r.sleep_between_phases,
        )
    raise ConfigError(f"rollout.engine={r.engine!r} is not one of {list(typing.get_args(EngineKind))}")
