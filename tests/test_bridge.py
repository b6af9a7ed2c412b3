"""The Megatron -> rollout-engine weight bridge on REAL megatron-core (gloo, CPU, 2 ranks).

One spawn of two ranks runs every parallel layout (each spawn pays megatron's import time):
TP=2 (Qwen2 untied with QKV bias, Qwen3 tied with QK-norm), PP=2, PP=2 x virtual 2 (tied),
EP=2 (Qwen3-MoE) and TP=1 (data parallel, the zero-copy path). Every parameter gets random
values first (norms and biases included, vocabulary padding rows too) so that a swapped or
mis-sliced tensor cannot hide behind ones / zeros.

Each rank's stream is checked against a reference built independently of the bridge's
buckets and collectives: every parameter gathered with a plain ``all_gather`` over its TP
group, merged with ``tp_merge``, the stages / expert ranks exchanged with
``all_gather_object``, then exported with ``hf_state_dict_from_full``. Independent of the
name map entirely: the key set and shapes equal a ``transformers`` model's state dict, and
the bridged weights loaded into ``transformers`` give Megatron's own TP=2 logits.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict

import pytest
import torch

from megatron_rpt.distributed import spawn

BASE = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "vocab_size": 300,  # padded to 512 (TP=2) / 384 (TP=1): padding rows must not leak
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 128,
}
QWEN2 = {**BASE, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 2,
         "tie_word_embeddings": False}
QWEN3 = {**BASE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_hidden_layers": 4,
         "tie_word_embeddings": True}
QWEN3_MOE = {**BASE, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_hidden_layers": 2,
             "tie_word_embeddings": False, "intermediate_size": 0, "num_experts": 4, "num_experts_per_tok": 2,
             "moe_intermediate_size": 32, "norm_topk_prob": True}
BUCKET_MB = 0.15  # 157 KB: several buckets per model, yet larger than the largest tensor (vocab 512x64 fp32)
TOKENS = torch.tensor([[3, 17, 250, 9, 42, 7, 128, 299]])


class Recorder:
    """A stand-in rollout engine: keeps a copy of every tensor it is sent."""

    def __init__(self):
        self.got: dict[str, torch.Tensor] = {}

    def update_weights(self, stream):
        for name, tensor in stream:
            assert name not in self.got, f"{name} sent twice"
            self.got[name] = tensor.clone()


class Retainer:
    """A stand-in for an engine that keeps the pushed tensors and reads them later (as vLLM's
    in-place reload does until a layer is complete); ``declare``: whether it says so."""

    def __init__(self, declare: bool):
        self.retains_pushed_tensors = declare
        self.held: list[tuple[str, torch.Tensor]] = []

    def update_weights(self, stream):
        self.held.extend(stream)

    @property
    def got(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self.held}


# --------------------------------------------------------------------------- worker side


def _build(cfg: dict, tp: int = 1, pp: int = 1, ep: int = 1, vp: int | None = None):
    from megatron_rpt.config import ModelConfig, ParallelConfig
    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.model.build import build_model_chunks
    from megatron_rpt.model.hf_config import arch_from_dict

    init_distributed(tp, pp, 1, ep, vp, seed=1)
    arch = arch_from_dict(cfg)
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, virtual_pipeline=vp)
    chunks = build_model_chunks(arch, ModelConfig(), parallel)
    _randomise(chunks, arch)
    return arch, chunks


def _expert_offset(arch) -> int:
    from megatron.core import parallel_state as ps

    if not arch.num_experts:
        return 0
    return ps.get_expert_model_parallel_rank() * arch.num_experts // ps.get_expert_model_parallel_world_size()


@torch.no_grad()
def _randomise(chunks, arch) -> None:
    """Deterministic random values keyed by global name (+ TP rank for sharded tensors), so
    replicas agree and shards differ."""
    from megatron.core import parallel_state as ps

    from megatron_rpt.bridge.name_maps import named_parameters_global

    for chunk in chunks:
        for name, param in named_parameters_global(chunk, _expert_offset(arch)):
            sharded = getattr(param, "tensor_model_parallel", False)
            if sharded and ".local_experts." in name:
                shard = ps.get_expert_tensor_parallel_rank()
            else:
                shard = ps.get_tensor_model_parallel_rank() if sharded else 0
            if name == "output_layer.weight" and arch.tie_word_embeddings:
                name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
            gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{shard}".encode()))
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise)


def _reference(chunks, arch) -> dict[str, torch.Tensor]:
    """The full HF state dict by plain per-parameter collectives (no buckets, no bridge)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rpt.bridge.name_maps import NameMap, hf_state_dict_from_full, named_parameters_global, tp_merge

    names = NameMap(arch)
    full: dict[str, torch.Tensor] = {}
    for chunk in chunks:
        for name, param in named_parameters_global(chunk, _expert_offset(arch)):
            if name == "output_layer.weight" and arch.tie_word_embeddings:
                continue
            tensor = param.detach().clone()
            if getattr(param, "tensor_model_parallel", False):
                expert = ".local_experts." in name
                group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
                size = dist.get_world_size(group)
                if size > 1:
                    shards = [torch.empty_like(tensor) for _ in range(size)]
                    dist.all_gather(shards, tensor, group=group)
                    tensor = tp_merge(names.lookup(name)[0], shards)
            full[name] = tensor
    for group, size in ((ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_world_size()),
                        (ps.get_expert_model_parallel_group(), ps.get_expert_model_parallel_world_size())):
        if size > 1:
            parts = [None] * size
            dist.all_gather_object(parts, full, group=group)
            full = {k: v for part in parts for k, v in part.items()}
    return hf_state_dict_from_full(full, arch)


