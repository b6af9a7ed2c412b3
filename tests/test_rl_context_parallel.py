"""Context parallelism around the model: the load-balanced split, its inverse, and the loss scale.

The model itself cannot run at CP=2 here (Megatron-Core's local spec asserts CP == 1; CP
needs Transformer Engine on a GPU), so these tests check everything the GRPO path adds:

* the split keeps chunks r and 2cp-1-r (hand-derived positions) and equals Megatron's own
  ``get_batch_on_this_cp_rank`` on real CP ranks; gathering the shares restores the batch;
* Megatron's real DDP averages gradients over dp*cp ranks (the assumption of the scale);
* in float64, per-rank GRPO losses scaled by ``grpo_loss_scale`` and then by Megatron's real
  ``forward_step_calc_loss`` and DDP's 1/(dp*cp) sum to the full-batch loss and gradient;
* CP without Transformer Engine (or with seq-mean-token-mean) is a ConfigError.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rpt.config import ConfigError, RLConfig, load_config
from megatron_rpt.rl import (
    check_context_parallel_config,
    grpo_loss,
    grpo_loss_scale,
    sequence_multiple,
    split_for_context_parallel,
    unsplit_context_parallel,
)


def _batch(b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, 50, (b, s), generator=g),
        "position_ids": torch.arange(s).expand(b, s).contiguous(),
        "loss_mask": (torch.rand(b, s, generator=g) > 0.3).float(),
        "logits": torch.randn(b, s, 5, generator=g),
        "prompt_lengths": torch.arange(b),  # per-sample: must pass through untouched
    }


def test_split_positions_by_hand_and_round_trip():
    batch = _batch(2, 8)
    rank0 = split_for_context_parallel(batch, 2, 0)
    rank1 = split_for_context_parallel(batch, 2, 1)
    assert rank0["position_ids"][0].tolist() == [0, 1, 6, 7]
    assert rank1["position_ids"][0].tolist() == [2, 3, 4, 5]
    assert rank0["logits"].shape == (2, 4, 5)
    assert torch.equal(rank0["prompt_lengths"], batch["prompt_lengths"])
    # cp=3, s=12: chunks of 2; rank r keeps chunks r and 5-r.
    three = [split_for_context_parallel(batch | {"tokens": torch.zeros(2, 12), "position_ids":
                                                 torch.arange(12).expand(2, 12)}, 3, r) for r in range(3)]
    assert [t["position_ids"][0].tolist() for t in three] == [[0, 1, 10, 11], [2, 3, 8, 9], [4, 5, 6, 7]]
    for key in ("tokens", "position_ids", "loss_mask", "logits"):
        assert torch.equal(unsplit_context_parallel([rank0[key], rank1[key]]), batch[key])
    with pytest.raises(ValueError, match="multiple of 2\\*context_parallel=4"):
        split_for_context_parallel(_batch(1, 6), 2, 0)


def test_sequence_multiple():
    assert sequence_multiple(1, 1, False) == 8
    assert sequence_multiple(1, 2, True) == 8
    assert sequence_multiple(2, 1, False) == 8
    assert sequence_multiple(8, 1, False) == 16
    assert sequence_multiple(2, 4, True) == 16
    assert sequence_multiple(3, 2, True) == 24


def _cp_rank_checks():
    """On each of 2 ranks with CP=2: split vs Megatron's own split, gather, DDP averaging group."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import MegatronModule, TransformerConfig

    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.model.mcore_compat import get_batch_on_this_cp_rank
    from megatron_rpt.rl import gather_from_context_parallel

    init_distributed(context_parallel=2)
    rank = parallel_state.get_context_parallel_rank()
    batch = _batch(3, 16, seed=7)
    ours = split_for_context_parallel(batch, 2, rank)
    cp_group = parallel_state.get_context_parallel_group()
    theirs = get_batch_on_this_cp_rank({k: v.clone() for k, v in batch.items() if k != "prompt_lengths"}, cp_group)
    same_split = all(torch.equal(ours[k], theirs[k]) for k in theirs)
    gathered = {k: gather_from_context_parallel(ours[k], cp_group) for k in ("tokens", "loss_mask", "logits")}
    gather_ok = all(torch.equal(gathered[k], batch[k]) for k in gathered)

    # DDP's gradient reduction group: each rank's gradient is (rank + 1); the result is their mean
    # over dp*cp ranks, i.e. 1.5 here with dp=1, cp=2.
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)

    class Tiny(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.w = torch.nn.Parameter(torch.zeros(4))

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), Tiny())
    (ddp.module.w * float(dist.get_rank() + 1)).sum().backward()
    ddp.finish_grad_sync()
    return {
        "same_split": same_split,
        "gather_ok": gather_ok,
        "dp": parallel_state.get_data_parallel_world_size(),
        "dp_cp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
        "grad": ddp.module.w.main_grad.tolist(),
    }


