"""The weight bridge's bucket plan as a pure function: no ``torch.distributed``, no Megatron.

Topologies are built by hand (:class:`Topology`), this rank's parameters are tensors of the
shard shapes Megatron allocates, written out here from the architecture (not from the
package's shape maths): Qwen2 with hidden 8, 4 heads in 2 KV groups of head_dim 2 (q/k/v rows
8 + 4 + 4 = 16), MLP width 12, vocabulary 10 padded to 16.
"""

from __future__ import annotations

import pytest
import torch

from megatron_rpt.bridge.buckets import Transfer, owners_from_stages, plan_buckets, stage_holdings
from megatron_rpt.bridge.name_maps import NameMap
from megatron_rpt.model.hf_config import arch_from_dict
from megatron_rpt.model.mcore_compat import ModelClass
from megatron_rpt.topology import Topology

ARCH = arch_from_dict({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 2, "intermediate_size": 12, "num_hidden_layers": 2,
                       "vocab_size": 10, "tie_word_embeddings": False})
MOE = arch_from_dict({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 8, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "head_dim": 2, "intermediate_size": 12, "moe_intermediate_size": 6,
                      "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 1, "vocab_size": 10,
                      "tie_word_embeddings": False})
PADDED = 16
L = "decoder.layers.{layer}."
# Megatron template -> (full shape, TP-split dimension or None)
FULL = {
    "embedding.word_embeddings.weight": ((PADDED, 8), 0),
    L + "input_layernorm.weight": ((8,), None),
    L + "self_attention.linear_qkv.weight": ((16, 8), 0),
    L + "self_attention.linear_qkv.bias": ((16,), 0),
    L + "self_attention.linear_proj.weight": ((8, 8), 1),
    L + "pre_mlp_layernorm.weight": ((8,), None),
    L + "mlp.linear_fc1.weight": ((24, 8), 0),
    L + "mlp.linear_fc2.weight": ((8, 12), 1),
    "decoder.final_layernorm.weight": ((8,), None),
    "output_layer.weight": ((PADDED, 8), 0),
}
MOE_SHAPES = {  # last two name parts -> shape (TP=1): experts of width 6, 4 experts, QK-norm, no bias
    "word_embeddings": (PADDED, 8), "input_layernorm": (8,), "linear_qkv": (16, 8), "q_layernorm": (2,),
    "k_layernorm": (2,), "linear_proj": (8, 8), "pre_mlp_layernorm": (8,), "router": (4, 8), "linear_fc1": (12, 8),
    "linear_fc2": (8, 6), "final_layernorm": (8,), "output_layer": (PADDED, 8),
}
LAST_STAGE = {"decoder.final_layernorm.weight", "output_layer.weight"}


def _names(arch=ARCH) -> NameMap:
    return NameMap(arch, model_class=ModelClass.GPT)


