"""Tokenizer loading, exact token bytes, hashes and chat-template prompts."""

import hashlib
import json

import pytest

from megatron_rpt.config import ConfigError
from megatron_rpt.data.templates import TEMPLATES, render_instruction, render_prompt
from megatron_rpt.data.tokenizer import (
    encode_document,
    load_tokenizer,
    token_byte_table,
    token_bytes,
    tokenizer_hash,
    vocab_hash,
)
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(shared_path("tokenizers/qwen2_5"))


@pytest.fixture(scope="module")
def r1():
    return load_tokenizer(shared_path("tokenizers/r1_distill_qwen"))


def test_byte_table_matches_tokenizers_decoder_on_whole_vocab(qwen):
    """Independent reference: the Rust ByteLevel decoder of every single-token sequence."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(shared_path("tokenizers/qwen2_5/tokenizer.json")))
    table = token_byte_table(qwen)
    assert len(table) == 151665
    decoded = raw.decode_batch([[i] for i in range(len(table))], skip_special_tokens=False)
    checked = 0
    for i, (b, text) in enumerate(zip(table, decoded)):
        try:
            mine = b.decode("utf-8")
        except UnicodeDecodeError:
            # A fragment of a multi-byte character: the decoder can only show U+FFFD for it.
            assert "\ufffd" in text, i
            continue
        assert mine == text, (i, b, text)
        checked += 1
    assert checked > 140000


def test_token_bytes_split_character(qwen):
    ids = encode_document(qwen, "𠜎 x")  # U+2070E = F0 A0 9C 8E, split by byte-level BPE
    assert token_bytes(qwen, ids) == [b"\xf0\xa0", b"\x9c", b"\x8e", b" x"]
    assert ids == [101862, 250, 236, 856]


def test_token_bytes_concatenate_to_the_text(qwen):
    rows = [json.loads(line) for line in open(shared_path("data/omni_math_rule.jsonl"))][:50]
    import unicodedata

    for r in rows:
        text = r["problem"] + "\n\n" + r["solution"]
        ids = encode_document(qwen, text)
        assert b"".join(token_bytes(qwen, ids)) == unicodedata.normalize("NFC", text).encode("utf-8")


def test_special_token_text_in_documents_stays_text(qwen):
    ids = encode_document(qwen, "a <|im_end|> b")
    assert 151645 not in ids  # <|im_end|> written in a document is not the control token
    assert b"".join(token_bytes(qwen, ids)) == b"a <|im_end|> b"


def test_added_tokens_bytes(r1):
    table = token_byte_table(r1)
    assert table[151648] == b"<think>" and table[151649] == b"</think>"
    assert table[151644] == "<｜User｜>".encode()


def test_hashes(qwen, r1):
    path = shared_path("tokenizers/qwen2_5/tokenizer.json")
    assert tokenizer_hash(qwen) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert tokenizer_hash(path.parent) == tokenizer_hash(qwen)
    assert tokenizer_hash(r1) != tokenizer_hash(qwen)  # different added tokens / file
    assert vocab_hash(r1) == vocab_hash(qwen)  # same ordinary vocabulary -> same token ids of text


def test_chat_template_r1(r1):
    prompt = render_prompt("1 + 1 =", r1, "v0", use_chat_template=True)
    assert prompt.startswith("<｜begin▁of▁sentence｜><｜User｜>Complete the given text under '### Context'")
    assert prompt.endswith("### Context\n1 + 1 =<｜Assistant｜><think>\n")
    ids = r1(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [151646, 151644] and ids[-2:] == [151648, 198]  # BOS, <｜User｜> ... <think>, "\n"
    assert render_prompt("ctx", r1, "v0", use_chat_template=False) == render_instruction("ctx", "v0")


def test_templates_follow_the_paper():
    v0 = render_instruction("CTX", "v0")
    assert v0 == (
        "Complete the given text under '### Context' by predicting the next token, and wrap it in '\\boxed{}'. "
        "Please reason step by step to find the most probable next token as the final answer, and enclose it "
        "in \\boxed{} (note: the token may begin with a space, e.g., \\boxed{ para} or \\boxed{ =}; do not use "
        "\\text{}).\n\n### Context\nCTX")
    assert sorted(TEMPLATES) == ["raw"] + [f"v{i}" for i in range(7)]
    assert render_instruction("CTX", "raw") == "CTX"
    for name in TEMPLATES:
        text = render_instruction("<<CONTEXT {x}>>", name)
        assert text.count("<<CONTEXT {x}>>") == 1, name  # braces in the context are left alone
        assert ("\\boxed{" in text) == (name != "raw"), name
    assert "list multiple potential tokens" in render_instruction("c", "v3")
    assert "The next token is \\boxed{ this}" in render_instruction("c", "v4")
    with pytest.raises(ValueError, match="data.template"):
        render_instruction("c", "v7")


def test_char_tokenizer_of_tiny_llama():
    tok = load_tokenizer(shared_path("models/tiny_random_llama"))
    # char_ords = "0123456789,:" -> ids 4..15 after S=0, E=1, P=2, U=3 (verl's CharTokenizer layout)
    assert encode_document(tok, "12,3:") == [5, 6, 14, 7, 15]
    assert token_bytes(tok, [5, 14, 15]) == [b"1", b",", b":"]
    assert tok.eos_token_id == 1 and tok.pad_token_id == 2
    assert render_prompt("12", tok, "v0", use_chat_template=True).endswith("### Context\n12S")


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ConfigError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("name", ["qwen2_5", "r1_distill_qwen"])
def test_tokenizer_encodes_as_its_tokenizer_json(name):
    """transformers < 5.20 rebuilds the R1-Distill tokenizer (tokenizer_class LlamaTokenizerFast) with
    Llama's Metaspace pre-tokenizer and encodes "a b" as "ab"; the reference is the tokenizers
    library reading tokenizer.json itself."""
    from tokenizers import Tokenizer

    path = shared_path(f"tokenizers/{name}")
    text = "Consider pairs $(f,g)$ of functions\n\n  from 12 to 345."
    reference = Tokenizer.from_file(str(path / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    tok = load_tokenizer(path)
    assert encode_document(tok, text) == reference
    assert b"".join(token_bytes(tok, reference)) == text.encode()
