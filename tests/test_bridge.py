"""The Megatron -> rollout-engine weight bridge on REAL megatron-core (gloo, CPU, 2 ranks).

The reference is independent of the project's code: tiny checkpoints written by
``transformers`` (every tensor random, norms and biases included: ``helpers_models``), loaded
into Megatron at each parallel layout, streamed through the bridge. The stream must equal the
original safetensors bit for bit (names, shapes, dtypes, values), and Megatron's logits on the
loaded weights must equal transformers' on the original checkpoint (a layout bug shared by the
loader and the bridge would round-trip, but not compute the same logits).

One spawn of two ranks runs every layout (each spawn pays megatron's import time): TP=2 (Qwen2
untied with QKV bias, Qwen3 tied with QK-norm), PP=2, PP=2 x virtual 2 (tied, interleaved
layers), PP=2 uneven (3 + 1 layers), EP=2 (Qwen3-MoE), TP=2 x EP=2 with expert TP 1 and TP=1 (data
parallel, the zero-copy path). Vocabulary padding rows
are filled with noise after loading so that a padding row leaking into the stream shows.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers_models import make_tiny_hf_checkpoint
from safetensors.torch import load_file

from megatron_rpt.distributed import spawn

SIZES = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 128}  # vocab padded to 384 / 512
CHECKPOINTS = {  # name: (family, config overrides)
    "qwen2": ("qwen2", {"num_hidden_layers": 2, "tie_word_embeddings": False}),
    "qwen3": ("qwen3", {"num_hidden_layers": 4, "tie_word_embeddings": True}),
    "moe": ("qwen3_moe", {"num_hidden_layers": 2, "tie_word_embeddings": False, "moe_intermediate_size": 32}),
}
BUCKET_MB = 0.15  # 157 KB: several buckets per model, yet larger than the largest tensor (vocab 512x64 fp32)
TOKENS = torch.tensor([[3, 17, 250, 9, 42, 7, 128, 299]])
# case: (checkpoint, tp, pp, ep, vp)
LAYOUTS = {
    "tp2_qwen2": ("qwen2", 2, 1, 1, None),
    "tp2_qwen3": ("qwen3", 2, 1, 1, None),
    "pp2_qwen2": ("qwen2", 1, 2, 1, None),
    "pp2_vp2_qwen3": ("qwen3", 1, 2, 1, 2),
    "ep2_moe": ("moe", 1, 1, 2, None),
    "tp1_qwen2": ("qwen2", 1, 1, 1, None),
    "pp2_uneven_qwen3": ("qwen3", 1, 2, 1, None),
    "tp2_ep2_etp1_moe": ("moe", 2, 1, 2, None),
}
# further parallel.* fields of a case: an uneven pipeline split (3 + 1 layers, tied embedding on both ends) and
# expert TP 1 under TP 2 (each rank holds two whole experts, the dense layers TP-split)
LAYOUT_EXTRA = {"pp2_uneven_qwen3": {"first_stage_layers": 3}, "tp2_ep2_etp1_moe": {"expert_tensor_parallel": 1}}


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


def _load(ckpt: str, tp: int = 1, pp: int = 1, ep: int = 1, vp: int | None = None, trainable: bool = False,
          extra: dict | None = None):
    """Megatron chunks at this layout holding the HF checkpoint (vocabulary padding: noise).

    ``trainable``: built as the trainer builds its policy. Megatron sets a weight's
    ``tensor_model_parallel`` attribute only when it initialises it, and the optimizer's grad
    norm counts a weight without it on TP rank 0 alone, so a model built with
    ``perform_initialization=False`` must not be trained at TP > 1.
    """
    from megatron_rpt.config import ModelConfig, ParallelConfig
    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.model.build import build_model_chunks
    from megatron_rpt.model.hf_config import load_hf_config
    from megatron_rpt.weights.load import load_hf_into_model

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep, virtual_pipeline=vp,
                              **(extra or {}))
    init_distributed(tp, pp, 1, ep, vp, seed=1, expert_tensor_parallel=parallel.expert_tensor_parallel)
    arch = load_hf_config(ckpt)
    chunks = build_model_chunks(arch, ModelConfig(), parallel, {} if trainable else {"perform_initialization": False})
    load_hf_into_model(chunks, ckpt, arch)
    _noise_in_vocab_padding(chunks, arch, tp)
    return arch, chunks


@torch.no_grad()
def _noise_in_vocab_padding(chunks, arch, tp: int) -> None:
    from megatron.core import parallel_state as ps

    gen = torch.Generator().manual_seed(7)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if name.endswith(("word_embeddings.weight", "output_layer.weight")):
                first = ps.get_tensor_model_parallel_rank() * param.shape[0]  # this shard's first vocabulary row
                keep = max(0, min(param.shape[0], arch.vocab_size - first))
                param[keep:] = torch.randn(param[keep:].shape, generator=gen)


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


def _chunk_layers(chunks, arch) -> list[list[int]]:
    """The HF layers each of this rank's chunks holds."""
    from megatron_rpt.bridge.name_maps import NameMap, named_parameters_global

    names = NameMap.for_model(arch, chunks[0])
    return [sorted({names.lookup(n)[1] for n, _ in named_parameters_global(c) if n.startswith("decoder.layers.")})
            for c in chunks]


