"""``tools/convert.py``: HF -> Megatron dist checkpoint -> HF round trips (real megatron-core
ranks over gloo), the shared tiny Llama, and the bad-input errors (no partial output).

The round trips are compared with ``torch.equal`` on every tensor against the original HF files
(an independent reference: transformers' own ``save_pretrained`` output).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, shared_path
from helpers_models import LLAMA3_ROPE_SCALING, make_tiny_hf_checkpoint

sys.path.insert(0, str(REPO / "tools"))
import convert as convert_cli  # noqa: E402  (tools/convert.py)

from megatron_rpt.weights.hf_io import HFCheckpointReader  # noqa: E402

pytestmark = pytest.mark.slow


def cli(*argv: str | Path) -> int:
    return convert_cli.main([str(a) for a in argv])


def assert_same_weights(reference: Path, exported: Path) -> None:
    with HFCheckpointReader(reference) as ref, HFCheckpointReader(exported) as out:
        assert sorted(ref.keys()) == sorted(out.keys())
        for name in ref.keys():
            a, b = ref.read(name), out.read(name)
            assert a.dtype == b.dtype and torch.equal(a, b), name


def assert_nothing_left(parent: Path, name: str) -> None:
    leftovers = [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f"{name}.")]
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def qwen2_hf(tmp_path_factory) -> Path:
    # sharded input (index + several files) to exercise the index reader
    return make_tiny_hf_checkpoint("qwen2", tmp_path_factory.mktemp("hf") / "qwen2", max_shard_size="300KB")


@pytest.fixture(scope="module")
def qwen2_mcore_tp2(qwen2_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mcore") / "qwen2_tp2"
    assert cli("hf-to-mcore", "--hf", qwen2_hf, "--out", out, "--tp", "2", "--pp", "1", "--no-progress") == 0
    return out


def test_round_trip_tp2_is_bit_identical(qwen2_hf, qwen2_mcore_tp2, tmp_path):
    meta = json.loads((qwen2_mcore_tp2 / "rpt_meta.json").read_text())
    assert (meta["family"], meta["tensor_parallel"], meta["pipeline_parallel"]) == ("qwen2", 2, 1)
    assert (meta["dtype"], meta["vocab_size"], meta["padded_vocab_size"]) == ("float32", 1000, 1024)
    assert (qwen2_mcore_tp2 / "metadata.json").is_file()
    assert (qwen2_mcore_tp2 / "hf" / "config.json").read_text() == (qwen2_hf / "config.json").read_text()
    back = tmp_path / "back"
    assert cli("mcore-to-hf", "--ckpt", qwen2_mcore_tp2, "--out", back, "--max-shard-size", "200KB",
               "--no-progress") == 0
    assert_same_weights(qwen2_hf, back)
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 1 and (back / "model.safetensors.index.json").is_file()
    assert json.loads((back / "config.json").read_text())["vocab_size"] == 1000
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):  # carried through hf/
        assert (back / name).exists() == (qwen2_hf / name).exists(), name
    assert_nothing_left(tmp_path, "back.tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["back"]


def test_round_trip_pp2_vp2_tied_bf16_is_bit_identical(tmp_path):
    hf = make_tiny_hf_checkpoint("llama", tmp_path / "llama", tie_word_embeddings=True,
                                 rope_scaling=LLAMA3_ROPE_SCALING, max_position_embeddings=16384,
                                 num_hidden_layers=4, dtype=torch.bfloat16, tokenizer=False)
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    assert cli("hf-to-mcore", "--hf", hf, "--out", mcore, "--tp", "1", "--pp", "2", "--vp", "2", "--no-progress") == 0
    assert json.loads((mcore / "rpt_meta.json").read_text())["dtype"] == "bfloat16"  # the HF checkpoint's dtype
    assert cli("mcore-to-hf", "--ckpt", mcore, "--out", back, "--no-progress") == 0
    assert_same_weights(hf, back)
    assert "lm_head.weight" not in HFCheckpointReader(back).keys()  # tied: not written, as HF does
    assert json.loads((back / "config.json").read_text())["tie_word_embeddings"] is True
    # saved with 2 virtual chunks per stage, loaded at PP=2 without them; the last stage's tied
    # output layer must come from the embedding
    assert cli("verify", "--hf", hf, "--ckpt", mcore, "--pp", "2", "--seq-len", "16") == 0


def test_round_trip_moe_tp2_is_bit_identical(tmp_path):
    # experts are stored stacked under one key per layer (layer and expert axes prepended)
    hf = make_tiny_hf_checkpoint("qwen3_moe", tmp_path / "moe", tokenizer=False)
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    assert cli("hf-to-mcore", "--hf", hf, "--out", mcore, "--tp", "2", "--no-progress") == 0
    assert cli("mcore-to-hf", "--ckpt", mcore, "--out", back, "--no-progress") == 0
    assert_same_weights(hf, back)


def test_shared_tiny_random_llama_converts_and_verifies(tmp_path, capsys):
    hf = shared_path("models/tiny_random_llama")
    mcore = tmp_path / "mcore"
    assert cli("hf-to-mcore", "--hf", hf, "--out", mcore, "--tp", "2", "--no-progress") == 0
    # vocab 16 -> 256 padded rows at TP=2, loaded back at TP=1/PP=2 (128 rows): dist-checkpoint resharding
    capsys.readouterr()
    assert cli("verify", "--hf", hf, "--ckpt", mcore, "--tp", "1", "--pp", "2") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] and report["max_abs_logit_diff"] < 1e-4 and (report["tp"], report["pp"]) == (1, 2)


# --------------------------------------------------------------------------- bad input


def _broken(kind: str, hf: Path, root: Path) -> Path:
    """A copy of ``hf`` damaged in one way."""
    import shutil

    bad = root / f"bad_{kind}"
    shutil.copytree(hf, bad)
    config = json.loads((bad / "config.json").read_text())
    if kind == "missing_shard":
        next(bad.glob("model-00002-of-*.safetensors")).unlink()
    elif kind == "missing_tensor":
        index = json.loads((bad / "model.safetensors.index.json").read_text())
        del index["weight_map"]["model.layers.1.self_attn.q_proj.bias"]
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == "shape_mismatch":
        config["intermediate_size"] = 192
    elif kind == "unsupported":
        config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize(
    "kind,flags,message",
    [
        ("missing_shard", [], "model-00002-of-"),
        ("missing_tensor", [], "missing tensor model.layers.1.self_attn.q_proj.bias"),
        ("shape_mismatch", [], "config.json implies [192, 96]"),
        ("unsupported", [], "GPT2LMHeadModel"),
        (None, ["--tp", "4"], "does not divide the model's num_attention_heads=6"),
        (None, ["--tp", "3"], "num_key_value_heads=2"),
        (None, ["--pp", "3"], "num_hidden_layers=2"),
    ],
)
def test_hf_to_mcore_rejects_bad_input(kind, flags, message, qwen2_hf, tmp_path, capsys):
    hf = _broken(kind, qwen2_hf, tmp_path) if kind else qwen2_hf
    out = tmp_path / "out"
    assert cli("hf-to-mcore", "--hf", hf, "--out", out, *flags) == convert_cli.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert_nothing_left(tmp_path, "out")


def test_existing_output_needs_force(qwen2_hf, qwen2_mcore_tp2, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    assert cli("hf-to-mcore", "--hf", qwen2_hf, "--out", out) == convert_cli.EXIT_BAD_INPUT
    assert cli("mcore-to-hf", "--ckpt", qwen2_mcore_tp2, "--out", out) == convert_cli.EXIT_BAD_INPUT
    assert "--force" in capsys.readouterr().err
    assert (out / "keep").read_text() == "mine"
    assert cli("mcore-to-hf", "--ckpt", qwen2_hf, "--out", tmp_path / "x") == convert_cli.EXIT_BAD_INPUT
    assert "not a Megatron distributed checkpoint" in capsys.readouterr().err


def test_failure_inside_the_ranks_leaves_no_output(qwen2_mcore_tp2, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(qwen2_mcore_tp2, damaged)
    for shard in damaged.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    out = tmp_path / "out"
    assert cli("mcore-to-hf", "--ckpt", damaged, "--out", out, "--no-progress") == convert_cli.EXIT_BAD_INPUT
    assert "could not read" in capsys.readouterr().err
    assert_nothing_left(tmp_path, "out")
