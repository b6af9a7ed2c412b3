"""Regenerate the cross-version checkpoint fixtures of ``tests/test_model_class_interop.py``.

Run it once under each supported megatron-core (0.16 on Python 3.11 writes ``GPTModel/``,
0.19 on Python 3.12 writes ``HybridModel/``), from the repository root::

    python tests/data/mcore_interop/make_fixtures.py

``hf/<family>/`` holds the reference weights (tiny random models; written on the first run and
reused after, so both checkpoints hold the same weights); ``<ModelClass>/<family>/`` is the
``tools/convert.py hf-to-mcore`` output of the running megatron-core.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # tests/ (helpers_models)

# Small on purpose (the files are committed): hidden 32, 4 heads in 2 KV groups, vocab 128.
TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
            vocab_size=128, max_position_embeddings=64, num_hidden_layers=2)
FAMILIES = {
    "qwen2": {},  # dense MLP ("-" layers), QKV bias, untied output layer
    "qwen3_moe": {"moe_intermediate_size": 16},  # routed experts ("E" layers), QK-norm
}


def main() -> None:
    from helpers_models import make_tiny_hf_checkpoint

    from megatron_rpt.weights.convert import ConvertSettings, hf_to_mcore
    from megatron_rpt.model.mcore_compat import policy_model_class

    for family, extra in FAMILIES.items():
        hf = HERE / "hf" / family
        if not (hf / "config.json").is_file():
            make_tiny_hf_checkpoint(family, hf, tokenizer=False, **TINY, **extra)
        out = HERE / policy_model_class().value / family
        shutil.rmtree(out, ignore_errors=True)
        hf_to_mcore(hf, out, ConvertSettings(progress=False))
        meta_path = out / "rpt_meta.json"  # no absolute path of the machine that wrote it in the repository
        meta = json.loads(meta_path.read_text())
        meta["source"] = str(hf.relative_to(HERE.parent.parent.parent))
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
