"""Fast, single-process checks of the conversion building blocks (no Megatron ranks).

* the fused layouts of ``bridge.layouts`` against hand-derived layouts (QKV per-group interleave,
  [gate; up], zero vocab padding); reading a TP rank's slices (``tp_slice_ranges`` +
  ``to_mcore_shard``) against Megatron's sharding rule written out here (``_megatron_shard``), and
  the shards merged back (``hf_from_tp_shards``) against the original HF tensors;
* the streaming safetensors reader / writer against the ``safetensors`` library;
* the all-or-nothing output directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_rpt.atomic import OutputExistsError, atomic_output_dir
from megatron_rpt.bridge.layouts import (
    expected_hf_shapes,
    from_mcore,
    hf_from_tp_shards,
    hf_slice_of_shard,
    qkv_to_mcore,
    to_mcore,
    to_mcore_shard,
    tp_slice_ranges,
)
from megatron_rpt.bridge.name_maps import Layout, NameMap
from megatron_rpt.config import ConfigError
from megatron_rpt.model.build import hybrid_layer_pattern
from megatron_rpt.model.hf_config import arch_from_dict, padded_vocab_size
from megatron_rpt.model.mcore_compat import ModelClass
from megatron_rpt.weights.hf_io import CheckpointError, HFCheckpointReader, HFShardWriter, parse_size
from megatron_rpt.weights.load import validate_hf_checkpoint

BASE = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
            intermediate_size=160, vocab_size=1000)
ARCHS = {
    "qwen2": arch_from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"]}),
    "llama_tied": arch_from_dict({**BASE, "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}),
    "qwen3": arch_from_dict({**BASE, "architectures": ["Qwen3ForCausalLM"]}),
    "qwen3_moe": arch_from_dict({**BASE, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4,
                                 "num_experts_per_tok": 2, "moe_intermediate_size": 64}),
}


def _random_hf(arch, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for tmap, layer, expert in NameMap(arch).iter_all():
        for name, shape in zip(tmap.format(layer, expert)[1], expected_hf_shapes(tmap, arch)):
            out[name] = torch.randn(shape, generator=gen)
    return out


def _megatron_shard(tmap, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Megatron's TP split of a full tensor, as its layers allocate it: ``size`` equal chunks along
    the split dimension, except linear_fc1 of a SwiGLU MLP, whose rank holds its chunk of gate and
    its chunk of up (``[gate_r; up_r]``)."""
    if tmap.tp_dim is None or size == 1:
        return full
    if tmap.layout is Layout.GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, dim=0)[rank], torch.chunk(up, size, dim=0)[rank]], dim=0)
    return torch.chunk(full, size, dim=tmap.tp_dim)[rank]


def test_qkv_interleave_matches_hand_layout():
    arch = ARCHS["qwen2"]
    hd, groups, per = arch.head_dim, arch.num_key_value_heads, arch.num_attention_heads // arch.num_key_value_heads
    q = torch.arange(arch.num_attention_heads * hd * 3, dtype=torch.float32).reshape(-1, 3)
    k = 1000 + torch.arange(groups * hd * 3, dtype=torch.float32).reshape(-1, 3)
    v = 2000 + torch.arange(groups * hd * 3, dtype=torch.float32).reshape(-1, 3)
    fused = qkv_to_mcore(q, k, v, arch)
    rows = []
    for g in range(groups):  # Megatron: per group, its query heads, then its key head, then its value head
        rows += [q[(g * per + h) * hd:(g * per + h + 1) * hd] for h in range(per)]
        rows += [k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]]
    assert torch.equal(fused, torch.cat(rows))


