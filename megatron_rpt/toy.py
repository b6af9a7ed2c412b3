"""A toy next-token task that a tiny model learns from scratch with RPT on CPU in minutes.

Owns: ``python -m megatron_rpt.toy --out DIR`` which writes
  * ``corpus.jsonl``: documents over a 16-letter alphabet where each letter is followed by a
    fixed (seeded) permutation of it, so the next token is a function of the last one;
  * ``tokenizer/``: a byte-level BPE tokenizer whose vocabulary is exactly those letters plus
    an end-of-text token (so a random policy guesses right about 1 time in 17);
  * ``model/``: a randomly initialised 2-layer Qwen2 with that vocabulary.
``configs/toy_learn.yaml`` trains on it with the raw answer format (the continuation itself is
the prediction) and the paper's prefix-match reward; the mean reward must climb from about
0.06 to well above 0.6 — a sign error or a broken weight sync keeps it flat.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from megatron_rpt.atomic import atomic_output_dir

ALPHABET = "abcdefghijklmnop"
EOS = "<|endoftext|>"


def _tokenizer(out: Path) -> None:
    vocab = {ch: i for i, ch in enumerate(ALPHABET)}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out)


def _model(out: Path, vocab_size: int, eos_id: int, seed: int) -> None:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, eos_token_id=eos_id, bos_token_id=eos_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)


def prepare_toy(out_dir: str | Path, num_docs: int = 512, doc_len: int = 40, seed: int = 0) -> Path:
    """Write the toy corpus, tokenizer and model into ``out_dir`` (atomically; reused if present)."""
    out = Path(out_dir)
    if (out / "model" / "config.json").is_file():
        return out
    with atomic_output_dir(out) as tmp:
        rng = random.Random(seed)
        successor = list(ALPHABET)
        rng.shuffle(successor)
        table = dict(zip(ALPHABET, successor))
        with open(tmp / "corpus.jsonl", "w") as f:
            for i in range(num_docs):
                ch = rng.choice(ALPHABET)
                text = [ch]
                for _ in range(doc_len - 1):
                    ch = table[ch]
                    text.append(ch)
                f.write(json.dumps({"id": i, "text": "".join(text)}) + "\n")
        (tmp / "successor.json").write_text(json.dumps(table))
        _tokenizer(tmp / "tokenizer")
        _model(tmp / "model", vocab_size=len(ALPHABET) + 1, eos_id=len(ALPHABET), seed=seed)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tmp / "tokenizer" / name).exists():
                shutil.copy(tmp / "tokenizer" / name, tmp / "model" / name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_rpt.toy", description="write the toy RPT task")
    parser.add_argument("--out", default=".cache/toy", help="output directory (default .cache/toy)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(prepare_toy(args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
