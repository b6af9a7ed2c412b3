"""The next-token-prediction baseline: the same policy trained with the plain language-model loss.

Owns ``train.objective=ntp``: :class:`NTPStream` (the train split's documents -- the very documents
RPT draws its positions from, the held-out ones excluded -- tokenised as the data pipeline does,
concatenated with EOS between them and cut into windows of ``ntp.seq_length + 1`` tokens, each
token predicted once; resumable), :func:`lm_micro_batches` and :func:`ntp_step`, one optimizer step
of ``ntp.sequences_per_step`` sequences on the Megatron policy (every parallel layout it supports).

This is the paper's "continual next-token prediction" comparison: a user runs it at the token
budget an RPT run spent (``compute/trained_tokens`` in its metrics; ``benchmarks/mini_table1.py``
matches them) and evaluates both with ``python -m megatron_rpt.eval``. Windows cross document
boundaries without resetting attention, as ordinary pre-training does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_rpt.config import Config, ConfigError
from megatron_rpt.data import ProblemStream
from megatron_rpt.distributed import all_reduce_numbers

__all__ = ["NTPStream", "lm_micro_batches", "ntp_step"]

STATE_VERSION = 1


class NTPStream:
    """Windows of ``seq_length + 1`` token ids from this data-parallel rank's training documents."""

    def __init__(self, cfg: Config, tokenizer: Any, dp_rank: int = 0, dp_size: int = 1):
        if tokenizer.eos_token_id is None:
            raise ConfigError("train.objective=ntp separates documents with the tokenizer's EOS token, and "
                              f"{getattr(tokenizer, 'name_or_path', 'the tokenizer')} has none; set model.tokenizer "
                              "to one that defines eos_token")
        # The documents and their split, not the positions: no proxy scoring is needed.
        data = dataclasses.replace(cfg.data, proxy_model=None)
        self.docs = ProblemStream(data, tokenizer, dp_rank=dp_rank, dp_size=dp_size, split="train")
        self.seq_length = cfg.ntp.seq_length
        self.eos = int(tokenizer.eos_token_id)
        self.buffer: list[int] = []

    def next_sequence(self) -> list[int]:
        """``seq_length + 1`` ids; the last one is the first of the next window, so each is a label once."""
        while len(self.buffer) < self.seq_length + 1:
            self.buffer.extend(self.docs.next_document().token_ids)
            self.buffer.append(self.eos)
        window = self.buffer[:self.seq_length + 1]
        del self.buffer[:self.seq_length]
        return window

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "objective": "ntp", "docs": self.docs.state_dict(),
                "buffer": list(self.buffer), "seq_length": self.seq_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("objective") != "ntp" or state.get("version") != STATE_VERSION:
            raise ValueError("the checkpoint's data state is not an NTP stream's (train.objective changed?); "
                             "resume with the objective the run was started with")
        if state["seq_length"] != self.seq_length:
            raise ValueError(f"ntp.seq_length={self.seq_length} but the checkpoint was written with "
                             f"{state['seq_length']}; resume with the same value")
        self.docs.load_state_dict(state["docs"])
        self.buffer = [int(i) for i in state["buffer"]]


def lm_micro_batches(windows: list[list[int]], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``tokens = w[:-1]``, ``labels = w[1:]``, every position in the loss. All micro-batches have one
    shape (pipeline p2p needs it): the last one is filled up with empty rows outside the loss."""
    out = []
    for start in range(0, len(windows), micro_batch_size):
        chunk = windows[start:start + micro_batch_size]
        mask = torch.ones(micro_batch_size, len(chunk[0]) - 1, dtype=torch.float32)
        mask[len(chunk):] = 0.0
        chunk = chunk + [[0] * len(chunk[0])] * (micro_batch_size - len(chunk))
        rows = torch.tensor(chunk, dtype=torch.long)
        tokens, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        out.append({"tokens": tokens, "labels": labels, "loss_mask": mask,
                    "position_ids": torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()})
    return out


def ntp_step(trainer: Any) -> dict[str, float]:
    """One optimizer step of the LM loss on this rank's share of ``ntp.sequences_per_step`` windows."""
    cfg = trainer.cfg
    per_rank = cfg.ntp.sequences_per_step // trainer.dp_size
    with trainer.timer("data"):
        windows = [trainer.stream.next_sequence() for _ in range(per_rank)]
        micro = lm_micro_batches(windows, cfg.ntp.micro_batch_size)
    tokens = per_rank * cfg.ntp.seq_length
    (global_tokens,) = all_reduce_numbers([tokens], group=trainer.topo.dp_group)
    with trainer.timer("update"):
        train_metrics = trainer.policy.lm_train_step(micro, int(global_tokens))
    metrics = {f"train/{k}": v for k, v in train_metrics.items()}
    # The compute axis of the scaling fit: a forward and a backward over every token, nothing generated.
    metrics.update({"compute/trained_tokens": float(global_tokens), "compute/generated_tokens": 0.0,
                    "ntp/sequences": float(per_rank)})
    return metrics