def _megatron_logits(chunks) -> torch.Tensor:
    """Full-vocabulary logits of a single-stage model (vocab shards gathered over TP)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    (model,) = chunks
    model.eval()
    with torch.no_grad():
        positions = torch.arange(TOKENS.shape[1]).unsqueeze(0)
        local = model(TOKENS, positions, None)
        parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _run(chunks, arch, engine=True, retainer: bool | None = None, **kwargs) -> dict:
    """One sync into a Recorder (``retainer`` None) or a Retainer declaring ``retainer``."""
    from megatron_rpt.bridge import WeightBridge

    bridge = WeightBridge(chunks, arch, bucket_mb=kwargs.pop("bucket_mb", BUCKET_MB), **kwargs)
    recorder = Recorder() if retainer is None else Retainer(declare=retainer)
    stats = bridge.sync(recorder if engine else None)
    out = {"got": recorder.got, "stats": asdict(stats), "bucket_bytes": bridge.bucket_bytes}
    if retainer is not None:  # bytes it holds that are not the parameters themselves
        params = {p.untyped_storage().data_ptr() for chunk in chunks for p in chunk.parameters()}
        out["held_bytes"] = sum(t.numel() * t.element_size() for _, t in recorder.held
                                if t.untyped_storage().data_ptr() not in params)
    return out


def _worker() -> dict:
    import torch.distributed as dist

    out: dict = {}
    # TP=2 -------------------------------------------------------------------
    for key, cfg in (("tp2_qwen2", QWEN2), ("tp2_qwen3", QWEN3)):
        arch, chunks = _build(cfg, tp=2)
        out[key] = _run(chunks, arch)
        out[key]["ref"] = _reference(chunks, arch)
        out[key]["logits"] = _megatron_logits(chunks)
        if key == "tp2_qwen2":
            out["tp2_bf16"] = _run(chunks, arch, dtype=torch.bfloat16)
            out["tp2_bf16"]["ref"] = out[key]["ref"]
            # An engine that keeps the pushed tensors: q/k/v weight and bias are merged through
            # the un-fuse buffer, buckets through the staging buffer.
            for declare in (True, False):
                run = f"tp2_retained_{'declared' if declare else 'undeclared'}"
                out[run] = _run(chunks, arch, retainer=declare)
                out[run]["ref"] = out[key]["ref"]
            # one bridge, two syncs: the second one sees the updated weights (buffers are reused)
            from megatron_rpt.bridge import WeightBridge

            bridge = WeightBridge(chunks, arch, bucket_mb=BUCKET_MB)
            bridge.sync(Recorder())
            with torch.no_grad():
                for chunk in chunks:
                    for param in chunk.parameters():
                        param.mul_(-2.0).add_(0.5)  # an optimizer step, in place
            second = Recorder()
            bridge.sync(second)
            out["tp2_second_sync"] = {"got": second.got, "ref": _reference(chunks, arch)}
    # PP=2, and PP=2 with two virtual stages per rank (interleaved layers, tied embeddings) ---------
    arch, chunks = _build(QWEN2, pp=2)
    out["pp2_qwen2"] = _run(chunks, arch)
    out["pp2_qwen2"]["ref"] = _reference(chunks, arch)
    # a rank without an engine still serves the collectives
    out["pp2_one_engine"] = _run(chunks, arch, engine=dist.get_rank() == 0, dtype=torch.bfloat16)
    out["pp2_one_engine"]["ref"] = out["pp2_qwen2"]["ref"]
    out["pp2_retained_bf16"] = _run(chunks, arch, retainer=True, dtype=torch.bfloat16)
    out["pp2_retained_bf16"]["ref"] = out["pp2_qwen2"]["ref"]
    arch, chunks = _build(QWEN3, pp=2, vp=2)
    out["pp2_vp2_qwen3"] = _run(chunks, arch)
    out["pp2_vp2_qwen3"]["ref"] = _reference(chunks, arch)
    out["pp2_vp2_qwen3"]["chunks"] = len(chunks)
    # EP=2 -------------------------------------------------------------------
    # Megatron's all-to-all dispatcher creates a CUDA stream in __init__ (only used in forward);
    # this CPU run builds the MoE model but never runs it.
    torch.cuda.Stream = lambda *a, **k: None  # type: ignore[assignment]
    arch, chunks = _build(QWEN3_MOE, ep=2)
    out["ep2_moe"] = _run(chunks, arch)
    out["ep2_moe"]["ref"] = _reference(chunks, arch)
    out["ep2_retained"] = _run(chunks, arch, retainer=True)
    out["ep2_retained"]["ref"] = out["ep2_moe"]["ref"]
    # TP=1 (data parallel): zero-copy views ------------------------------------------------------
    arch, chunks = _build(QWEN2)
    out["tp1_qwen2"] = _run(chunks, arch)
    out["tp1_qwen2"]["ref"] = _reference(chunks, arch)
    out["tp1_bf16"] = _run(chunks, arch, dtype=torch.bfloat16)
    out["tp1_bf16"]["ref"] = out["tp1_qwen2"]["ref"]
    out["tp1_retained"] = _run(chunks, arch, retainer=True)
    out["tp1_retained"]["ref"] = out["tp1_qwen2"]["ref"]
    return out


# --------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def runs():
    return spawn(_worker, 2, timeout=300)


def _arch(cfg):
    from megatron_rpt.model.hf_config import arch_from_dict

    return arch_from_dict(cfg)


def _assert_same(got: dict, ref: dict, dtype: torch.dtype | None = None) -> None:
    assert set(got) == set(ref)
    for name, expected in ref.items():
        expected = expected.to(dtype) if dtype else expected
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        assert torch.equal(got[name], expected), f"{name} differs"


CASES = ["tp2_qwen2", "tp2_qwen3", "pp2_qwen2", "pp2_vp2_qwen3", "ep2_moe", "tp1_qwen2"]
CFG_OF = {"qwen2": QWEN2, "qwen3": QWEN3, "moe": QWEN3_MOE}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_stream_is_the_full_hf_state_bit_for_bit(runs, case):
    from megatron_rpt.bridge.name_maps import NameMap

    cfg = CFG_OF[case.rsplit("_", 1)[1]]
    for rank, result in enumerate(runs):
        run = result[case]
        assert sorted(run["got"]) == sorted(NameMap(_arch(cfg)).hf_names()), f"rank {rank}"
        _assert_same(run["got"], run["ref"])
        stats = run["stats"]
        assert stats["num_tensors"] == len(run["ref"])
        assert stats["bytes"] == sum(t.numel() * t.element_size() for t in run["ref"].values())


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2_qwen2", "tp2_qwen3"])  # transformers 5 fuses MoE experts in memory
def test_keys_and_shapes_match_transformers(runs, case):
    import transformers

    cfg = CFG_OF[case.rsplit("_", 1)[1]]
    arch_name = cfg["architectures"][0]
    config = getattr(transformers, arch_name.replace("ForCausalLM", "Config"))(**cfg)
    model = getattr(transformers, arch_name)(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        expected.pop("lm_head.weight")
    got = {k: tuple(v.shape) for k, v in runs[0][case]["got"].items()}
    assert got == expected


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2_qwen2", "tp2_qwen3"])
def test_bridged_weights_give_megatron_logits_in_transformers(runs, case):
    import transformers

    cfg = CFG_OF[case.rsplit("_", 1)[1]]
    arch_name = cfg["architectures"][0]
    config = getattr(transformers, arch_name.replace("ForCausalLM", "Config"))(**cfg)
    model = getattr(transformers, arch_name)(config).eval()
    missing, unexpected = model.load_state_dict(runs[0][case]["got"], strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if cfg["tie_word_embeddings"] else set())
    with torch.no_grad():
        hf_logits = model(TOKENS).logits
    mcore_logits = runs[0][case]["logits"][..., : cfg["vocab_size"]]
    torch.testing.assert_close(hf_logits, mcore_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_dtype_cast_on_the_fly(runs):
    for result in runs:
        # collectives move the engine dtype (the packing copy casts); replicated tensors need no
        # collective and come as the fp32 parameters (the engine's own copy casts)
        run = result["tp2_bf16"]
        assert set(run["got"]) == set(run["ref"])
        for name, ref in run["ref"].items():
            sharded = not name.endswith("norm.weight")
            assert run["got"][name].dtype == (torch.bfloat16 if sharded else torch.float32), name
            assert torch.equal(run["got"][name].to(torch.bfloat16), ref.to(torch.bfloat16)), name
        assert run["stats"]["num_buckets"] > 0
        # no collective: views of the fp32 parameters, the engine's own copy casts (one pass)
        run = result["tp1_bf16"]
        _assert_same(run["got"], run["ref"])
        assert run["stats"]["num_buckets"] == 0
        assert run["stats"]["bytes"] == sum(t.numel() * 2 for t in run["ref"].values())  # counted in bf16


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2_retained_declared", "pp2_retained_bf16", "ep2_retained", "tp1_retained"])
def test_engine_that_retains_tensors_gets_memory_nothing_overwrites(runs, case):
    """An engine that reads pushed tensors after asking for more (vLLM's layerwise reload)
    must still see every tensor's own values at the end of the sync."""
    for result in runs:
        run = result[case]
        _assert_same(run["got"], run["ref"], dtype=torch.bfloat16 if "bf16" in case else None)
        # it held everything to the end: the accounting must count all of it alive at once
        assert run["held_bytes"] > 0
        assert run["stats"]["peak_extra_bytes"] >= run["held_bytes"]


@pytest.mark.slow
def test_retaining_engine_that_does_not_say_so_sees_reused_buffers(runs):
    # The hazard the declaration exists for: without it the staging / un-fuse buffers are
    # reused, so tensors kept past the next item are overwritten by later ones.
    run = runs[0]["tp2_retained_undeclared"]
    differ = [n for n, t in run["ref"].items() if not torch.equal(run["got"][n], t)]
    assert any("q_proj" in n for n in differ) and any("lm_head" in n or "embed" in n for n in differ)


@pytest.mark.slow
def test_second_sync_sends_the_updated_weights(runs):
    for result in runs:
        run = result["tp2_second_sync"]
        _assert_same(run["got"], run["ref"])
        assert not torch.equal(run["ref"]["model.norm.weight"], result["tp2_qwen2"]["ref"]["model.norm.weight"])


@pytest.mark.slow
def test_rank_without_engine_serves_the_collectives(runs):
    got = runs[0]["pp2_one_engine"]
    _assert_same(got["got"], got["ref"], dtype=torch.bfloat16)
    assert runs[1]["pp2_one_engine"]["got"] == {}
    assert runs[1]["pp2_one_engine"]["stats"]["bytes"] == 0


@pytest.mark.slow
def test_virtual_pipeline_chunks(runs):
    assert runs[0]["pp2_vp2_qwen3"]["chunks"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2_qwen2", "tp2_qwen3", "pp2_qwen2", "pp2_vp2_qwen3", "ep2_moe", "tp2_bf16"])
def test_peak_extra_memory_is_one_bucket_plus_one_tensor(runs, case):
    for result in runs:
        run = result[case]
        stats, bucket = run["stats"], run["bucket_bytes"]
        itemsize = 2 if "bf16" in case else 4
        padded_vocab = 512 if case.startswith("tp2") else 384  # 128 * TP rounded up from 300
        largest = max(padded_vocab * 64, max(t.numel() for t in run["ref"].values())) * itemsize
        assert largest <= bucket
        assert stats["num_buckets"] > 1
        assert 0 < stats["max_bucket_bytes"] <= bucket
        assert stats["max_bucket_bytes"] <= stats["peak_extra_bytes"] <= bucket + largest


@pytest.mark.slow
def test_zero_copy_without_collectives_or_cast(runs):
    stats = runs[0]["tp1_qwen2"]["stats"]
    assert stats["num_buckets"] == 0
    # everything is a view of the parameters except the un-interleaved q/k/v weights of a layer
    qkv = (64 + 32 + 32) * 64 * 4
    assert stats["peak_extra_bytes"] == qkv


# --------------------------------------------------------------------------- no processes


def test_hf_from_tp_shards_equals_merge_then_export():
    from megatron_rpt.bridge import hf_from_tp_shards, hf_slice_of_shard
    from megatron_rpt.bridge.name_maps import NameMap, from_mcore, tp_merge, tp_shard
    from megatron_rpt.bridge.resharding import mcore_full_shape

    arch = _arch({**QWEN2, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1000})
    padded = 1024
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for tmap, layer, expert in NameMap(arch).iter_all():
        if layer not in (None, 0):
            continue
        full = torch.randn(mcore_full_shape(tmap, arch, padded), generator=gen)
        expected = from_mcore(tmap, full, arch)
        for size in (2, 4):
            shards = [tp_shard(tmap, full, r, size) for r in range(size)]
            for got, want in zip(hf_from_tp_shards(tmap, shards, arch), from_mcore(tmap, tp_merge(tmap, shards), arch)):
                assert torch.equal(got, want), tmap.mcore
            if tmap.layout == "vocab" or tmap.tp_dim is None:
                continue
            for r, shard in enumerate(shards):  # the shard is the engine's slice: no gather needed
                for got, want in zip(hf_slice_of_shard(tmap, shard, arch, size), expected):
                    assert torch.equal(got, torch.chunk(want, size, dim=tmap.tp_dim)[r]), tmap.mcore
        seen.add(tmap.layout)
    assert seen == {"vocab", "copy", "qkv", "gate_up"}


def test_bad_arguments_are_named():
    from megatron_rpt.bridge import WeightBridge

    arch = _arch(QWEN2)
    with pytest.raises(ValueError, match="bucket_mb"):
        WeightBridge([torch.nn.Linear(2, 2)], arch, bucket_mb=0)
    with pytest.raises(ValueError, match="WeightBridge needs at least one model chunk"):
        WeightBridge([], arch, bucket_mb=1)