@pytest.mark.parametrize("family", sorted(ARCHS))
@pytest.mark.parametrize("tp", [1, 2])
def test_slice_reads_equal_sharding_the_full_tensor(family, tp):
    arch = ARCHS[family]
    hf = _random_hf(arch)
    padded = padded_vocab_size(arch.vocab_size, 128, tp)
    for tmap, layer, expert in NameMap(arch).iter_all():
        names = tmap.format(layer, expert)[1]
        full = to_mcore(tmap, [hf[n] for n in names], arch, padded)
        assert [list(t.shape) for t in from_mcore(tmap, full, arch)] == [list(hf[n].shape) for n in names]
        assert all(torch.equal(a, hf[n]) for a, n in zip(from_mcore(tmap, full, arch), names))
        shards = []
        for rank in range(tp):
            ranges = tp_slice_ranges(tmap, arch, padded, rank, tp)
            slices = [hf[n] if r is None else hf[n].narrow(r[0], r[1], r[2] - r[1]) for n, r in zip(names, ranges)]
            shard = to_mcore_shard(tmap, slices, arch, padded, rank, tp)
            assert torch.equal(shard, _megatron_shard(tmap, full, rank, tp)), (tmap.mcore, rank)
            shards.append(shard)
            if tmap.tp_dim is not None and tmap.layout is not Layout.VOCAB:  # the engine's own slice, no gather
                for got, n in zip(hf_slice_of_shard(tmap, shard, arch, tp), names):
                    assert torch.equal(got, torch.chunk(hf[n], tp, dim=tmap.tp_dim)[rank]), (tmap.mcore, rank)
        merged = hf_from_tp_shards(tmap, shards if tmap.tp_dim is not None else shards[:1], arch)
        assert all(torch.equal(got, hf[n]) for got, n in zip(merged, names)), tmap.mcore
        if tmap.layout is Layout.VOCAB:
            assert full.shape[0] == padded and torch.all(full[arch.vocab_size:] == 0)
        if tmap.layout is Layout.GATE_UP and tp == 2:  # rank 0 holds the first half of gate, then of up
            ffn = hf[names[0]].shape[0]
            assert torch.equal(shards[0], torch.cat([hf[names[0]][: ffn // 2], hf[names[1]][: ffn // 2]]))


def test_tied_output_layer_maps_to_embedding():
    names = NameMap(ARCHS["llama_tied"])
    tmap, _, _ = names.lookup("output_layer.weight")
    assert tmap.hf == ("model.embed_tokens.weight",)
    assert "lm_head.weight" not in names.hf_names()


# Hand-written: HF layer 1 of a Qwen3-MoE in both Megatron model classes (HybridModel: attention half
# on layer 2i, MLP half on layer 2i+1, final norm renamed).
MOE_LAYER1 = {
    "model.layers.1.input_layernorm.weight": ("decoder.layers.1.input_layernorm.weight",
                                              "decoder.layers.2.input_layernorm.weight"),
    "model.layers.1.self_attn.o_proj.weight": ("decoder.layers.1.self_attention.linear_proj.weight",
                                               "decoder.layers.2.self_attention.linear_proj.weight"),
    "model.layers.1.self_attn.k_norm.weight": ("decoder.layers.1.self_attention.k_layernorm.weight",
                                               "decoder.layers.2.self_attention.k_layernorm.weight"),
    "model.layers.1.post_attention_layernorm.weight": ("decoder.layers.1.pre_mlp_layernorm.weight",
                                                       "decoder.layers.3.pre_mlp_layernorm.weight"),
    "model.layers.1.mlp.gate.weight": ("decoder.layers.1.mlp.router.weight", "decoder.layers.3.mlp.router.weight"),
    "model.layers.1.mlp.experts.3.down_proj.weight": (
        "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight",
        "decoder.layers.3.mlp.experts.local_experts.3.linear_fc2.weight"),
    "model.norm.weight": ("decoder.final_layernorm.weight", "decoder.final_norm.weight"),
}


@pytest.mark.parametrize("model_class", list(ModelClass))
def test_names_of_both_model_classes(model_class):
    names = NameMap(ARCHS["qwen3_moe"], model_class=model_class)
    column = 1 if model_class is ModelClass.HYBRID else 0
    for hf_name, mcore_names in MOE_LAYER1.items():
        tmap, layer, expert = names.lookup(mcore_names[column])
        assert hf_name in tmap.format(layer, expert)[1]
        assert tmap.format(layer, expert)[0] == mcore_names[column]
    formatted = {tmap.format(layer, expert)[0] for tmap, layer, expert in names.iter_all()}
    assert {m[column] for m in MOE_LAYER1.values()} <= formatted
    assert len(formatted) == len(list(names.iter_all()))  # one Megatron name per map entry
    if model_class is ModelClass.HYBRID:  # an attention name on an MLP layer index is no parameter
        with pytest.raises(KeyError, match="as a HybridModel"):
            names.lookup("decoder.layers.3.self_attention.linear_proj.weight")


def test_hybrid_layer_pattern_follows_the_pipeline_split():
    four = arch_from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 4})
    assert hybrid_layer_pattern(four) == "*-*-*-*-"
    assert hybrid_layer_pattern(four, 2) == "*-*-|*-*-"
    assert hybrid_layer_pattern(four, 2, 2) == "*-|*-|*-|*-"
    assert hybrid_layer_pattern(ARCHS["qwen3_moe"], 2) == "*E|*E"
    assert hybrid_layer_pattern(four, 2, first_stage_layers=3) == "*-*-*-|*-"  # uneven: GPTModel's 3 + 1
    six = arch_from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 6})
    # 4 + 2 layers, two chunks per rank, segments chunk-major (v0r0 v0r1 v1r0 v1r1) as megatron-core numbers them
    assert hybrid_layer_pattern(six, 2, 2, first_stage_layers=4) == "*-*-|*-|*-*-|*-"
    with pytest.raises(ConfigError, match=r"= 3 does not divide the 4 layers"):
        hybrid_layer_pattern(four, 3)


