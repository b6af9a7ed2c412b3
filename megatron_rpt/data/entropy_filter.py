"""Token-level difficulty: top-k entropy of a small proxy LM at every position of a document.

Owns: :func:`topk_entropy` (the formula), :class:`ProxyScorer` (a Hugging Face causal LM that scores
whole documents in packed batches) and the easy/medium/hard labels (:func:`difficulty_splits`).

The paper (section 3.3) scores each position with the proxy's entropy "on the top-16 next tokens":
take the 16 largest logits, renormalise them with a softmax, H = -sum p log p (nats, so at most
ln 16 = 2.77). Position t (the token x_t to predict) gets the entropy of the distribution the proxy
produces after reading x_<t, i.e. from the logits at t-1; position 0 has no context and is NaN.

Packing: several documents are concatenated into one row and ``position_ids`` restart at 0 for
each one. With no attention mask, transformers (``masking_utils.find_packed_sequence_indices``)
turns restarting position ids into a block-diagonal causal mask for eager / sdpa / flash
attention, so documents never see each other (checked against unpacked scoring in the tests);
a transformers without it falls back to one document per right-padded row. Documents longer than
``max_seq_len`` are scored in overlapping windows: every window after the first re-reads the last
``max_seq_len // 4`` tokens of the previous one as context and scores only the positions after it.
The vocabulary projection is done in chunks of tokens so the full logits tensor never exists.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from megatron_rpt.config import ConfigError

__all__ = [
    "topk_entropy",
    "ProxyScorer",
    "difficulty_splits",
    "difficulty_label",
    "split_names",
    "pack_first_fit",
    "packing_supported",
]


def topk_entropy(logits: torch.Tensor, k: int = 16) -> torch.Tensor:
    """Entropy (nats) of the softmax over the ``k`` largest logits, over the last dim, in float32+."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    top = x.topk(min(k, x.shape[-1]), dim=-1).values
    logp = torch.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def split_names(thresholds: Sequence[float]) -> tuple[str, ...]:
    """``easy/medium/hard`` for the paper's three thresholds, ``level0..`` otherwise."""
    return ("easy", "medium", "hard") if len(thresholds) == 3 else tuple(f"level{i}" for i in range(len(thresholds)))


def difficulty_splits(entropy: float | None, thresholds: Sequence[float]) -> tuple[str, ...]:
    """All splits a position belongs to (nested like the paper's): 1.2 -> ("easy", "medium")."""
    if entropy is None or not math.isfinite(entropy):
        return ()
    return tuple(name for name, th in zip(split_names(thresholds), thresholds) if entropy > th)


def difficulty_label(entropy: float | None, thresholds: Sequence[float]) -> str | None:
    """The hardest split a position belongs to, or None below the first threshold / unscored."""
    splits = difficulty_splits(entropy, thresholds)
    return splits[-1] if splits else None