def _shard(shape: tuple[int, ...], dim: int | None, tp: int) -> tuple[int, ...]:
    return shape if dim is None else tuple(s // tp if i == dim else s for i, s in enumerate(shape))


def _local(tp: int, layers: list[int], first: bool, last: bool) -> dict:
    """This rank's parameters as Megatron allocates them on a stage holding ``layers``."""
    local = {}
    for template, (shape, dim) in FULL.items():
        if "{layer}" in template:
            keys = [(template, layer, None) for layer in layers]
        elif (template in LAST_STAGE and last) or (template not in LAST_STAGE and first):
            keys = [(template, None, None)]
        else:
            keys = []
        for key in keys:
            local[key] = torch.zeros(_shard(shape, dim, tp))
    return local


def _plan(topo: Topology, stages: list[dict], bucket_bytes: int = 10**9, dtype=None, names=None):
    names = names or _names()
    owners = owners_from_stages([stage_holdings(s) for s in stages])
    return plan_buckets(names, PADDED, topo, owners, stages[topo.pp_rank], bucket_bytes, dtype)


def _hf_order(buckets) -> list[tuple[str, int | None]]:
    return [(s.tmap.mcore, s.layer) for b in buckets for s in b.slots]


def test_tp2_gathers_sharded_tensors_and_sends_replicated_ones_whole():
    topo = Topology(tp_size=2, tp_rank=1)
    buckets = _plan(topo, [_local(2, [0, 1], True, True)])
    seen = {}
    for bucket in buckets:
        assert bucket.staged == (bucket.kind is Transfer.TP_GATHER)  # replicated: views, no collective
        for slot in bucket.slots:
            shape, dim = FULL[slot.tmap.mcore]
            seen[(slot.tmap.mcore, slot.layer)] = bucket.kind
            assert slot.shape == _shard(shape, dim, 2), slot.tmap.mcore
            assert bucket.kind is (Transfer.WHOLE if dim is None else Transfer.TP_GATHER), slot.tmap.mcore
            assert bucket.group_size == (1 if dim is None else 2)
    assert len(seen) == 3 + 7 * 2  # every tensor of the model, once
    # within one transfer kind the slots follow the HF export order: embedding, layer 0, layer 1, head
    gathered = [k for b in buckets if b.kind is Transfer.TP_GATHER for k in ((s.tmap.mcore, s.layer) for s in b.slots)]
    assert gathered[0] == ("embedding.word_embeddings.weight", None)
    assert gathered[-1] == ("output_layer.weight", None)
    assert [layer for _, layer in gathered[1:-1]] == [0] * 5 + [1] * 5


def test_buckets_respect_the_size_limit_and_pack_back_to_back():
    topo = Topology(tp_size=2, tp_rank=0)
    limit = 2 * 8 * 8 * 4  # bytes: the gathered vocabulary shard (8 x 8 fp32 per member) fills one bucket
    buckets = _plan(topo, [_local(2, [0, 1], True, True)], bucket_bytes=limit)
    assert len(buckets) > 3
    for bucket in buckets:
        assert bucket.nbytes <= limit or len(bucket.slots) == 1
        offsets = [s.offset for s in bucket.slots]
        assert offsets == [sum(s.numel for s in bucket.slots[:i]) for i in range(len(bucket.slots))]
        assert bucket.member_numel == sum(s.numel for s in bucket.slots)
        assert bucket.nbytes == bucket.member_numel * bucket.group_size * 4


def test_pp2_owner_stage_holds_the_sources_every_stage_has_the_same_plan():
    stages = [_local(1, [0], True, False), _local(1, [1], False, True)]
    plans = [_plan(Topology(pp_size=2, pp_rank=r), stages) for r in (0, 1)]
    assert [[(b.stage, b.kind, len(b.slots)) for b in p] for p in plans] == \
           [[(b.stage, b.kind, len(b.slots)) for b in plans[0]]] * 2
    assert _hf_order(plans[0]) == _hf_order(plans[1])
    for rank, plan in enumerate(plans):
        for bucket in plan:
            assert bucket.staged  # broadcast over the pipeline
            for slot in bucket.slots:
                owner = 1 if slot.layer == 1 or slot.tmap.mcore in LAST_STAGE else 0
                assert bucket.stage == owner, slot.tmap.mcore
                assert (slot.source is not None) == (owner == rank)


def test_no_collective_and_no_cast_means_zero_copy_views():
    buckets = _plan(Topology(), [_local(1, [0, 1], True, True)])
    assert all(not b.staged and b.kind is Transfer.WHOLE for b in buckets)
    assert all(s.source is not None for b in buckets for s in b.slots)
    # a cast alone needs no staging either (the engine's own copy casts)
    assert not any(b.staged for b in _plan(Topology(), [_local(1, [0, 1], True, True)], dtype=torch.bfloat16))


def test_transport_dtype_splits_buckets_by_dtype():
    local = _local(2, [0, 1], True, True)
    local[(L + "self_attention.linear_qkv.bias", 0, None)] = torch.zeros(8, dtype=torch.bfloat16)
    owners = owners_from_stages([stage_holdings(local)])
    mixed = plan_buckets(_names(), PADDED, Topology(tp_size=2), owners, local, 10**9, None)
    assert {b.dtype for b in mixed} == {torch.float32, torch.bfloat16}
    cast = plan_buckets(_names(), PADDED, Topology(tp_size=2), owners, local, 10**9, torch.bfloat16)
    assert {b.dtype for b in cast} == {torch.bfloat16}


def test_ep2_carries_local_expert_j_of_every_expert_rank_in_one_slot():
    names = _names(MOE)
    topo = Topology(ep_size=2, ep_rank=1)
    local = {}
    for tmap, layer, expert in names.iter_all():
        if tmap.per_expert and expert // 2 != topo.ep_rank:
            continue  # experts 0, 1 live on EP rank 0
        local[(tmap.mcore, layer, expert)] = torch.zeros(MOE_SHAPES[tmap.mcore.split(".")[-2]])
    owners = owners_from_stages([stage_holdings(local)])
    buckets = plan_buckets(names, PADDED, topo, owners, local, 10**9, None)
    experts = [(s.tmap.mcore, s.expert, s.source) for b in buckets if b.kind is Transfer.EXPERT_GATHER for s in b.slots]
    assert sorted((m.split(".")[-2], e) for m, e, _ in experts) == [("linear_fc1", 0), ("linear_fc1", 1),
                                                                    ("linear_fc2", 0), ("linear_fc2", 1)]
    for template, j, source in experts:  # local slot j carries this rank's global expert 2 + j
        assert source is local[(template, 0, 2 + j)]
    assert {b.group_size for b in buckets if b.kind is Transfer.EXPERT_GATHER} == {2}


def test_wrong_shard_shape_names_the_tensor_and_both_shapes():
    local = _local(2, [0, 1], True, True)
    local[(L + "mlp.linear_fc1.weight", 1, None)] = torch.zeros(24, 8)  # a TP=1 shard on a TP=2 rank
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.mlp\.linear_fc1\.weight has shape \(24, 8\).*\(12, 8\)"):
        _plan(Topology(tp_size=2), [local])


def test_tensor_on_no_stage_or_two_stages_is_an_error():
    full = _local(1, [0, 1], True, True)
    del full[(L + "mlp.linear_fc2.weight", 1, None)]
    with pytest.raises(RuntimeError, match="1 parameters .* are on no pipeline stage"):
        _plan(Topology(), [full])
    with pytest.raises(RuntimeError, match="held by pipeline stages 0 and 1"):
        owners_from_stages([stage_holdings(_local(1, [0], True, False)),
                            stage_holdings(_local(1, [0, 1], False, True))])
