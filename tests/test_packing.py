"""Sequence packing: the packed layout by hand, the THD context-parallel split, and the policy on
real megatron-core giving the padded path's numbers.

* :func:`pack_micro_batches` by hand: per-sequence positions, labels that never cross into the
  next sequence, loss on the positions that predict response tokens, ``cu_seqlens``, budgets;
* the THD CP split keeps chunks r and 2cp-1-r of EVERY sequence (hand-derived) and the gather
  restores the row; per-rank GRPO losses of packed rows sum to the full loss (seq-mean too);
* one spawn of two ranks, TP=2, PP=2, DP=2 (unequal micro-batch counts) and MoE EP=2 (against
  the padded path at EP=1): the policy's log-probs of packed micro-batches (THD, block-diagonal
  attention, chunked log-probs) equal the padded path's (unchunked), and one GRPO step gives the
  same loss, gradient norm and updated weights.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from megatron_rpt.config import RLConfig
from megatron_rpt.rl import (
    PackingSpec,
    build_micro_batches,
    grpo_loss,
    packed_context_parallel_positions,
    response_values,
    split_for_context_parallel,
)
from megatron_rpt.rl.context_parallel import unsplit_packed_context_parallel


def test_packed_layout_by_hand():
    samples = [([11, 12, 13], [21, 22]), ([31], [41, 42, 43]), ([51, 52], [])]
    spec = PackingSpec(max_tokens=16, pad_to_multiple_of=4)
    (mb,) = build_micro_batches(samples, [0.5, [1.0, 2.0, 3.0], 9.0], micro_batch_size=1, pad_token_id=0,
                                old_logprobs=[[-0.1, -0.2], [-1.0, -2.0, -3.0], []], packing=spec)
    # first-fit decreasing: sample 0 (5 tokens), sample 1 (4), sample 2 (2); 11 tokens -> row of 12
    assert mb["sample_index"].tolist() == [0, 1, 2]
    assert mb["tokens"].tolist() == [[11, 12, 13, 21, 22, 31, 41, 42, 43, 51, 52, 0]]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 0]]
    # the last token of each sequence predicts nothing: no label crosses a boundary
    assert mb["labels"].tolist() == [[12, 13, 21, 22, 0, 41, 42, 43, 0, 52, 0, 0]]
    assert mb["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0]]
    assert mb["advantages"].tolist() == [[0, 0, 0.5, 0.5, 0, 1, 2, 3, 0, 0, 0, 0]]
    torch.testing.assert_close(mb["old_logprobs"], torch.tensor([[0, 0, -0.1, -0.2, 0, -1, -2, -3, 0, 0, 0, 0.0]]))
    assert mb["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, -1]]
    assert mb["cu_seqlens"].tolist() == [0, 5, 9, 11, 12] == mb["cu_seqlens_padded"].tolist()
    assert int(mb["max_seqlen"]) == 5
    per_sample = response_values([mb], [mb["old_logprobs"]])
    assert [v.tolist() for v in per_sample] == [pytest.approx([-0.1, -0.2]), [-1, -2, -3], []]


def test_budgets_fixed_length_and_every_sample_once():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 30, (40,), generator=g).tolist()
    samples = [([1] * (n // 2), [2] * (n - n // 2)) for n in lengths]
    spec = PackingSpec(max_tokens=64, pad_to_multiple_of=8)
    micro = build_micro_batches(samples, [1.0] * 40, micro_batch_size=1, packing=spec)
    assert sorted(i for mb in micro for i in mb["sample_index"].tolist()) == list(range(40))
    assert all(mb["tokens"].shape[1] <= 64 and mb["tokens"].shape[1] % 8 == 0 for mb in micro)
    assert len(micro) <= math.ceil(sum(lengths) / 64) + 2  # FFD stays near the lower bound
    fixed = build_micro_batches(samples, [1.0] * 40, micro_batch_size=1,
                                packing=PackingSpec(max_tokens=64, fixed_length=True))
    assert {mb["tokens"].shape for mb in fixed} == {(1, 64)}
    # with context parallelism every sequence is padded to 2*cp
    cp = build_micro_batches(samples, [1.0] * 40, micro_batch_size=1,
                             packing=PackingSpec(max_tokens=64, pad_to_multiple_of=8, seq_multiple=4))
    assert all((mb["cu_seqlens_padded"].diff() % 4 == 0).all() for mb in cp)
    with pytest.raises(ValueError, match=r"sample 0 is 70 tokens > the micro-batch token budget 64"):
        build_micro_batches([([1] * 40, [2] * 30)], [1.0], micro_batch_size=1, packing=spec)
    with pytest.raises(ValueError, match="empty prompt"):
        build_micro_batches([([], [2])], [1.0], micro_batch_size=1, packing=spec)


def test_token_budget_below_the_longest_sample_is_a_config_error():
    from megatron_rpt.config import ConfigError, from_dict

    base = {"data": {"max_prompt_tokens": 100}, "rollout": {"max_response_tokens": 28}}
    with pytest.raises(ConfigError, match=r"rl.micro_batch_tokens=120 is below the longest sample.*= 128; "
                                          r"raise it to at least 128"):
        from_dict(base, ["rl.micro_batch_tokens=120"])
    from_dict(base, ["rl.micro_batch_tokens=128"])
    from_dict(base, ["rl.micro_batch_tokens=120", "rl.sequence_packing=false"])  # unused without packing


def test_thd_context_parallel_split_by_hand_and_round_trip():
    cu = torch.tensor([0, 8, 12, 16], dtype=torch.int32)  # sequences of 8, 4, 4 tokens; cp=2 -> 4 chunks each
    assert packed_context_parallel_positions(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 15]
    assert packed_context_parallel_positions(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 13, 14]
    row = {"tokens": torch.arange(16).unsqueeze(0), "cu_seqlens_padded": cu, "cu_seqlens": cu,
           "x": torch.randn(1, 16, 3)}
    parts = [split_for_context_parallel(row, 2, r) for r in range(2)]
    assert parts[1]["tokens"].tolist() == [[2, 3, 4, 5, 9, 10, 13, 14]]
    assert torch.equal(parts[0]["cu_seqlens"], cu)  # global offsets pass through (TE takes them whole)
    assert torch.equal(unsplit_packed_context_parallel([p["x"] for p in parts], cu), row["x"])
    with pytest.raises(ValueError, match="not a multiple of 2\\*context_parallel=4"):
        packed_context_parallel_positions(torch.tensor([0, 6], dtype=torch.int32), 2, 0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_packed_grpo_loss_equals_padded_and_cp_shares_sum_to_it(aggregation):
    """float64: the loss of packed rows (sequences told apart by segment_ids) equals the padded
    rows' loss; split over CP=2 (per-sequence THD split), the shares sum to it (seq-mean-token-mean
    is refused with CP and needs whole sequences)."""
    g = torch.Generator().manual_seed(1)
    samples = [(torch.randint(1, 9, (p,), generator=g).tolist(), torch.randint(1, 9, (r,), generator=g).tolist())
               for p, r in ((3, 4), (2, 1), (5, 6), (1, 3), (2, 0))]
    adv = torch.randn(5, generator=g, dtype=torch.float64).tolist()
    old = [(torch.randn(len(r), generator=g) * 0.3 - 1).tolist() for _, r in samples]
    cfg = RLConfig(loss_aggregation=aggregation, clip_low=0.2, clip_high=0.28)
    padded = build_micro_batches(samples, adv, micro_batch_size=5, old_logprobs=old, same_shape=False)
    packed = build_micro_batches(samples, adv, micro_batch_size=1, old_logprobs=old,
                                 packing=PackingSpec(max_tokens=40, seq_multiple=4, pad_to_multiple_of=4))
    num_tokens, num_seqs = sum(len(r) for _, r in samples), sum(1 for _, r in samples if r)

    def new_logprobs(mb):  # a deterministic stand-in for the policy: a function of (token, label)
        return torch.sin(mb["tokens"].double() * 0.7 + mb["labels"].double() * 0.3) - 1.5

    def loss(mb, **kw):
        out, _ = grpo_loss(new_logprobs(mb), mb["old_logprobs"].double(), mb["advantages"].double(),
                           mb["loss_mask"], cfg=cfg, num_global_tokens=num_tokens, num_global_seqs=num_seqs, **kw)
        return out

    want = sum(loss(mb) for mb in padded)
    got = sum(loss(mb, segment_ids=mb["segment_ids"]) for mb in packed)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    if aggregation != "seq-mean-token-mean":
        shares = [loss(part := split_for_context_parallel(mb, 2, r), segment_ids=part["segment_ids"])
                  for mb in packed for r in range(2)]
        assert sum(shares).item() == pytest.approx(want.item(), rel=1e-12)


# ----------------------------------------------------------------------------- the policy, 2 ranks

LAYOUTS = {  # name: (family, parallel settings)
    "tp2": ("qwen2", {"tensor_parallel": 2}),  # (sequence parallel: not with the local spec's torch norms)
    "pp2": ("qwen2", {"pipeline_parallel": 2}),
    "dp2": ("qwen2", {}),
    "ep2": ("qwen3_moe", {"expert_parallel": 2}),
}
LENGTHS = [(3, 4), (6, 1), (2, 9), (5, 5), (4, 2), (7, 3), (2, 6), (3, 3), (5, 8), (4, 1)]


def _samples() -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(11)
    return [(torch.randint(3, 900, (a,), generator=g).tolist(), torch.randint(3, 900, (b,), generator=g).tolist())
            for a, b in LENGTHS]


def _policy(cfg, arch, model_dir):
    from megatron_rpt.model.build import build_model_chunks
    from megatron_rpt.trainer.optimizer import build_optimizer, wrap_ddp
    from megatron_rpt.trainer.policy import MegatronPolicy
    from megatron_rpt.weights.load import load_hf_into_model

    chunks = build_model_chunks(arch, cfg.model, cfg.parallel)
    load_hf_into_model(chunks, model_dir, arch)
    chunks = wrap_ddp(chunks, cfg)
    optimizer, scheduler = build_optimizer(chunks, cfg)
    return MegatronPolicy(cfg, arch, chunks, optimizer, scheduler)


def _run_layout(name: str, model_dir: str) -> dict:
    from megatron.core import parallel_state

    from megatron_rpt.config import from_dict
    from megatron_rpt.distributed import all_reduce_numbers, init_distributed
    from megatron_rpt.model.hf_config import load_hf_config

    _, parallel = LAYOUTS[name]
    base = {"model": {"hf_config": model_dir, "make_vocab_size_divisible_by": 8},
            "parallel": parallel, "data": {"max_prompt_tokens": 8}, "rollout": {"max_response_tokens": 10,
                                                                                "temperature": 0.7},
            "rl": {"loss_aggregation": "seq-mean-token-mean", "entropy_coef": 0.01, "clip_high": 0.28,
                   "micro_batch_size": 2, "micro_batch_tokens": 24},
            "optim": {"lr": 0.1, "eps": 1.0, "weight_decay": 0.0}}  # eps=1: a smooth update (no Adam sign flips)
    # The padded reference runs without expert parallelism: its rows are as wide as each rank's
    # longest sample, and the expert all-gather of two ranks needs equal shapes.
    padded_cfg = from_dict(base, ["rl.sequence_packing=false", "rl.logprob_chunk_tokens=0",
                                  "parallel.expert_parallel=1"])
    packed_cfg = from_dict(base, ["rl.logprob_chunk_tokens=5"])
    arch = load_hf_config(model_dir)
    everything = _samples()
    # DP=2: rank 0 gets 7 samples, rank 1 gets 3 (packed: different micro-batch counts)
    out: dict = {}
    for kind, cfg in (("padded", padded_cfg), ("packed", packed_cfg)):
        p = cfg.parallel
        init_distributed(p.tensor_parallel, p.pipeline_parallel, 1, p.expert_parallel, seed=3)
        dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        out["dp"] = dp
        # DP=2: rank 0 gets 7 samples, rank 1 gets 3 (packed: different micro-batch counts)
        mine = everything if dp == 1 else (everything[:7] if dp_rank == 0 else everything[7:])
        adv = [((i * 37) % 11 - 5) / 4 for i in range(len(mine))]
        tokens, seqs = all_reduce_numbers([sum(len(r) for _, r in mine), len(mine)],
                                          group=parallel_state.get_data_parallel_group())
        policy = _policy(cfg, arch, model_dir)
        micro = build_micro_batches(mine, adv, micro_batch_size=cfg.rl.micro_batch_size, packing=policy.packing)
        lp = policy.compute_logprobs(micro)
        out[f"{kind}_micro"] = len(micro)
        if lp is not None:
            per_sample = response_values(micro, lp)
            out[f"{kind}_lp"] = per_sample
            for mb, values in zip(micro, lp):
                # off-policy old log-probs (the same per sample in both layouts): clipping is active
                mb["old_logprobs"] = values + 0.3 * torch.cos(mb["tokens"].double() * 1.3).float() * mb["loss_mask"]
        else:
            for mb in micro:
                mb["old_logprobs"] = torch.zeros_like(mb["loss_mask"])
        metrics = policy.train_step(micro, int(tokens), int(seqs))
        out[f"{kind}_metrics"] = metrics
        out[f"{kind}_params"] = {_global_expert_name(n, p.expert_parallel, arch.num_experts): t.detach().clone()
                                 for c in policy.chunks for n, t in c.named_parameters()}
    return out


def _global_expert_name(name: str, ep: int, num_experts: int | None) -> str:
    """``local_experts.j`` of EP rank r is expert ``r * (experts / ep) + j`` of the EP=1 model."""
    from megatron.core import parallel_state

    if ep == 1:
        return name
    first = parallel_state.get_expert_model_parallel_rank() * (num_experts // ep)
    return re.sub(r"local_experts\.(\d+)\.", lambda m: f"local_experts.{first + int(m.group(1))}.", name)


def _worker(model_dirs: dict[str, str]) -> dict:
    return {name: _run_layout(name, model_dirs[LAYOUTS[name][0]]) for name in LAYOUTS}


@pytest.mark.slow
def test_packed_policy_equals_padded_at_tp_pp_dp_ep(tmp_path):
    from helpers_models import make_tiny_hf_checkpoint

    from megatron_rpt.distributed import spawn

    dirs = {"qwen2": str(make_tiny_hf_checkpoint("qwen2", tmp_path / "qwen2", tokenizer=False)),
            "qwen3_moe": str(make_tiny_hf_checkpoint("qwen3_moe", tmp_path / "moe", tokenizer=False))}
    results = spawn(_worker, 2, dirs, timeout=900)
    for name in LAYOUTS:
        for rank, r in enumerate(results):
            got = r[name]
            if "packed_lp" in got:  # the last pipeline stage
                assert len(got["packed_lp"]) == len(got["padded_lp"]), (name, rank)
                for a, b in zip(got["packed_lp"], got["padded_lp"]):
                    torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=f"{name} rank {rank}")
            pm, pd = got["packed_metrics"], got["padded_metrics"]
            assert pm["grad_norm"] == pytest.approx(pd["grad_norm"], rel=1e-4), (name, rank, pm, pd)
            for key in ("loss", "pg_loss", "num_tokens", "num_seqs", "clip_fraction", "entropy"):
                if key in pd:
                    assert pm[key] == pytest.approx(pd[key], rel=1e-4, abs=1e-6), (name, rank, key, pm, pd)
            # (EP=2 holds half the experts, renamed to their EP=1 names: compare those)
            assert got["packed_params"].keys() <= got["padded_params"].keys()
            for pname, value in got["padded_params"].items():
                if pname not in got["packed_params"]:
                    assert name == "ep2" and ".experts." in pname, (name, pname)
                    continue
                torch.testing.assert_close(got["packed_params"][pname], value, rtol=0, atol=2e-5,
                                           msg=f"{name} rank {rank} {pname}")
    # an independent reference: transformers, one sequence at a time, at the rollout temperature
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(dirs["qwen2"], torch_dtype=torch.float32).eval()
    everything = _samples()
    for name, rank, first in (("tp2", 0, 0), ("dp2", 0, 0), ("dp2", 1, 7)):
        for k, got in enumerate(results[rank][name]["packed_lp"]):
            prompt, response = everything[first + k]
            with torch.no_grad():
                logits = hf(torch.tensor([prompt + response])).logits[0].double() / 0.7
            want = logits.log_softmax(-1)[len(prompt) - 1:-1].gather(-1, torch.tensor(response).unsqueeze(-1))
            torch.testing.assert_close(got.double(), want.squeeze(-1), rtol=0, atol=1e-4, msg=f"{name} {k}")
    tp = results[0]["tp2"]
    assert tp["packed_micro"] < tp["padded_micro"]  # packing fills budgets: fewer micro-batches
    assert results[0]["tp2"]["padded_metrics"]["clip_fraction"] > 0
    # DP=2 with 7 and 3 samples: the ranks ran different packed micro-batch counts, the same update
    assert results[0]["dp2"]["packed_micro"] != results[1]["dp2"]["packed_micro"]
    # EP=2: the rank with fewer micro-batches was filled up to the other's count (no hang), same update
    assert results[0]["ep2"]["dp"] == 2