# One GRPO step on a fixed global batch: (prompt, response) token ids and each sample's advantage.
SAMPLES = [([3, 17, 250], [9, 42, 7, 128]), ([5, 6, 7, 8, 9], [299, 1]), ([11, 12], [13, 14, 15, 16, 17]),
           ([20, 21, 22, 23], [24, 25, 26])]
ADVANTAGES = [1.0, -0.5, 0.25, -1.5]
# lr and a large Adam eps make the first update -lr * g / (|g| + eps): it shows the gradient's
# scale (Adam is scale-invariant with a small eps); clip_grad large: the norm is computed, not applied.
STEP_CONFIG = {"optim": {"lr": 0.01, "eps": 1.0, "weight_decay": 0.0, "clip_grad": 1e9},
               "rl": {"micro_batch_size": 2, "loss_aggregation": "token-mean"}, "rollout": {"temperature": 1.0}}
STEP_LAYOUTS = {"dp2": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}  # (tp, pp) on two ranks, on the qwen2 checkpoint


def _grpo_step(ckpt: str, tp: int, pp: int) -> dict:
    """One trainer step (MegatronPolicy.train_step, as the trainer calls it: this data-parallel
    rank's share of the global batch, global token / sequence counts) at this layout; the
    updated weights come back through the bridge."""
    import torch.distributed as dist

    from megatron_rpt.bridge import WeightBridge
    from megatron_rpt.config import from_dict
    from megatron_rpt.rl import build_micro_batches
    from megatron_rpt.topology import Topology
    from megatron_rpt.trainer.optimizer import build_optimizer, wrap_ddp
    from megatron_rpt.trainer.policy import MegatronPolicy

    cfg = from_dict({**STEP_CONFIG, "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp}})
    arch, chunks = _load(ckpt, tp, pp, trainable=True)
    chunks = wrap_ddp(chunks, cfg)
    optimizer, scheduler = build_optimizer(chunks, cfg)
    policy = MegatronPolicy(cfg, arch, chunks, optimizer, scheduler)
    topo = Topology.current()
    share = len(SAMPLES) // topo.dp_size
    mine = slice(topo.dp_rank * share, (topo.dp_rank + 1) * share)
    micro = build_micro_batches(SAMPLES[mine], ADVANTAGES[mine], micro_batch_size=cfg.rl.micro_batch_size)
    old = policy.compute_logprobs(micro)  # None off the last stage (the trainer fills zeros there too)
    for i, mb in enumerate(micro):
        mb["old_logprobs"] = old[i] if old is not None else torch.zeros_like(mb["loss_mask"], dtype=torch.float32)
    metrics = policy.train_step(micro, sum(len(r) for _, r in SAMPLES), len(SAMPLES))
    recorder = Recorder()
    WeightBridge(chunks, arch, bucket_mb=BUCKET_MB).sync(recorder if dist.get_rank() == 0 else None)
    return {"grad_norm": metrics["grad_norm"], "num_micro_batches": len(micro), "weights": recorder.got}


def _worker(ckpts: dict[str, str]) -> dict:
    import torch.distributed as dist

    from megatron_rpt.bridge import WeightBridge
    from megatron_rpt.topology import Topology
    from megatron_rpt.weights.parity import megatron_logits

    out: dict = {}
    for case, (ckpt, tp, pp, ep, vp) in LAYOUTS.items():
        arch, chunks = _load(ckpts[ckpt], tp, pp, ep, vp, extra=LAYOUT_EXTRA.get(case))
        out[case] = _run(chunks, arch)
        topo = Topology.current()
        out[case]["topo"] = {k: v for k, v in vars(topo).items() if isinstance(v, int | None)}
        if ep == 1 and vp is None:  # the MoE dispatch needs an all-to-all, the interleaved schedule
            # PP micro-batches: the stream alone is checked there
            logits = megatron_logits(chunks, TOKENS)
            out[case]["logits"] = None if logits is None else logits[..., : arch.vocab_size]
        if case == "tp2_qwen2":
            out["tp2_bf16"] = _run(chunks, arch, dtype=torch.bfloat16)
            # An engine that keeps the pushed tensors: q/k/v weight and bias are merged through
            # the un-fuse buffer, buckets through the staging buffer.
            for declare in (True, False):
                out[f"tp2_retained_{'declared' if declare else 'undeclared'}"] = _run(chunks, arch, retainer=declare)
            # one bridge, two syncs: the second one sees the updated weights (buffers are reused)
            bridge = WeightBridge(chunks, arch, bucket_mb=BUCKET_MB)
            bridge.sync(Recorder())
            with torch.no_grad():
                for chunk in chunks:
                    for param in chunk.parameters():
                        param.mul_(-2.0).add_(0.5)  # an optimizer step, in place
            second = Recorder()
            bridge.sync(second)
            out["tp2_second_sync"] = {"got": second.got}
        elif case == "pp2_qwen2":
            # a rank without an engine still serves the collectives
            out["pp2_one_engine"] = _run(chunks, arch, engine=dist.get_rank() == 0, dtype=torch.bfloat16)
            out["pp2_retained_bf16"] = _run(chunks, arch, retainer=True, dtype=torch.bfloat16)
        elif case in ("pp2_vp2_qwen3", "pp2_uneven_qwen3"):
            out[case]["chunk_layers"] = _chunk_layers(chunks, arch)
        elif case == "ep2_moe":
            out["ep2_retained"] = _run(chunks, arch, retainer=True)
        elif case == "tp1_qwen2":
            out["tp1_bf16"] = _run(chunks, arch, dtype=torch.bfloat16)
            out["tp1_retained"] = _run(chunks, arch, retainer=True)
    for name, (tp, pp) in STEP_LAYOUTS.items():
        out[f"step_{name}"] = _grpo_step(ckpts["qwen2"], tp, pp)
    return out


# --------------------------------------------------------------------------- test side


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bridge_hf")
    return {name: make_tiny_hf_checkpoint(family, root / name, seed=i, tokenizer=False, **SIZES, **overrides)
            for i, (name, (family, overrides)) in enumerate(CHECKPOINTS.items())}


@pytest.fixture(scope="module")
def original(checkpoints) -> dict[str, dict[str, torch.Tensor]]:
    """The safetensors transformers wrote: the reference every stream must equal."""
    return {name: load_file(str(path / "model.safetensors")) for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def runs(checkpoints):
    return spawn(_worker, 2, {k: str(v) for k, v in checkpoints.items()}, timeout=600)


def _ckpt(case: str) -> str:
    return LAYOUTS[case][0] if case in LAYOUTS else {"tp2": "qwen2", "pp2": "qwen2", "ep2": "moe", "tp1": "qwen2"}[
        case.split("_")[0]]


def _assert_same(got: dict, ref: dict, dtype: torch.dtype | None = None) -> None:
    assert sorted(got) == sorted(ref)
    for name, expected in ref.items():
        expected = expected.to(dtype) if dtype else expected
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        assert torch.equal(got[name], expected), f"{name} differs from the original safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_stream_is_the_original_safetensors_bit_for_bit(runs, original, case):
    ref = original[_ckpt(case)]
    for rank, result in enumerate(runs):
        run = result[case]
        _assert_same(run["got"], ref)
        stats = run["stats"]
        assert stats["num_tensors"] == len(ref), f"rank {rank}"
        assert stats["bytes"] == sum(t.numel() * t.element_size() for t in ref.values()), f"rank {rank}"


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c, layout in LAYOUTS.items() if layout[3] == 1 and layout[4] is None])
def test_megatron_logits_equal_transformers_on_the_original(runs, checkpoints, case):
    from megatron_rpt.weights.parity import hf_logits

    expected = hf_logits(checkpoints[_ckpt(case)], TOKENS)  # transformers' own forward, float32, eager
    got = [r[case]["logits"] for r in runs if r[case]["logits"] is not None]
    assert got, "no rank returned logits"
    for logits in got:
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_topology_reads_each_layout_from_megatron(runs, case):
    _, tp, pp, ep, vp = LAYOUTS[case]
    etp = LAYOUT_EXTRA.get(case, {}).get("expert_tensor_parallel", tp)  # Megatron's default: expert-TP = TP
    for rank, result in enumerate(runs):  # two ranks: a parallel dimension of size 2 is indexed by rank
        dp = 2 // (tp * pp)
        assert result[case]["topo"] == {
            "tp_size": tp, "tp_rank": rank if tp == 2 else 0, "pp_size": pp, "pp_rank": rank if pp == 2 else 0,
            "vp_size": vp, "dp_size": dp, "dp_rank": rank if dp == 2 else 0, "cp_size": 1, "cp_rank": 0,
            "ep_size": ep, "ep_rank": rank if ep == 2 else 0,
            "etp_size": etp, "etp_rank": rank if etp == 2 else 0,
            "mp_rank": rank if dp == 1 else 0, "mp_src": 0 if dp == 1 else rank,
        }, f"rank {rank}"


@pytest.mark.slow
def test_dtype_cast_on_the_fly(runs, original):
    ref = original["qwen2"]
    for result in runs:
        # collectives move the engine dtype (the packing copy casts); replicated tensors need no
        # collective and come as the fp32 parameters (the engine's own copy casts)
        run = result["tp2_bf16"]
        assert sorted(run["got"]) == sorted(ref)
        for name, expected in ref.items():
            sharded = not name.endswith("norm.weight")
            assert run["got"][name].dtype == (torch.bfloat16 if sharded else torch.float32), name
            assert torch.equal(run["got"][name].to(torch.bfloat16), expected.to(torch.bfloat16)), name
        assert run["stats"]["num_buckets"] > 0
        # no collective: views of the fp32 parameters, the engine's own copy casts (one pass)
        run = result["tp1_bf16"]
        _assert_same(run["got"], ref)
        assert run["stats"]["num_buckets"] == 0
        assert run["stats"]["bytes"] == sum(t.numel() * 2 for t in ref.values())  # counted in bf16


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2_retained_declared", "pp2_retained_bf16", "ep2_retained", "tp1_retained"])
def test_engine_that_retains_tensors_gets_memory_nothing_overwrites(runs, original, case):
    """An engine that reads pushed tensors after asking for more (vLLM's layerwise reload)
    must still see every tensor's own values at the end of the sync."""
    for result in runs:
        run = result[case]
        _assert_same(run["got"], original[_ckpt(case)], dtype=torch.bfloat16 if "bf16" in case else None)
        # it held everything to the end: the accounting must count all of it alive at once
        assert run["held_bytes"] > 0
        assert run["stats"]["peak_extra_bytes"] >= run["held_bytes"]


@pytest.mark.slow
def test_retaining_engine_that_does_not_say_so_sees_reused_buffers(runs, original):
    # The hazard the declaration exists for: without it the staging / un-fuse buffers are
    # reused, so tensors kept past the next item are overwritten by later ones.
    got = runs[0]["tp2_retained_undeclared"]["got"]
    differ = [n for n, t in original["qwen2"].items() if not torch.equal(got[n], t)]
    assert any("q_proj" in n for n in differ) and any("lm_head" in n or "embed" in n for n in differ)


@pytest.mark.slow
def test_second_sync_sends_the_updated_weights(runs, original):
    updated = {name: t * -2.0 + 0.5 for name, t in original["qwen2"].items()}  # the same float32 ops
    for result in runs:
        _assert_same(result["tp2_second_sync"]["got"], updated)


@pytest.mark.slow
def test_rank_without_engine_serves_the_collectives(runs, original):
    _assert_same(runs[0]["pp2_one_engine"]["got"], original["qwen2"], dtype=torch.bfloat16)
    assert runs[1]["pp2_one_engine"]["got"] == {}
    assert runs[1]["pp2_one_engine"]["stats"]["bytes"] == 0


@pytest.mark.slow
def test_virtual_pipeline_interleaves_layers_and_streams_them_all(runs, original):
    # PP=2 x VP=2 over 4 layers: rank r's chunk c holds layer c * 2 + r (Megatron's interleaving),
    # so neither rank holds a contiguous block, and the tied embedding lives on both ends.
    assert [r["pp2_vp2_qwen3"]["chunk_layers"] for r in runs] == [[[0], [2]], [[1], [3]]]
    for result in runs:
        _assert_same(result["pp2_vp2_qwen3"]["got"], original["qwen3"])
        assert "lm_head.weight" not in result["pp2_vp2_qwen3"]["got"]


@pytest.mark.slow
def test_uneven_pipeline_stages_stream_every_layer_once(runs, original):
    # first_stage_layers=3 over 4 layers: megatron-core builds 3 + 1 (not 2 + 2), and the bridge names each
    # layer by its global index (the loader and the bridge read it from the built layers).
    assert [r["pp2_uneven_qwen3"]["chunk_layers"] for r in runs] == [[[0, 1, 2]], [[3]]]
    for result in runs:
        _assert_same(result["pp2_uneven_qwen3"]["got"], original["qwen3"])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2_qwen2", "tp2_qwen3", "pp2_qwen2", "pp2_vp2_qwen3", "ep2_moe", "tp2_bf16"])
def test_peak_extra_memory_is_one_bucket_plus_one_tensor(runs, original, case):
    for result in runs:
        run = result[case]
        stats, bucket = run["stats"], run["bucket_bytes"]
        itemsize = 2 if "bf16" in case else 4
        padded_vocab = 512 if case.startswith("tp2") else 384  # 128 * TP rounded up from 300
        largest = max(padded_vocab * 64, max(t.numel() for t in original[_ckpt(case)].values())) * itemsize
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


@pytest.fixture(scope="module")
def reference_step(checkpoints):
    """The same GRPO step in float64 transformers: gradient of the token-mean policy-gradient
    loss at ratio 1, and Adam's first update -lr * g / (|g| + eps) of every HF tensor."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2"], dtype=torch.float64)
    num_tokens = sum(len(r) for _, r in SAMPLES)
    loss = torch.zeros((), dtype=torch.float64)
    for (prompt, response), advantage in zip(SAMPLES, ADVANTAGES):
        logits = model(torch.tensor([prompt + response])).logits[0] / STEP_CONFIG["rollout"]["temperature"]
        predicted = torch.log_softmax(logits, dim=-1)[len(prompt) - 1: -1]  # the positions that predict the response
        logprobs = predicted.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logprobs - logprobs.detach())
        loss = loss - (advantage * ratio).sum() / num_tokens
    loss.backward()
    optim = STEP_CONFIG["optim"]
    grads = dict(model.named_parameters())
    update = {name: -optim["lr"] * p.grad / (p.grad.abs() + optim["eps"]) for name, p in grads.items()}
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in grads.values()))
    return {"grad_norm": float(norm), "update": update}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(STEP_LAYOUTS))
def test_one_training_step_equals_transformers_gradient_and_adam_update(runs, original, reference_step, layout):
    # DP=2 (one micro-batch per rank), TP=2 and PP=2 (two micro-batches on one replica): the
    # gradient norm and the update of every tensor equal the float64 full-batch reference, so
    # they equal each other. A loss scale off by the data-parallel or micro-batch factor, or
    # advantages paired with the wrong samples, changes both.
    results = [r[f"step_{layout}"] for r in runs]
    assert [r["num_micro_batches"] for r in results] == ([1, 1] if layout == "dp2" else [2, 2])
    for result in results:
        assert result["grad_norm"] == pytest.approx(reference_step["grad_norm"], rel=1e-4)
    weights = results[0]["weights"]
    assert sorted(weights) == sorted(original["qwen2"])
    for name, before in original["qwen2"].items():
        expected = reference_step["update"][name]
        torch.testing.assert_close((weights[name].double() - before.double()), expected, atol=2e-7, rtol=1e-3,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert max(float(u.abs().max()) for u in reference_step["update"].values()) > 1e-4  # the step moved weights


def test_bad_arguments_are_named():
    from megatron_rpt.bridge import WeightBridge
    from megatron_rpt.model.hf_config import arch_from_dict

    arch = arch_from_dict({**SIZES, "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2})
    with pytest.raises(ValueError, match="bucket_mb"):
        WeightBridge([torch.nn.Linear(2, 2)], arch, bucket_mb=0)
    with pytest.raises(ValueError, match="WeightBridge needs at least one model chunk"):
        WeightBridge([], arch, bucket_mb=1)