def pack_first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens (first fit, longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sequence of {n} tokens does not fit a row of {capacity}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def packing_supported() -> bool:
    """Whether this transformers turns restarting position_ids into a block-diagonal mask."""
    try:
        from transformers import masking_utils  # lazy: a feature probe (absent in older transformers)
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class ProxyScorer:
    """Scores documents (lists of token ids) with a Hugging Face causal LM.

    ``batch_tokens`` bounds the tokens of one forward pass; rows are ``max_seq_len`` long (the
    attention mask is rows x max_seq_len^2 booleans). ``device=None`` picks CUDA when present.
    """

    def __init__(self, model_dir: str | os.PathLike, top_k: int = 16, device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, batch_tokens: int = 16384, max_seq_len: int = 4096,
                 attn_implementation: str = "sdpa"):
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(f"proxy model {str(model_dir)!r} is not a Hugging Face model directory "
                              "(no config.json); set data.proxy_model / --proxy to one")
        if top_k < 1:
            raise ValueError(f"data.entropy_top_k={top_k} must be >= 1")
        if batch_tokens < 2 or max_seq_len < 2:
            raise ValueError("batch_tokens and max_seq_len must be >= 2")
        self.path = path
        self.top_k = top_k
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype,
                                                              attn_implementation=attn_implementation)
        except Exception as exc:
            raise ConfigError(f"could not load the proxy model in {path}: {exc}") from exc
        self.model.to(self.device).eval()
        cfg = self.model.config
        self.vocab_size = int(cfg.vocab_size)
        model_max = getattr(cfg, "max_position_embeddings", None) or max_seq_len
        self.max_seq_len = int(min(max_seq_len, model_max, batch_tokens))
        self.rows_per_batch = max(1, batch_tokens // self.max_seq_len)
        self.overlap = self.max_seq_len // 4
        self.config_hash = _sha256(path / "config.json")
        self._softcap = getattr(cfg, "final_logit_softcapping", None)
        self._logit_scale = getattr(cfg, "logit_scale", None)
        self.packing = packing_supported()
        self.tokens_scored = 0
        self.seconds = 0.0

    # -- helpers
    def _windows(self, n: int) -> list[tuple[int, int, int]]:
        """(start, end, first scored index within the window) covering positions 1..n-1 once."""
        if n <= self.max_seq_len:
            return [(0, n, 1)] if n >= 2 else []
        out = [(0, self.max_seq_len, 1)]
        step = self.max_seq_len - self.overlap
        s = step
        while out[-1][1] < n:
            out.append((s, min(s + self.max_seq_len, n), self.overlap))
            s += step
        return out

    @torch.no_grad()
    def _entropies(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        # Logits are written once and read by topk: on CPU keep a chunk in cache (~16 MB, measured
        # 2x faster than 512 MB chunks), on GPU make it large (~512 MB) to fill the device.
        budget = (1 << 27) if hidden.device.type == "cuda" else (1 << 22)
        chunk = max(1, budget // weight.shape[0])
        out = []
        for i in range(0, hidden.shape[0], chunk):
            logits = torch.nn.functional.linear(hidden[i:i + chunk], weight, bias).float()
            if self._logit_scale is not None:
                logits = logits * float(self._logit_scale)
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            out.append(topk_entropy(logits, self.top_k))
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    # -- public
    @torch.no_grad()
    def score(self, docs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Entropy per position for each document: float32 array of the document's length, [0] = NaN."""
        t0 = time.perf_counter()
        out = [np.full(len(d), np.nan, dtype=np.float32) for d in docs]
        pieces: list[tuple[int, int, int, int]] = []  # (doc, start, end, first scored)
        for di, d in enumerate(docs):
            if len(d) and max(d) >= self.vocab_size:
                raise ValueError(f"token id {max(d)} >= the proxy's vocab_size {self.vocab_size}: the proxy "
                                 f"{self.path} does not use this tokenizer")
            pieces.extend((di, s, e, first) for s, e, first in self._windows(len(d)))
        lengths = [e - s for _, s, e, _ in pieces]
        if self.packing:
            rows = pack_first_fit(lengths, self.max_seq_len)
        else:  # one window per row, right-padded: causal attention never reads the padding
            rows = [[i] for i in sorted(range(len(pieces)), key=lambda i: -lengths[i])]
        base = self.model.base_model
        for b in range(0, len(rows), self.rows_per_batch):
            batch = rows[b:b + self.rows_per_batch]
            width = max(sum(pieces[i][2] - pieces[i][1] for i in row) for row in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            pos = torch.zeros(len(batch), width, dtype=torch.long)
            gather_rows, gather_cols, targets = [], [], []
            for r, row in enumerate(batch):
                o = 0
                for i in row:
                    di, s, e, first = pieces[i]
                    n = e - s
                    ids[r, o:o + n] = torch.as_tensor(docs[di][s:e], dtype=torch.long)
                    pos[r, o:o + n] = torch.arange(n)
                    js = range(first, n)  # window index j is predicted from the hidden state at j-1
                    gather_rows.extend([r] * len(js))
                    gather_cols.extend(o + j - 1 for j in js)
                    targets.extend((di, s + j) for j in js)
                    o += n
                pos[r, o:] = torch.arange(width - o)  # padding: its own segment, never read
            hidden = base(input_ids=ids.to(self.device), position_ids=pos.to(self.device),
                          use_cache=False).last_hidden_state
            sel = hidden[torch.as_tensor(gather_rows, device=self.device),
                         torch.as_tensor(gather_cols, device=self.device)]
            ent = self._entropies(sel).cpu().numpy()
            for (di, t), h in zip(targets, ent):
                out[di][t] = h
            self.tokens_scored += int(sum(pieces[i][2] - pieces[i][1] for row in batch for i in row))
        self.seconds += time.perf_counter() - t0
        return out
