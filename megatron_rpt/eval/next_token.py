"""Standard next-token prediction: is the argmax of the model's next-token distribution the truth?

Owns: :class:`DecoderLogits` (last-position logits of many contexts through the plain-torch
:class:`~megatron_rpt.rollout.torch_decoder.Decoder`: contexts that are prefixes of one another --
the positions of one document -- share one forward pass of the longest (:func:`prefix_chains`);
those rows are length-sorted and right-padded into batches of at most ``batch_tokens`` tokens),
:func:`greedy_next_tokens` (the same answer through
any rollout engine: one greedy token, for engines that expose no logits, e.g. vLLM),
:func:`context_token_ids` (the raw context x_<t of a problem, without the prompt template) and
:func:`standard_accuracy` (accuracy per difficulty bucket).

The question asked is the paper's "standard next-token prediction": the model reads the plain
context (no instruction, no chat template) and its most likely next token must be the
ground-truth token x_t, compared by token id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from megatron_rpt.data.entropy_filter import topk_entropy
from megatron_rpt.data.tokenizer import encode_document
from megatron_rpt.eval.report import BucketAccumulator
from megatron_rpt.rollout.base import SamplingParams

__all__ = [
    "DecoderLogits",
    "prefix_chains",
    "greedy_next_tokens",
    "context_token_ids",
    "standard_correct",
    "standard_accuracy",
    "argmax_and_entropy",
]


def context_token_ids(problem: Any, tokenizer: Any = None) -> list[int]:
    """x_<t of a problem as token ids.

    Uses ``problem.context_ids`` when the data pipeline provides it (the document's own ids).
    Otherwise ``problem.context_text`` is re-encoded; the context is cut on token boundaries of
    the document, so this gives the same ids except where BPE would merge differently across the
    left cut or inside the last pre-token (rare; it can change the last context token).
    """
    ids = getattr(problem, "context_ids", None)
    if ids is not None and len(ids):
        return [int(i) for i in ids]
    text = getattr(problem, "context_text", None)
    if text is None:
        text = getattr(problem, "context", None)
    if text is None or tokenizer is None:
        raise ValueError("problem has neither context_ids nor context_text + a tokenizer; cannot build the "
                         "plain next-token context")

    ids = encode_document(tokenizer, text)
    if not ids:
        raise ValueError(f"problem {getattr(problem, 'doc_id', '?')}@{getattr(problem, 'position', '?')} "
                         "has an empty context")
    return ids


def _is_prefix(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) <= len(b) and list(b[:len(a)]) == list(a)


def prefix_chains(contexts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of ``contexts`` grouped so that every member of a group is a prefix of its last one.

    In lexicographic order the contexts starting with ``c`` follow ``c`` directly, so ``c`` is a
    prefix of some later context iff it is a prefix of the next one: one pass makes the chains.
    """
    order = sorted(range(len(contexts)), key=lambda i: tuple(contexts[i]))
    chains: list[list[int]] = []
    current: list[int] = []
    for k, i in enumerate(order):
        current.append(i)
        if k + 1 == len(order) or not _is_prefix(contexts[i], contexts[order[k + 1]]):
            chains.append(current)
            current = []
    return chains


class DecoderLogits:
    """``logits(contexts) -> [len(contexts), vocab]`` float32 logits after each context's last token."""

    def __init__(self, decoder: torch.nn.Module, batch_tokens: int = 8192):
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens={batch_tokens} must be >= 1")
        self.decoder = decoder
        self.batch_tokens = batch_tokens

    @torch.inference_mode()
    def __call__(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        if any(len(c) == 0 for c in contexts):
            raise ValueError("every context needs at least one token")
        # One row per chain: its longest context; every member is read at its own last index.
        chains = sorted(prefix_chains(contexts), key=lambda ch: len(contexts[ch[-1]]))
        device = self.decoder.device
        out: list[torch.Tensor | None] = [None] * len(contexts)
        start = 0
        while start < len(chains):
            # Grow the batch while (rows x longest row) fits the token budget; sorted by length,
            # so the last row added is the longest.
            end = start + 1
            while end < len(chains) and (end + 1 - start) * len(contexts[chains[end][-1]]) <= self.batch_tokens:
                end += 1
            rows = chains[start:end]
            width = len(contexts[rows[-1][-1]])
            reads = max(len(ch) for ch in rows)
            tokens = torch.zeros(len(rows), width, dtype=torch.long)
            index = torch.zeros(len(rows), reads, dtype=torch.long)
            for b, ch in enumerate(rows):
                head = contexts[ch[-1]]
                tokens[b, : len(head)] = torch.as_tensor(list(head), dtype=torch.long)
                lasts = [len(contexts[i]) - 1 for i in ch]
                index[b] = torch.tensor(lasts + [lasts[-1]] * (reads - len(ch)))  # padded reads are ignored
            # Right padding is safe: attention is causal and each context is read at its own last token.
            logits = self.decoder(tokens.to(device), logits_index=index.to(device)).float().cpu()
            for b, ch in enumerate(rows):
                for k, i in enumerate(ch):
                    out[i] = logits[b, k]
            start = end
        return torch.stack(out)  # type: ignore[arg-type]


def greedy_next_tokens(engine: Any, contexts: Sequence[Sequence[int]]) -> list[int]:
    """The argmax next token of each context through ``engine.generate`` (one greedy token)."""
    params = SamplingParams(n=1, temperature=0.0, max_tokens=1)
    outputs = engine.generate([list(c) for c in contexts], params)
    return [int(samples[0].token_ids[0]) for samples in outputs]


def standard_correct(predicted_ids: Sequence[int], problems: Sequence[Any]) -> list[float]:
    """1.0 where the predicted token id is the ground-truth next token ``target_ids[0]``."""
    if len(predicted_ids) != len(problems):
        raise ValueError(f"{len(predicted_ids)} predictions for {len(problems)} problems")
    return [1.0 if int(p) == int(prob.target_ids[0]) else 0.0 for p, prob in zip(predicted_ids, problems)]


def standard_accuracy(correct: Sequence[float], entropies: Sequence[float | None], thresholds: Sequence[float],
                      docs: Sequence[Any] | None = None) -> BucketAccumulator:
    """Accuracy per bucket; ``docs`` (each position's document) clusters the confidence interval."""
    acc = BucketAccumulator(thresholds)
    for i, (c, e) in enumerate(zip(correct, entropies, strict=True)):
        acc.add(e, c, None if docs is None else docs[i])
    return acc


def argmax_and_entropy(logits_fn: Callable[[Sequence[Sequence[int]]], torch.Tensor],
                       contexts: Sequence[Sequence[int]], top_k: int = 16,
                       chunk: int = 256) -> tuple[list[int], list[float]]:
    """(argmax next-token id, top-``top_k`` entropy in nats) of each context.

    The entropy is the data pipeline's difficulty measure (:func:`megatron_rpt.data.entropy_filter.topk_entropy`),
    used when the evaluated model is its own difficulty scorer.
    """
    ids: list[int] = []
    entropies: list[float] = []
    for i in range(0, len(contexts), chunk):
        logits = logits_fn(contexts[i:i + chunk])
        ids.extend(int(t) for t in logits.argmax(dim=-1).tolist())
        entropies.extend(float(h) for h in topk_entropy(logits, top_k).tolist())
    return ids, entropies