def test_split_matches_megatron_and_gather_restores_on_real_cp_ranks():
    from megatron_rpt.distributed import spawn

    for result in spawn(_cp_rank_checks, 2):
        assert result["same_split"] and result["gather_ok"]
        assert (result["dp"], result["dp_cp"]) == (1, 2)
        assert result["grad"] == pytest.approx([1.5] * 4)


def _logprobs_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum"])
def test_scaled_cp_losses_sum_to_global_loss_and_gradient(aggregation):
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.transformer import TransformerConfig

    dp, cp, num_micro, mbs, s, vocab = 2, 2, 3, 2, 8, 7
    n = dp * num_micro * mbs
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(n, s, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (n, s), generator=g)
    # Right-padded rows with responses of different lengths (and one empty row).
    mask = torch.zeros(n, s, dtype=torch.float64)
    for i, (start, length) in enumerate(zip(torch.randint(0, 3, (n,), generator=g).tolist(),
                                            torch.randint(0, 6, (n,), generator=g).tolist())):
        mask[i, start:start + length] = 1.0
    mask[0] = 0.0
    data = {
        "labels": labels,
        "loss_mask": mask,
        "advantages": torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, s).contiguous(),
        "old_logprobs": torch.randn(n, s, generator=g, dtype=torch.float64) * 0.3 - 2.0,
        "ref_logprobs": torch.randn(n, s, generator=g, dtype=torch.float64) * 0.3 - 2.0,
    }
    cfg = RLConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.05, entropy_coef=0.01, loss_aggregation=aggregation)
    num_tokens, num_seqs = int(mask.sum()), int((mask.sum(-1) > 0).sum())

    def loss_of(batch, logits_part, **kw):
        logprobs, entropy = _logprobs_entropy(logits_part, batch["labels"])
        return grpo_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["loss_mask"],
                         ref_logprobs=batch["ref_logprobs"], entropy=entropy, cfg=cfg, **kw)

    full_loss, _ = loss_of(data, logits)
    (full_grad,) = torch.autograd.grad(full_loss, logits)

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    scale = grpo_loss_scale(num_micro, dp)
    total = torch.zeros((), dtype=torch.float64)
    for dp_rank in range(dp):
        for cp_rank in range(cp):
            for m in range(num_micro):
                rows = slice((dp_rank * num_micro + m) * mbs, (dp_rank * num_micro + m + 1) * mbs)
                whole = {k: v[rows] for k, v in data.items()} | {"tokens": labels[rows], "logits": logits[rows]}
                mine = split_for_context_parallel(whole, cp, cp_rank)

                def loss_func(output):
                    loss, metrics = loss_of(mine, output, num_global_tokens=num_tokens, num_global_seqs=num_seqs)
                    return loss * scale, metrics

                store: list = []
                out = forward_step_calc_loss(None, mine["logits"], loss_func, config, None, False, num_micro,
                                             store, cp_group_size=cp, is_last_stage=True)
                out = out[0] if isinstance(out, tuple) else out
                # DDP: every rank's gradient times 1/(dp*cp), summed over the dp*cp ranks.
                total = total + out / (dp * cp)
    (grad,) = torch.autograd.grad(total, logits)
    assert total.item() == pytest.approx(full_loss.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(grad, full_grad, rtol=1e-10, atol=1e-13)
    assert full_grad.abs().sum() > 0


def _cfg(*overrides: str):
    return load_config(None, list(overrides), validate_paths=False)


def test_context_parallel_config_errors():
    from megatron_rpt.trainer.trainer import Trainer

    check_context_parallel_config(_cfg("parallel.context_parallel=1"))
    # packing (the default) with CP is refused whatever the machine
    with pytest.raises(ConfigError, match=r"rl.sequence_packing=true is not supported with "
                                          r"parallel.context_parallel=2.*set rl.sequence_packing=false"):
        check_context_parallel_config(_cfg("parallel.context_parallel=2"))
    unpacked = "rl.sequence_packing=false"
    with pytest.raises(ConfigError, match="parallel.context_parallel=2 needs Transformer Engine"):
        check_context_parallel_config(_cfg("parallel.context_parallel=2", "model.transformer_impl=local", unpacked))
    with pytest.raises(ConfigError, match="rl.loss_aggregation=seq-mean-token-mean"):
        check_context_parallel_config(_cfg("parallel.context_parallel=2", "rl.loss_aggregation=seq-mean-token-mean",
                                           unpacked))
    if not torch.cuda.is_available():  # auto resolves to the local spec on a CPU machine
        with pytest.raises(ConfigError, match="parallel.context_parallel=2 needs Transformer Engine"):
            Trainer(_cfg("parallel.context_parallel=2", unpacked))
