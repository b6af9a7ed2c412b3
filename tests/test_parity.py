"""Logits parity: Megatron-Core (real, over gloo) vs transformers, at (TP, PP) in {(1,1), (2,1), (1,2)},
for Qwen2, Llama (tied, llama3 rope scaling), Qwen3 (qk-norm) and Qwen3-MoE (routed experts), as the
model class this megatron-core builds (GPTModel on 0.16, HybridModel on 0.19); and the committed
checkpoints written by megatron-core 0.16 (GPTModel) and 0.19 (HybridModel) loaded into it.

Reference: transformers' own forward in float32 with eager attention on the same random
tokens. Odd sizes on purpose (hidden 96, 6 heads in 2 KV groups, vocab 1000 -> padded 1024).
One spawned 2-rank world runs every case (re-initialising Megatron's parallel state per case),
so the cost of starting ranks is paid once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers_models import LLAMA3_ROPE_SCALING, make_tiny_hf_checkpoint

from megatron_rpt.distributed import spawn
from megatron_rpt.weights.parity import hf_logits, megatron_logits_rank, random_tokens

pytestmark = pytest.mark.slow

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
ATOL = 1e-4
INTEROP = REPO / "tests" / "data" / "mcore_interop"  # see make_fixtures.py there
INTEROP_CASES = [(cls, family, tp, pp) for cls in ("GPTModel", "HybridModel") for family in ("qwen2", "qwen3_moe")
                 for tp, pp in ((2, 1), (1, 2))]


def run_cases(cases: list[tuple]) -> list[torch.Tensor | None]:
    """Rank entry point: every case in the same world (module-level so ``spawn`` can pickle it)."""
    return [megatron_logits_rank(*case) for case in cases]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity")
    return {
        "qwen2": make_tiny_hf_checkpoint("qwen2", root / "qwen2", tokenizer=False),  # qkv bias, untied
        # tied embeddings + Llama 3 rope scaling (factor 8; theta 5e5 puts many frequencies in the scaled band)
        "llama": make_tiny_hf_checkpoint("llama", root / "llama", tie_word_embeddings=True,
                                         rope_scaling=LLAMA3_ROPE_SCALING, max_position_embeddings=16384,
                                         tokenizer=False),
        "qwen3": make_tiny_hf_checkpoint("qwen3", root / "qwen3", tokenizer=False),  # qk-norm
        "qwen3_moe": make_tiny_hf_checkpoint("qwen3_moe", root / "qwen3_moe", tokenizer=False),  # routed experts
    }


@pytest.fixture(scope="module")
def qwen2_tp2_checkpoint(models, tmp_path_factory) -> Path:
    from megatron_rpt.weights.convert import ConvertSettings, hf_to_mcore

    out = tmp_path_factory.mktemp("parity_ckpt") / "qwen2_tp2"
    return hf_to_mcore(models["qwen2"], out, ConvertSettings(tensor_parallel=2, progress=False))


@pytest.fixture(scope="module")
def results(models, qwen2_tp2_checkpoint):
    """(name, tp, pp) -> (megatron logits, transformers logits)."""
    tokens = {name: random_tokens(1000, 2, 24, seed=i) for i, name in enumerate(models)}
    cases, keys = [], []
    for name, path in models.items():
        for tp, pp in LAYOUTS:
            cases.append((str(path), str(path), tokens[name], tp, pp))
            keys.append((name, tp, pp))
    for tp in (1, 2):  # the TP=2 conversion loaded at TP=1 (re-sharded) and at TP=2
        cases.append((str(qwen2_tp2_checkpoint), str(models["qwen2"]), tokens["qwen2"], tp, 1))
        keys.append(("qwen2_ckpt", tp, 1))
    interop_tokens = random_tokens(128, 2, 16, seed=7)
    for cls, family, tp, pp in INTEROP_CASES:
        cases.append((str(INTEROP / cls / family), str(INTEROP / "hf" / family), interop_tokens, tp, pp))
        keys.append((cls, family, tp, pp))
    per_rank = spawn(run_cases, 2, cases)
    megatron = [next(r[i] for r in per_rank if r[i] is not None) for i in range(len(cases))]
    reference = {name: hf_logits(path, tokens[name]) for name, path in models.items()}
    reference.update({("interop", f): hf_logits(INTEROP / "hf" / f, interop_tokens) for f in ("qwen2", "qwen3_moe")})
    return {key: (logits, reference[("interop", key[1]) if len(key) == 4 else key[0].removesuffix("_ckpt")])
            for key, logits in zip(keys, megatron)}


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("name", ["qwen2", "llama", "qwen3", "qwen3_moe"])
def test_logits_match_transformers(results, name, tp, pp):
    logits, reference = results[(name, tp, pp)]
    assert logits.shape == reference.shape == (2, 24, 1000)
    assert reference.abs().max() > 1.0  # weights scaled so that a layout error cannot hide in tiny logits
    assert (logits - reference).abs().max().item() < ATOL


@pytest.mark.parametrize("case", INTEROP_CASES, ids=lambda c: "-".join(map(str, c)))
def test_checkpoints_of_both_model_classes_load_at_any_layout(results, case):
    """A checkpoint converted by megatron-core 0.16 (GPTModel) or 0.19 (HybridModel) loads into the
    model this megatron-core builds, whichever class that is, re-sharded to TP=2 or PP=2."""
    logits, reference = results[case]
    assert logits.shape == reference.shape == (2, 16, 128)
    assert reference.abs().max() > 1.0
    assert (logits - reference).abs().max().item() < ATOL


def test_resharded_checkpoint_gives_identical_logits(results):
    # TP=2 checkpoint loaded at TP=1 == HF loaded directly at TP=1, bit for bit (same weights, same math)
    assert torch.equal(results[("qwen2_ckpt", 1, 1)][0], results[("qwen2", 1, 1)][0])
    assert torch.equal(results[("qwen2_ckpt", 2, 1)][0], results[("qwen2", 2, 1)][0])


def test_verify_cli_at_tp2(models, qwen2_tp2_checkpoint):
    """The done-when check: ``tools/convert.py verify`` on the odd-sized Qwen2 at TP=2."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert.py"), "verify", "--hf", str(models["qwen2"]),
         "--ckpt", str(qwen2_tp2_checkpoint), "--tp", "2", "--pp", "1", "--seq-len", "32", "--batch", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["max_abs_logit_diff"] < ATOL and (report["tp"], report["pp"]) == (2, 1)
    assert report["argmax_agreement"] == 1.0


def test_verify_fails_on_other_weights(models, qwen2_tp2_checkpoint, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import convert as convert_cli

    other = make_tiny_hf_checkpoint("qwen2", tmp_path / "other", seed=1, tokenizer=False)
    code = convert_cli.main(["verify", "--hf", str(other), "--ckpt", str(qwen2_tp2_checkpoint), "--batch", "1",
                             "--seq-len", "8"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == convert_cli.EXIT_MISMATCH and not report["ok"] and report["max_abs_logit_diff"] > 0.1
