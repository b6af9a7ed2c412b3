"""Checkpoints that ship only a SentencePiece ``tokenizer.model`` (Llama-2 / Mistral style)
load, filter, train and convert (issue 11, item 8).

A SentencePiece BPE model (byte fallback, dummy prefix, as Llama-2's) is trained on the fly
on a small corpus; a tiny random Llama is saved beside it with no ``tokenizer.json`` or
``tokenizer_config.json``. The reference for the tokenizer is the ``sentencepiece`` library
itself: the same ids for every text, and the byte table reproducing the text's bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
from pathlib import Path

import pytest

from megatron_rpt.data.tokenizer import encode_document, load_tokenizer, token_bytes, tokenizer_hash

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import convert as convert_cli  # noqa: E402  (tools/convert.py)
import prepare_data  # noqa: E402  (tools/prepare_data.py)

spm = pytest.importorskip("sentencepiece", reason="sentencepiece is a dependency (setup.py); install it")

WORDS = ("the next token is what the policy predicts after it reasons about the context ; "
         "über café naïve 数学 reward 12 345 .").split()
# Characters the SentencePiece model never saw: they must come back through byte fallback.
UNSEEN = "emoji 🙂 and ß"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) for _ in range(300)]
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model_file, vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",  # as Llama-2's
        split_digits=True, minloglevel=2,
    )
    out = root / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    (out / "tokenizer.model").write_bytes(model_file.getvalue())
    with open(root / "corpus.jsonl", "w") as f:
        for text in texts[:64]:
            f.write(json.dumps({"text": text}) + "\n")
    return out


def test_tokenizer_model_alone_loads_and_matches_sentencepiece(llama_dir):
    assert sorted(p.name for p in llama_dir.iterdir() if "tokenizer" in p.name) == ["tokenizer.model"]
    tok = load_tokenizer(llama_dir)
    sp = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
    for text in ["the next token is über", "数学 12 345 reward .", UNSEEN]:
        ids = encode_document(tok, text)
        assert ids == sp.encode(text), text
        # The dummy prefix is a real leading space of the first piece; everything else is the text.
        assert b"".join(token_bytes(tok, ids)) == b" " + text.encode("utf-8"), text
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode(UNSEEN))  # byte fallback exercised
    assert tok.eos_token_id == 2
    assert tokenizer_hash(llama_dir) == hashlib.sha256((llama_dir / "tokenizer.model").read_bytes()).hexdigest()


def test_entropy_filter_prepares_data_with_it(llama_dir, tmp_path):
    out = tmp_path / "prepared"
    manifest = prepare_data.main(["--input", str(llama_dir.parent / "corpus.jsonl"), "--tokenizer", str(llama_dir),
                                  "--proxy", str(llama_dir), "--out", str(out), "--max-docs", "4",
                                  "--text-fields", "text", "--device", "cpu", "--no-progress"])
    assert manifest["num_docs"] == 4 and manifest["counts"]["scored"] > 0
    assert manifest["tokenizer"]["hash"] == hashlib.sha256((llama_dir / "tokenizer.model").read_bytes()).hexdigest()


def _train(model_dir: str, run: str) -> list[dict]:
    from megatron_rpt.config import load_config
    from megatron_rpt.trainer.trainer import Trainer

    os.environ["RPT_TOY_DIR"] = str(Path(model_dir).parent)  # unused paths of the toy config
    cfg = load_config(REPO / "configs/toy_learn.yaml", [
        f"model.hf_checkpoint={model_dir}", f"data.paths=[{Path(model_dir).parent / 'corpus.jsonl'}]",
        "data.max_prompt_tokens=48", "data.min_context_tokens=4", f"logging.dir={run}", "logging.progress_bar=false",
        "train.steps=2", "train.eval_interval=0", "rl.prompts_per_step=4", "rollout.samples_per_prompt=4",
        "rl.micro_batch_size=16",
        "rl.entropy_coef=0.01",  # a gradient even when every sample of a random model scores 0
    ])
    return Trainer(cfg, resume=None).run()["history"]


def test_trains_a_step_with_it(llama_dir, tmp_path):
    from megatron_rpt.distributed import spawn

    (history,) = spawn(_train, 1, str(llama_dir), str(tmp_path / "run"))
    assert len(history) == 2
    assert all(h["train/grad_norm"] > 0 for h in history)
    # The engine sampled with the weights and vocabulary Megatron scores with.
    assert max(h["rollout/engine_logprob_abs_diff"] for h in history) < 1e-4


def test_converts_and_exports_the_tokenizer_model(llama_dir, tmp_path):
    mcore, export = tmp_path / "mcore", tmp_path / "export"
    assert convert_cli.main(["hf-to-mcore", "--hf", str(llama_dir), "--out", str(mcore), "--no-progress"]) == 0
    assert convert_cli.main(["mcore-to-hf", "--ckpt", str(mcore), "--out", str(export)]) == 0
    assert (export / "tokenizer.model").read_bytes() == (llama_dir / "tokenizer.model").read_bytes()
    assert encode_document(load_tokenizer(export), UNSEEN) == encode_document(load_tokenizer(llama_dir), UNSEEN)