# --------------------------------------------------------------------------- safetensors I/O


def _write_sharded(tmp_path: Path, tensors: dict[str, torch.Tensor], files: int = 3) -> Path:
    names = sorted(tensors)
    weight_map = {}
    for i in range(files):
        part = {n: tensors[n] for n in names[i::files]}
        fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        save_file(part, str(tmp_path / fname))
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


def test_reader_reads_slices_from_a_sharded_checkpoint(tmp_path):
    tensors = {f"t{i}": torch.randn(6, 10) for i in range(5)}
    reader = HFCheckpointReader(_write_sharded(tmp_path, tensors))
    assert sorted(reader.keys()) == sorted(tensors)
    for name, t in tensors.items():
        assert reader.shape(name) == (6, 10)
        assert torch.equal(reader.read(name), t)
        assert torch.equal(reader.read(name, (0, 2, 5)), t[2:5])
        assert torch.equal(reader.read(name, (1, 4, 10)), t[:, 4:10])


def test_reader_errors_name_the_problem(tmp_path):
    tensors = {f"t{i}": torch.randn(2) for i in range(4)}
    _write_sharded(tmp_path, tensors)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        HFCheckpointReader(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        HFCheckpointReader(empty)
    single = tmp_path / "single"
    single.mkdir()
    save_file({"a": torch.zeros(1)}, str(single / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'b' is missing"):
        HFCheckpointReader(single).read("b")
    (single / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        HFCheckpointReader(single)


def test_validate_reports_missing_and_misshaped_tensors(tmp_path):
    arch = ARCHS["qwen2"]
    hf = _random_hf(arch)
    del hf["model.layers.1.mlp.up_proj.weight"]
    hf["model.norm.weight"] = torch.zeros(95)
    save_file(hf, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        validate_hf_checkpoint(HFCheckpointReader(tmp_path), arch)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in str(info.value)
    assert "model.norm.weight has shape [95], config.json implies [96]" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_writer_streams_out_of_order(tmp_path, dtype):
    tensors = {f"layer.{i}.w": torch.randn(8, 16).to(dtype) for i in range(7)}
    plan = [(n, tuple(t.shape)) for n, t in tensors.items()]
    writer = HFShardWriter(tmp_path, plan, dtype, max_shard_bytes=parse_size("1KB"))
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    files = writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(files) > 1 and all(f.name.startswith("model-") for f in files)
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for f in files:
        loaded.update(load_file(str(f)))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    single = tmp_path / "one"
    writer = HFShardWriter(single, plan[:2], dtype)
    with pytest.raises(ValueError, match="export plan says"):
        writer.write(plan[0][0], torch.zeros(3))
    writer.write(plan[0][0], tensors[plan[0][0]])
    with pytest.raises(CheckpointError, match="never written"):
        writer.finish()


def test_atomic_output_dir(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(out) as tmp:
        (tmp / "done").write_text("1")
    assert (out / "done").read_text() == "1"
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(out):
            pass
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "done").write_text("2")
    assert (out / "done").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["out"]
