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
# Layouts peers run MoE at (model, TP, PP, further parallel.* fields): an uneven pipeline split (3 + 1 layers)
# and expert TP 1 under TP 2, with the experts replicated (EP 1) or split over the TP ranks' expert grid (EP 2).
MOE_LAYOUTS = [("qwen3_moe_4l", 1, 1, {}), ("qwen3_moe_4l", 1, 2, {"first_stage_layers": 3}),
               ("qwen3_moe_4l", 1, 2, {"last_stage_layers": 3}),
               ("qwen3_moe", 2, 1, {"expert_tensor_parallel": 1}),
               ("qwen3_moe", 2, 1, {"expert_parallel": 2, "expert_tensor_parallel": 1})]
ATOL = 1e-4
INTEROP = REPO / "tests" / "data" / "mcore_interop"  # see make_fixtures.py there
INTEROP_CLASSES = ("GPTModel", "HybridModel")
INTEROP_CASES = [(cls, family, tp, pp) for cls in ("GPTModel", "HybridModel") for family in ("qwen2", "qwen3_moe")
                 for tp, pp in ((2, 1), (1, 2))]


def run_cases(cases: list[tuple], layout_cases: list[tuple] = ()) -> tuple[list[torch.Tensor | None], list[dict]]:
    """Rank entry point: every case in the same world (module-level so ``spawn`` can pickle it); and
    what each rank built for ``layout_cases``."""
    return [megatron_logits_rank(*case) for case in cases], [built_layout(*case) for case in layout_cases]


def built_layout(arch_dir: str, tp: int, pp: int, layout: dict) -> dict:
    """This rank's decoder layers and expert MLP shapes as built at the layout (what the logits cannot show:
    an ignored split or expert TP would still give the right numbers)."""
    from megatron_rpt.config import ModelConfig, ParallelConfig
    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.model.build import build_model_chunks
    from megatron_rpt.model.hf_config import load_hf_config
    from megatron_rpt.model.mcore_compat import ModelClass, model_class_of

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, **layout)
    init_distributed(tp, pp, expert_parallel=parallel.expert_parallel,
                     expert_tensor_parallel=parallel.expert_tensor_parallel)
    (chunk,) = build_model_chunks(load_hf_config(arch_dir), ModelConfig(), parallel, {"perform_initialization": False})
    per_decoder_layer = 2 if model_class_of(chunk) is ModelClass.HYBRID else 1
    fc1 = {tuple(p.shape) for n, p in chunk.named_parameters() if "experts" in n and "linear_fc1" in n}
    experts = {n.split("local_experts.")[1].split(".")[0] for n, _ in chunk.named_parameters() if "local_experts" in n}
    return {"layers": len(chunk.decoder.layers) // per_decoder_layer, "expert_fc1": sorted(fc1),
            "local_experts": len(experts)}


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
        "qwen3_moe_4l": make_tiny_hf_checkpoint("qwen3_moe", root / "qwen3_moe_4l", num_hidden_layers=4, seed=3,
                                                tokenizer=False),  # enough layers for an uneven pipeline split
    }


@pytest.fixture(scope="module")
def qwen2_tp2_checkpoint(models, tmp_path_factory) -> Path:
    from megatron_rpt.weights.convert import ConvertSettings, hf_to_mcore

    out = tmp_path_factory.mktemp("parity_ckpt") / "qwen2_tp2"
    return hf_to_mcore(models["qwen2"], out, ConvertSettings(tensor_parallel=2, progress=False))


@pytest.fixture(scope="module")
def results(models, qwen2_tp2_checkpoint):
    """(name, tp, pp[, layout]) -> (megatron logits, transformers logits); ("built", *MOE_LAYOUTS key) -> what
    each rank built."""
    tokens = {name: random_tokens(1000, 2, 24, seed=i) for i, name in enumerate(models)}
    cases, keys = [], []
    for name, path in models.items():
        for tp, pp in LAYOUTS if name != "qwen3_moe_4l" else ():
            cases.append((str(path), str(path), tokens[name], tp, pp))
            keys.append((name, tp, pp))
    for tp in (1, 2):  # the TP=2 conversion loaded at TP=1 (re-sharded) and at TP=2
        cases.append((str(qwen2_tp2_checkpoint), str(models["qwen2"]), tokens["qwen2"], tp, 1))
        keys.append(("qwen2_ckpt", tp, 1))
    for name, tp, pp, layout in MOE_LAYOUTS:
        cases.append((str(models[name]), str(models[name]), tokens[name], tp, pp, 128, "float32", layout))
        keys.append((name, tp, pp, tuple(sorted(layout.items()))))
    interop_tokens = random_tokens(128, 2, 16, seed=7)
    for cls, family, tp, pp in INTEROP_CASES:
        cases.append((str(INTEROP / cls / family), str(INTEROP / "hf" / family), interop_tokens, tp, pp))
        keys.append((cls, family, tp, pp))
    layout_cases = [(str(models[name]), tp, pp, layout) for name, tp, pp, layout in MOE_LAYOUTS]
    per_rank = spawn(run_cases, 2, cases, layout_cases)
    megatron = [next(r[0][i] for r in per_rank if r[0][i] is not None) for i in range(len(cases))]
    built = {("built", name, tp, pp, tuple(sorted(layout.items()))): list(ranks)
             for (name, tp, pp, layout), ranks in zip(MOE_LAYOUTS, zip(*(r[1] for r in per_rank)))}
    reference = {name: hf_logits(path, tokens[name]) for name, path in models.items()}
    reference.update({("interop", f): hf_logits(INTEROP / "hf" / f, interop_tokens) for f in ("qwen2", "qwen3_moe")})
    def reference_of(key: tuple) -> torch.Tensor:
        return reference[("interop", key[1]) if key[0] in INTEROP_CLASSES else key[0].removesuffix("_ckpt")]

    return built | {key: (logits, reference_of(key)) for key, logits in zip(keys, megatron)}


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("name", ["qwen2", "llama", "qwen3", "qwen3_moe"])
def test_logits_match_transformers(results, name, tp, pp):
    logits, reference = results[(name, tp, pp)]
    assert logits.shape == reference.shape == (2, 24, 1000)
    assert reference.abs().max() > 1.0  # weights scaled so that a layout error cannot hide in tiny logits
    assert (logits - reference).abs().max().item() < ATOL


@pytest.mark.parametrize("name,tp,pp,layout", MOE_LAYOUTS, ids=lambda v: str(v))
def test_moe_layouts_match_transformers(results, name, tp, pp, layout):
    """Uneven pipeline stages (GPTModel's num_layers_in_first/last_pipeline_stage on 0.16, HybridModel's
    pipe-split pattern on 0.19) and expert TP 1 under TP 2 give transformers' logits, as PP 1 / TP 1 do."""
    key = (name, tp, pp, tuple(sorted(layout.items())))
    logits, reference = results[key]
    assert logits.shape == reference.shape == (2, 24, 1000)
    rank0, rank1 = results[("built", *key)]
    if pp == 2:  # the split was built as asked, not the even 2 + 2
        split = (3, 1) if layout.get("first_stage_layers") == 3 else (1, 3)
        assert (rank0["layers"], rank1["layers"]) == split
    if layout.get("expert_tensor_parallel") == 1:  # whole expert MLPs (gate+up: 2 x 64 rows), not TP halves
        assert rank0["expert_fc1"] == rank1["expert_fc1"] == [(128, 96)]
        assert rank0["local_experts"] == 4 // layout.get("expert_parallel", 1)
    assert reference.abs().max() > 1.0
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
