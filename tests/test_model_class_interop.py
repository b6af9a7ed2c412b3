"""Checkpoints across megatron-core versions: GPTModel (0.16) and HybridModel (0.19).

The fixtures in ``tests/data/mcore_interop`` were converted from the same tiny HF models by
megatron-core 0.16.1 (``GPTModel/``) and 0.19.2 (``HybridModel/``) with ``make_fixtures.py``.
On either version here:

* each states the class it holds (content metadata, and the stored keys alone);
* each exports back to HF bit for bit against the committed HF weights (the independent
  reference, written by transformers' ``save_pretrained``), whichever class this megatron-core
  builds (``test_parity.py`` loads them into the live model at TP=2 and PP=2);
* resuming a *training* checkpoint of the other class stops with one line naming both classes
  and the fix, instead of falling back to older checkpoints (which hold the same class);
* a checkpoint that cannot fit the model fails with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO

from megatron_rpt.distributed import spawn
from megatron_rpt.model.mcore_compat import ModelClass, policy_model_class, read_common_state_in_torch_dist
from megatron_rpt.weights.hf_io import CheckpointError, HFCheckpointReader
from megatron_rpt.weights.interop import stored_keys, stored_model_class

INTEROP = REPO / "tests" / "data" / "mcore_interop"
FAMILIES = ("qwen2", "qwen3_moe")
OTHER = ModelClass.GPT if policy_model_class() is ModelClass.HYBRID else ModelClass.HYBRID


def _interop_rank(out_root: str) -> dict:
    """One rank (world of 1): export every fixture, then try to resume a training checkpoint of the
    other class, and load a HybridModel checkpoint into a GPTModel of the wrong depth (where GPTModel
    exists, i.e. everywhere)."""
    from dataclasses import replace

    from megatron_rpt.config import ModelConfig, ParallelConfig
    from megatron_rpt.model.build import build_model
    from megatron_rpt.model.hf_config import load_hf_config
    from megatron_rpt.trainer import checkpointing
    from megatron_rpt.weights.convert import mcore_to_hf_rank
    from megatron_rpt.weights.megatron_ckpt import checkpoint_sharded_state_dict

    out: dict = {"exported": {}}
    for cls in ModelClass:
        for family in FAMILIES:
            target = Path(out_root) / cls.value / family
            mcore_to_hf_rank(str(INTEROP / cls.value / family), str(INTEROP / "hf" / family), str(target),
                             "float32", 128, 5 << 30, False)
            out["exported"][(cls.value, family)] = str(target)
    arch = load_hf_config(INTEROP / "hf" / "qwen2")
    model = build_model(arch, ModelConfig(), ParallelConfig())
    run = Path(out_root) / "run"  # a training run whose only checkpoint holds the other class
    shutil.copytree(INTEROP / OTHER.value / "qwen2", run / "iter_0000003" / "dist")
    (run / "iter_0000003" / checkpointing.COMPLETE).write_text("{}")
    (run / "latest").write_text("iter_0000003\n")
    try:
        # The model class is checked before anything loads (the checksum verification before it is
        # checkpoint-agnostic and tested in test_checkpoint_safety.py).
        checkpointing.load_checkpoint(run / "iter_0000003", [model], None, None)
        out["resume"] = "resumed"
    except CheckpointError as exc:
        out["resume"] = f"{type(exc).__name__}: {exc}"
    shallow = build_model(replace(arch, num_layers=1), ModelConfig(), ParallelConfig(), model_class=ModelClass.GPT)
    try:
        checkpoint_sharded_state_dict([shallow], INTEROP / "HybridModel" / "qwen2")
        out["shallow"] = "loaded"
    except CheckpointError as exc:
        out["shallow"] = str(exc)
    return out


@pytest.fixture(scope="module")
def interop(tmp_path_factory) -> dict:
    return spawn(_interop_rank, 1, str(tmp_path_factory.mktemp("interop")))[0]


@pytest.mark.parametrize("cls", list(ModelClass))
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_states_its_model_class(cls, family):
    from megatron.core import dist_checkpointing

    path = INTEROP / cls.value / family
    read_common_state_in_torch_dist()  # 0.19 writes no common.pt; let 0.16 read the metadata
    content = dist_checkpointing.load_content_metadata(str(path))
    assert content["model_class"] == cls.value
    assert content["megatron_core"].startswith("megatron-core " + ("0.19." if cls is ModelClass.HYBRID else "0.16."))
    assert json.loads((path / "rpt_meta.json").read_text())["model_class"] == cls.value
    assert stored_model_class(path, None, stored_keys(path)) is cls  # from the stored keys alone


@pytest.mark.parametrize("cls", list(ModelClass))
@pytest.mark.parametrize("family", FAMILIES)
def test_either_class_exports_bit_identical(interop, cls, family):
    exported = Path(interop["exported"][(cls.value, family)])
    with HFCheckpointReader(INTEROP / "hf" / family) as ref, HFCheckpointReader(exported) as out:
        assert sorted(ref.keys()) == sorted(out.keys())
        for name in ref.keys():
            a, b = ref.read(name), out.read(name)
            assert a.dtype == b.dtype and torch.equal(a, b), name


def test_resume_across_model_classes_stops_with_the_fix(interop):
    message = interop["resume"]
    assert message.startswith("ModelClassMismatch: "), message
    assert "\n" not in message
    assert f"holds a {OTHER.value} training state" in message and f"trains a {policy_model_class().value}" in message
    assert "--resume none --set model.load=" in message


def test_hybrid_checkpoint_into_a_gpt_model_of_other_depth_fails_clearly(interop):
    assert interop["shallow"].endswith(
        "is a HybridModel checkpoint with 2 attention and 2 MLP layers; this GPTModel has 1 decoder layers, each "
        "one attention and one MLP layer: it is a checkpoint of another model (or of layer kinds GPTModel does "
        "not have)")


def test_unknown_model_class_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"holds a 'MambaModel'; megatron-rpt reads only \['GPTModel', "):
        stored_model_class(tmp_path, {"model_class": "MambaModel"}, set())
