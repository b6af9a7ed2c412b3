"""A tiny random Qwen2 causal LM on disk, standing in for the proxy model in tests and benchmarks.

Owns :func:`make_tiny_proxy`. With the real Qwen2.5 vocabulary (151,665 ids) and hidden size 32 it
has about 10M parameters and runs on a CPU. ``init_std`` is larger than a trained model's so the
top-16 entropies spread over the easy/medium/hard range instead of all sitting at ln 16.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

__all__ = ["make_tiny_proxy"]


def make_tiny_proxy(out_dir: str | os.PathLike, vocab_size: int = 151665, hidden_size: int = 32,
                    num_layers: int = 1, init_std: float = 1.5, seed: int = 0) -> Path:
    """Write a random ``Qwen2ForCausalLM`` (safetensors + config.json) to ``out_dir``; return the path."""
    cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m megatron_rpt.data.tiny_proxy OUT_DIR  (a tiny random Qwen2 proxy, "
                         "Qwen2.5 vocabulary)")
    print(make_tiny_proxy(sys.argv[1]))
