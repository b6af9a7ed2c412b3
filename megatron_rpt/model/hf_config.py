"""Read a Hugging Face ``config.json`` into the architecture facts megatron-rpt needs.

Owns: :class:`ArchConfig`, :func:`padded_vocab_size` and :func:`load_hf_config` for the Llama (incl. Llama 3 rope
scaling), Qwen2/Qwen2.5 (R1-Distill-Qwen), Qwen3 (qk-norm) and Qwen3-MoE families.
Accepts both the transformers 4 (``rope_theta`` / ``rope_scaling``) and transformers 5
(``rope_parameters``) shapes of the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_rpt.config import ConfigError, ParallelConfig
from megatron_rpt.errors import UserError

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron-LM's rule: pad to a multiple of ``divisible_by * tensor_parallel`` (here, free of
    megatron-core, because the planner sizes the embedding with it)."""
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


class UnsupportedArchitecture(UserError, ValueError):
    """The model's config.json describes an architecture megatron-rpt cannot build."""


@dataclass(frozen=True)
class ArchConfig:
    family: str  # llama | qwen2 | qwen3 | qwen3_moe
    hf_architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    # Llama 3 rope scaling (None = plain RoPE)
    rope_scaling_factor: float | None = None
    # MoE (0 = dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"

    @property
    def kv_channels(self) -> int:
        return self.head_dim

    def num_parameters(self) -> int:
        """Parameter count from the shape (embeddings and output layer included)."""
        h, L, hd = self.hidden_size, self.num_layers, self.head_dim
        q = self.num_attention_heads * hd
        kv = self.num_key_value_heads * hd
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0) + (2 * hd if self.qk_norm else 0)
        if self.num_experts:
            mlp = self.num_experts * 3 * h * self.moe_intermediate_size + h * self.num_experts
        else:
            mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + embed + h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling dict or None) from either transformers 4 or 5 shaped configs."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") not in ("default", None) else None
        return float(theta), scaling
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(cfg.get("rope_theta", 10000.0)), scaling


def arch_from_dict(cfg: dict[str, Any], source: str = "config.json") -> ArchConfig:
    archs = cfg.get("architectures") or []
    hf_arch = next((a for a in archs if a in SUPPORTED), None)
    if hf_arch is None:
        raise UnsupportedArchitecture(
            f"{source}: architectures={archs or cfg.get('model_type')!r} is not supported; "
            f"supported: {', '.join(sorted(SUPPORTED))}"
        )
    family = SUPPORTED[hf_arch]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in cfg:
            raise ValueError(f"{source}: missing required key {key!r}")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, scaling = _rope(cfg)
    factor = None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "llama3":
            raise UnsupportedArchitecture(
                f"{source}: rope scaling type {rope_type!r} is not supported by Megatron-Core's GPTModel; "
                "only Llama 3 scaling ('llama3') is"
            )
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for k, v in expected.items():
            if float(scaling.get(k, v)) != float(v):
                raise UnsupportedArchitecture(
                    f"{source}: llama3 rope scaling with {k}={scaling.get(k)} is not supported "
                    f"(Megatron-Core fixes it to {v})"
                )
        factor = float(scaling.get("factor", 8.0))
    # transformers 5 writes num_local_experts for Qwen3-MoE; 4.x wrote num_experts.
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if family == "qwen3_moe" else 0
    if family == "qwen3_moe" and int(cfg.get("mlp_only_layers") and len(cfg["mlp_only_layers"]) or 0):
        raise UnsupportedArchitecture(f"{source}: Qwen3-MoE with mlp_only_layers is not supported")
    return ArchConfig(
        family=family,
        hf_architecture=hf_arch,
        model_type=str(cfg.get("model_type", family)),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        vocab_size=int(cfg["vocab_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        rope_scaling_factor=factor,
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
    )


def read_hf_config_dict(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no Hugging Face config.json at {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not valid JSON: {exc}") from None


def load_hf_config(path: str | Path) -> ArchConfig:
    """Parse ``path`` (a config.json or a model directory holding one)."""
    p = Path(path)
    return arch_from_dict(read_hf_config_dict(p), source=str(p))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_parallel_layout(arch: ArchConfig, p: ParallelConfig) -> None:
    """:class:`ConfigError` unless ``parallel.*`` can split this architecture (heads, groups, layers, experts)."""
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
    if p.first_stage_layers is not None or p.last_stage_layers is not None:
        p.stage_layers(arch.num_layers)  # the uneven split's own check
    elif arch.num_layers % stages:
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
    if not arch.num_experts and p.expert_tensor_parallel is not None:
        raise ConfigError(f"parallel.expert_tensor_parallel={p.expert_tensor_parallel} needs a MoE model; set it "
                          "to null")
