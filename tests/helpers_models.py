"""Tiny random Hugging Face checkpoints (Qwen2 / Llama / Qwen3 / Qwen3-MoE) for tests.

Owns :func:`make_tiny_hf_checkpoint`: builds the model with transformers, gives *every*
tensor random values (biases and norm weights included, so a wrong bias / norm mapping
cannot hide behind zeros / ones), and writes it with ``save_pretrained`` (safetensors).
Sizes are deliberately odd (hidden 96, 6 heads in 2 KV groups, vocab 1000) so that vocabulary
padding and per-group QKV interleaving are exercised. Used by the converter / parity tests
and by the trainer tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from conftest import SHARED

SHARED_QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen2_5"

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_COMMON: dict[str, Any] = dict(
    hidden_size=96,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=160,
    num_hidden_layers=2,
    vocab_size=1000,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # family: (config class, model class, family-specific defaults)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_theta": 1_000_000.0}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 500_000.0}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"rope_theta": 1_000_000.0}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {"rope_theta": 1_000_000.0, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
         "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    ),
}


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.1 * noise)  # RMSNorm gains near 1, but not 1
        else:
            param.copy_(std * noise)


def make_tiny_hf_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    std: float = 0.1,
    tokenizer: bool = True,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """Write a random ``family`` (qwen2 | llama | qwen3 | qwen3_moe) checkpoint to ``out_dir``.

    ``overrides`` are config fields (e.g. ``tie_word_embeddings=True``,
    ``rope_scaling=LLAMA3_ROPE_SCALING``, ``num_hidden_layers=4``). ``tokenizer`` copies the
    Qwen2.5 tokenizer files from ../shared when present (their ids exceed a vocab of 1000: pass
    ``vocab_size=151936`` to use them for generation). ``max_shard_size`` (e.g. ``"200KB"``)
    forces a sharded checkpoint with ``model.safetensors.index.json``. Returns ``out_dir``.
    """
    import transformers

    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(_FAMILIES)}")
    config_cls, model_cls, defaults = _FAMILIES[family]
    kwargs = {**_COMMON, **defaults, **overrides}
    if family == "qwen2" and "head_dim" in kwargs and "head_dim" not in overrides:
        kwargs.pop("head_dim")  # Qwen2 derives it from hidden_size / heads
    config = getattr(transformers, config_cls)(**kwargs)
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    _randomise(model, seed, std)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {}
    if max_shard_size:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **save_kwargs)
    if family == "qwen3_moe":
        # transformers 5 writes num_local_experts; released Qwen3-MoE configs (and hf_config.py) use num_experts
        config_path = out / "config.json"
        data = json.loads(config_path.read_text())
        data.setdefault("num_experts", data.get("num_local_experts"))
        config_path.write_text(json.dumps(data, indent=2) + "\n")
    if tokenizer and SHARED_QWEN_TOKENIZER.is_dir():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (SHARED_QWEN_TOKENIZER / name).is_file():
                shutil.copyfile(SHARED_QWEN_TOKENIZER / name, out / name)
    return out
