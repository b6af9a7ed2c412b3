"""Tokenizer loading and the exact bytes of every token.

Owns: :func:`load_tokenizer` (a Hugging Face tokenizer directory -- ``tokenizer.json``, or only a
SentencePiece ``tokenizer.model`` as Llama-2 and Mistral checkpoints ship -- or the character
tokenizer of ``tiny_random_llama`` whose ``tokenizer_config.json`` lists ``char_ords``),
:func:`has_tokenizer_files`, :func:`token_byte_table` (the byte string of each token id -- the
ground truth the reward compares against), :func:`tokenizer_hash` (sha256 of the tokenizer file)
and :func:`vocab_hash` (sha256 of the byte table, the compatibility check between prepared data
and the tokenizer used to train).

Byte-level BPE (GPT-2, Qwen, Llama-3) stores each token as a string over the 256 printable
stand-ins of GPT-2's ``bytes_to_unicode`` table; mapping each character back gives the token's raw
bytes, which may be a fragment of a multi-byte UTF-8 character. Added tokens (``<think>``, chat
markers) are stored as plain text and are encoded as UTF-8. SentencePiece vocabularies write a
space as ``\u2581`` and bytes outside the vocabulary as ``<0xNN>`` pieces (byte fallback).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import weakref
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megatron_rpt.config import ConfigError

__all__ = [
    "has_tokenizer_files",
    "load_tokenizer",
    "token_byte_table",
    "token_bytes",
    "tokenizer_hash",
    "vocab_hash",
    "bytes_to_unicode",
    "encode_document",
]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (openai/gpt-2 ``encoder.py``)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


# ----------------------------------------------------------------------------- loading


def _char_tokenizer(config: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The character tokenizer of verl's test models (ids: S=0, E=1, P=2, U=3, characters from 4)."""
    chars = [chr(c) for c in config["char_ords"]]
    vocab = {"S": 0, "E": 1, "P": 2, "U": 3}
    for i, ch in enumerate(chars):
        vocab[ch] = i + 4
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="U"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="E", sep_token="S", pad_token="P", unk_token="U",
        model_max_length=config.get("model_max_length", 2048),
    )
    if config.get("chat_template"):
        tok.chat_template = config["chat_template"]
    return tok


