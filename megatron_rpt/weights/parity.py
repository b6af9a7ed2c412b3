"""Logits parity between Hugging Face transformers and the Megatron model.

Owns:
  * :func:`hf_logits`: the reference forward (transformers, float32, eager attention);
  * :func:`megatron_logits`: a forward-only pass through Megatron's pipeline schedule
    (``get_forward_backward_func``; the real P2P path for PP > 1), vocab-parallel logits
    gathered over the tensor-parallel group;
  * :func:`megatron_logits_rank`: the per-rank entry point (build, load from a HF directory or
    a Megatron checkpoint, forward) used by ``tools/convert.py verify`` and the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from transformers import AutoModelForCausalLM

from megatron_rpt.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rpt.distributed import init_distributed, spawn
from megatron_rpt.model.build import build_model_chunks
from megatron_rpt.model.cpu_compat import default_device
from megatron_rpt.model.hf_config import load_hf_config
from megatron_rpt.topology import Topology
from megatron_rpt.weights.convert import NO_TIMEOUT, check_parallel_layout, read_meta
from megatron_rpt.weights.hf_io import HFCheckpointReader
from megatron_rpt.weights.load import load_hf_into_model, load_megatron_checkpoint, validate_hf_checkpoint
from megatron_rpt.weights.megatron_ckpt import resolve_checkpoint_dir


def random_tokens(vocab_size: int, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=gen)


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """Reference logits [batch, seq, vocab] from transformers in float32 with eager attention."""
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model(input_ids=tokens, use_cache=False).logits.float()


@torch.no_grad()
def megatron_logits(model_chunks: Sequence[torch.nn.Module], tokens: torch.Tensor,
                    topo: Topology | None = None) -> torch.Tensor | None:
    """Full padded-vocab logits [batch, seq, padded_vocab] on the last pipeline stage, None elsewhere.

    Every rank must pass the same ``tokens``. One micro-batch, no attention mask (causal).
    Leaves the chunks in eval mode. ``topo`` defaults to the one read from Megatron.
    """
    batch, seq_len = tokens.shape
    tokens = tokens.to(default_device())
    position_ids = torch.arange(seq_len, device=tokens.device).unsqueeze(0).expand(batch, seq_len)

    def forward_step(data_iterator, model):
        input_ids = next(data_iterator)
        output = model(input_ids, position_ids, attention_mask=None)

        def collect(output_tensor, non_loss_data=False):
            return output_tensor

        return output, collect

    for chunk in model_chunks:
        chunk.eval()
    chunks = list(model_chunks)
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter([tokens]) for _ in chunks] if len(chunks) > 1 else iter([tokens]),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=1,
        seq_length=seq_len,
        micro_batch_size=batch,
        forward_only=True,
        collect_non_loss_data=True,
    )
    topo = topo if topo is not None else Topology.current()
    if not topo.is_last_stage:
        return None
    logits = outputs[0]
    if topo.tp_size > 1:
        logits = gather_from_tensor_model_parallel_region(logits.contiguous())
    return logits.float().cpu()


def is_megatron_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / "metadata.json").is_file() or (path / "latest_checkpointed_iteration.txt").is_file()


def megatron_logits_rank(
    source: str,
    arch_dir: str,
    tokens: torch.Tensor,
    tensor_parallel: int,
    pipeline_parallel: int,
    make_vocab_size_divisible_by: int = 128,
    params_dtype: str = "float32",
    layout: dict[str, Any] | None = None,
) -> torch.Tensor | None:
    """Per-rank: build the model at (TP, PP), load ``source``, return the real-vocab logits.

    ``layout``: further ``parallel.*`` fields (expert_parallel, expert_tensor_parallel, first_stage_layers, ...).

    ``source`` is a HF model directory (loaded with ``load_hf_into_model``) or a Megatron dist
    checkpoint (loaded, re-sharded, with ``load_megatron_checkpoint``); ``arch_dir`` holds the
    HF config.json. Only tensor-parallel rank 0 of the last pipeline stage returns the logits.
    """
    parallel_cfg = ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                  **(layout or {}))
    parallel_cfg.check()
    init_distributed(tensor_parallel, pipeline_parallel, expert_parallel=parallel_cfg.expert_parallel,
                     expert_tensor_parallel=parallel_cfg.expert_tensor_parallel)
    topo = Topology.current()
    arch = load_hf_config(arch_dir)
    model_cfg = ModelConfig(params_dtype=params_dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    chunks = build_model_chunks(arch, model_cfg, parallel_cfg, {"perform_initialization": False})
    if is_megatron_checkpoint(source):
        load_megatron_checkpoint(chunks, source)
    else:
        load_hf_into_model(chunks, source, arch, topo=topo)
    logits = megatron_logits(chunks, tokens, topo)
    if logits is None or topo.tp_rank != 0:
        return None
    return logits[..., : arch.vocab_size].contiguous()


def verify(
    hf_dir: str | Path,
    ckpt_dir: str | Path | None = None,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seq_len: int = 32,
    batch: int = 2,
    seed: int = 0,
    atol: float = 1e-4,
) -> dict:
    """Compare transformers' logits on ``hf_dir`` with Megatron's at (TP, PP); return the report.

    Megatron loads ``ckpt_dir`` (a converted dist checkpoint) when given, else ``hf_dir``
    directly. Launches TP*PP ranks.
    """
    arch = check_parallel_layout(hf_dir, tensor_parallel, pipeline_parallel)
    if seq_len < 1 or batch < 1:
        raise ConfigError(f"--seq-len {seq_len} and --batch {batch} must be >= 1")
    if seq_len > arch.max_position_embeddings:
        raise ConfigError(f"--seq-len {seq_len} exceeds max_position_embeddings={arch.max_position_embeddings}")
    divisible_by = 128
    with HFCheckpointReader(hf_dir) as reader:  # clean errors here rather than in every rank
        validate_hf_checkpoint(reader, arch)
    if ckpt_dir is not None:
        resolve_checkpoint_dir(ckpt_dir)
        divisible_by = int(read_meta(ckpt_dir).get("make_vocab_size_divisible_by", 128))
    tokens = random_tokens(arch.vocab_size, batch, seq_len, seed)
    reference = hf_logits(hf_dir, tokens)
    source = str(ckpt_dir if ckpt_dir is not None else hf_dir)
    results = spawn(megatron_logits_rank, tensor_parallel * pipeline_parallel, source, str(hf_dir), tokens,
                    tensor_parallel, pipeline_parallel, divisible_by, timeout=NO_TIMEOUT)
    logits = next(r for r in results if r is not None)
    diff = (reference - logits).abs()
    max_diff = float(diff.max())
    return {
        "max_abs_logit_diff": max_diff,
        "tp": tensor_parallel,
        "pp": pipeline_parallel,
        "atol": atol,
        "ok": bool(max_diff <= atol),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(reference.abs().max()),
        "argmax_agreement": float((reference.argmax(-1) == logits.argmax(-1)).float().mean()),
        "source": "megatron-checkpoint" if ckpt_dir is not None else "hf",
        "family": arch.family,
        "batch": batch,
        "seq_len": seq_len,
        "seed": seed,
    }