# Files that make a directory a tokenizer directory, in the order their hash is taken.
TOKENIZER_DEFINITION_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a tokenizer this module can load."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_DEFINITION_FILES)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``, or a
    SentencePiece ``tokenizer.model``, which transformers converts to a fast tokenizer).

    The chat template comes from ``chat_template.jinja`` or ``tokenizer_config.json``. A
    ``tokenizer_config.json`` with ``char_ords`` (verl's character tokenizer) is supported too.
    """
    p = Path(path)
    if not str(path):
        raise ConfigError("no tokenizer given: set model.tokenizer (or --tokenizer) to a tokenizer directory")
    if p.is_file():
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"tokenizer directory {str(path)!r} does not exist; point model.tokenizer "
                          "(or --tokenizer) at a directory with tokenizer.json")
    config_file = p / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config_file} is not valid JSON ({exc}); re-download the tokenizer") from None
    if "char_ords" in config and not (p / "tokenizer.json").is_file():
        tok = _char_tokenizer(config)
        tok.name_or_path = str(p)
        return tok
    if not has_tokenizer_files(p):
        raise ConfigError(f"{p} has none of {', '.join(TOKENIZER_DEFINITION_FILES)}; "
                          "it is not a Hugging Face tokenizer directory")
    sentencepiece_only = (p / "tokenizer.model").is_file() and not (p / "tokenizer.json").is_file()
    if sentencepiece_only and importlib.util.find_spec("sentencepiece") is None:
        raise ConfigError(f"{p} has only a SentencePiece tokenizer.model and the sentencepiece package is not "
                          "installed; pip install sentencepiece (a dependency of megatron-rpt)")
    try:
        if sentencepiece_only:
            tok = _load_sentencepiece(p)
        else:
            tok = AutoTokenizer.from_pretrained(str(p))
            if not _matches_tokenizer_json(tok, p / "tokenizer.json"):
                tok = PreTrainedTokenizerFast.from_pretrained(str(p))
    except Exception as exc:  # transformers raises many types here; name the directory
        raise ConfigError(f"could not load the tokenizer in {p}: {exc}") from exc
    jinja = p / "chat_template.jinja"
    if getattr(tok, "chat_template", None) is None and jinja.is_file():
        tok.chat_template = jinja.read_text(encoding="utf-8")
    return tok


# Words, digits, non-ASCII letters, CJK, an emoji (byte fallback in Llama-2's vocabulary) and a newline.
_SENTENCEPIECE_PROBE = "Reasoning about the next token: 12 345, über café 数学 🙂\nend."


def _load_sentencepiece(directory: Path) -> PreTrainedTokenizerBase:
    """A fast tokenizer converted from ``tokenizer.model`` that tokenises as sentencepiece does.

    transformers converts a bare ``tokenizer.model`` with a generic SentencePiece converter when
    no ``tokenizer_config.json`` names the class, and that one drops the dummy-prefix space of
    Llama-2 / Mistral models ("the" becomes "t", "he" instead of "\u2581the"). The sentencepiece
    library itself is the ground truth: the first conversion that encodes a probe text to its
    ids is used (AutoTokenizer, then the Llama layout: Metaspace, prepend first, byte fallback).
    """
    import sentencepiece  # lazy: optional dependency; only SentencePiece-only directories need it

    want = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).encode(
        _SENTENCEPIECE_PROBE)
    tried = []
    for make in (AutoTokenizer.from_pretrained, LlamaTokenizer.from_pretrained):
        tok = make(str(directory))
        if encode_document(tok, _SENTENCEPIECE_PROBE) == want:
            return tok
        tried.append(type(tok).__name__)
    raise ValueError(f"no conversion of tokenizer.model ({', '.join(tried)}) encodes like sentencepiece "
                     f"(probe {_SENTENCEPIECE_PROBE!r}); add the model's tokenizer.json to the directory")


def _matches_tokenizer_json(tok: PreTrainedTokenizerBase, file: Path) -> bool:
    """True when ``tok`` pre-tokenises and decodes as ``tokenizer.json`` says.

    transformers 5 rebuilds a tokenizer from its ``tokenizer_class``; before 5.20 a Qwen2 BPE
    vocabulary declared ``LlamaTokenizerFast`` (the DeepSeek-R1-Distill-Qwen tokenizers) is
    rebuilt with Llama's Metaspace pre-tokenizer when no ``config.json`` names the model type,
    and then encodes "a b" as "ab". The file itself is the ground truth.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or not file.is_file():
        return True
    loaded = json.loads(backend.to_str())
    wanted = json.loads(file.read_text(encoding="utf-8"))
    return all(_component_types(loaded.get(k)) == _component_types(wanted.get(k)) for k in ("pre_tokenizer", "decoder"))


def _component_types(node: Any) -> Any:
    """The nested ``type`` names of a tokenizer.json component (options such as trim_offsets ignored)."""
    if isinstance(node, list):
        return [_component_types(n) for n in node]
    if not isinstance(node, dict):
        return None
    children = node.get("pretokenizers") or node.get("decoders") or []
    return [node.get("type"), _component_types(children)]


# ----------------------------------------------------------------------------- token bytes

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_TABLES: "weakref.WeakKeyDictionary[Any, list[bytes]]" = weakref.WeakKeyDictionary()


def _decoder_types(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    found: set[str] = set()
    stack = [decoder]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            if "type" in d:
                found.add(d["type"])
            stack.extend(d.get("decoders") or [])
    return found


def _build_table(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1 if vocab else 0
    table: list[bytes] = [b""] * size
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    kinds = _decoder_types(tokenizer)
    u2b = _unicode_to_bytes()
    for token, idx in vocab.items():
        if idx in added:
            table[idx] = added[idx].encode("utf-8")
        elif "ByteLevel" in kinds:
            try:
                table[idx] = bytes(u2b[c] for c in token)
            except KeyError:  # not a byte-level string (should not happen): keep its UTF-8
                table[idx] = token.encode("utf-8")
        elif kinds & {"Metaspace", "ByteFallback", "Replace"}:
            m = _BYTE_FALLBACK.fullmatch(token)
            table[idx] = bytes([int(m.group(1), 16)]) if m else token.replace("\u2581", " ").encode("utf-8")
        else:  # character / word-level vocabularies: the token is its text
            table[idx] = token.encode("utf-8")
    return table


def token_byte_table(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """``table[id]`` = the exact bytes token ``id`` stands for (cached per tokenizer object)."""
    try:
        table = _TABLES.get(tokenizer)
    except TypeError:
        table = None
    if table is None:
        table = _build_table(tokenizer)
        try:
            _TABLES[tokenizer] = table
        except TypeError:
            pass
    return table


def token_bytes(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[bytes]:
    """Byte string of each id in ``ids`` (see :func:`token_byte_table`)."""
    table = token_byte_table(tokenizer)
    try:
        return [table[i] for i in ids]
    except IndexError:
        bad = [i for i in ids if not 0 <= i < len(table)]
        raise ValueError(f"token ids {bad[:5]} are outside the tokenizer's vocabulary of {len(table)}") from None


def encode_document(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of corpus text: no BOS/EOS, and special-token strings in the text stay plain text."""
    try:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:  # tokenizers without split_special_tokens
        return tokenizer(text, add_special_tokens=False)["input_ids"]


def default_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens the tokenizer puts before any text by default (R1-Distill: its BOS; Qwen2.5 and
    SmolLM2: none). Documents are tokenised without them (:func:`encode_document`); a model reading
    plain text as a language model (standard next-token prediction, the raw template) gets them back."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return [int(i) for i in full[:start]]
    return []


# ----------------------------------------------------------------------------- hashes


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_hash(tokenizer_or_path: PreTrainedTokenizerBase | str | os.PathLike) -> str | None:
    """sha256 of the directory's ``tokenizer.json`` (``tokenizer.model`` for SentencePiece-only
    directories, ``tokenizer_config.json`` for char tokenizers).

    ``None`` when the tokenizer was not loaded from a directory.
    """
    if isinstance(tokenizer_or_path, (str, os.PathLike)):
        p = Path(tokenizer_or_path)
    else:
        p = Path(getattr(tokenizer_or_path, "name_or_path", "") or "")
    if p.is_file():
        p = p.parent
    for name in TOKENIZER_DEFINITION_FILES:
        if (p / name).is_file():
            return _sha256_file(p / name)
    return None


def vocab_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the byte table of the ordinary (non-added) tokens: same ids -> same text."""
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))
    h = hashlib.sha256()
    for idx, b in enumerate(token_byte_table(tokenizer)):
        if idx in added:
            continue
        h.update(idx.to_bytes(4, "little"))
        h.update(len(b).to_bytes(2, "little"))
        h.update(b)
    return h.hexdigest()
