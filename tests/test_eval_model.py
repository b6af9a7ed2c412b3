"""Evaluation with a real tiny model: standard next-token accuracy against an independent
transformers forward, difficulty scoring, the CLI on HF and Megatron checkpoints, and the
training hook sharded over two data-parallel ranks."""

import json
import math
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_models import make_tiny_hf_checkpoint  # noqa: E402

from megatron_rpt.config import from_dict, load_config  # noqa: E402
from megatron_rpt.data.problems import Problem  # noqa: E402

CHARS = "0123456789+=-*() "
VOCAB = 4 + len(CHARS)  # the character tokenizer: S, E, P, U, then the characters


def _char_tokenizer_files(model_dir: Path) -> None:
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"char_ords": [ord(c) for c in CHARS]}))


def _hf_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def _reference_last_logits(model, contexts):
    return torch.stack([model(torch.tensor([c])).logits[0, -1].double() for c in contexts])


def _reference_entropy(logits: torch.Tensor, k: int = 16) -> list[float]:
    """Top-k entropy in float64, written out: renormalised softmax over the k largest logits."""
    out = []
    for row in logits.double():
        top = sorted(row.tolist(), reverse=True)[:k]
        m = max(top)
        weights = [math.exp(x - m) for x in top]
        z = sum(weights)
        out.append(-sum(w / z * math.log(w / z) for w in weights))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Qwen2 over a 17-character vocabulary, a corpus it half-predicts, and a config."""
    root = tmp_path_factory.mktemp("eval_tiny")
    model_dir = make_tiny_hf_checkpoint("qwen2", root / "model", seed=0, std=0.3, tokenizer=False,
                                        vocab_size=VOCAB, max_position_embeddings=1024)
    _char_tokenizer_files(model_dir)
    scorer_dir = make_tiny_hf_checkpoint("qwen2", root / "scorer", seed=1, std=0.5, tokenizer=False,
                                         vocab_size=VOCAB, max_position_embeddings=1024)
    model = _hf_model(model_dir)
    rng = random.Random(0)
    ids = torch.tensor([[4 + rng.randrange(len(CHARS)) for _ in range(3)] for _ in range(10)])
    with torch.no_grad():
        while ids.shape[1] < 48:  # each next character is the model's argmax 60% of the time
            best = model(ids).logits[:, -1].argmax(-1).tolist()
            nxt = [b if b >= 4 and rng.random() < 0.6 else 4 + rng.randrange(len(CHARS)) for b in best]
            ids = torch.cat([ids, torch.tensor(nxt).unsqueeze(1)], dim=1)
    docs = ["".join(CHARS[i - 4] for i in row) for row in ids.tolist()]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg_path = root / "eval.yaml"
    cfg_path.write_text(f"""
model: {{hf_config: {model_dir}, tokenizer: {model_dir}}}
data:
  paths: [{root / 'corpus.jsonl'}]
  text_fields: [text]
  use_chat_template: false
  max_prompt_tokens: 600
  val_documents: 4
  max_positions_per_doc: 6
  target_tokens: 3
rollout: {{max_response_tokens: 3, batch_size: 16}}
rl: {{answer_format: raw}}
eval: {{pass_k: 2, temperature: 0.0}}
logging: {{dir: {root / 'run'}}}
""")
    return SimpleNamespace(root=root, model_dir=model_dir, scorer_dir=scorer_dir, cfg_path=cfg_path, hf=model)


@pytest.fixture(scope="module")
def loaded(tiny):
    from megatron_rpt.eval.engine_loading import load_hf_model

    cfg = load_config(tiny.cfg_path, validate_paths=False)
    return cfg, load_hf_model(cfg, tiny.model_dir, name="tiny")


def _problem(ctx: list[int], target: int, entropy: float | None) -> Problem:
    text = "".join(CHARS[i - 4] for i in ctx)
    return Problem(doc_id="d", position=len(ctx), context_text=text, prompt_text=text, prompt_ids=list(ctx),
                   target_ids=[target], target_token_bytes=[b"x"], entropy=entropy)


def _contexts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[4 + rng.randrange(len(CHARS)) for _ in range(rng.randint(4, 40))] for _ in range(n)]


def test_decoder_logits_match_transformers(tiny, loaded):
    from megatron_rpt.eval.next_token import DecoderLogits, prefix_chains

    _, model = loaded
    contexts = _contexts(9, seed=1)
    ours = DecoderLogits(model.engine.model, batch_tokens=50)(contexts)  # several uneven batches
    torch.testing.assert_close(ours.double(), _reference_last_logits(tiny.hf, contexts), atol=1e-4, rtol=1e-4)
    # The positions of one document: prefixes of each other, read from one forward of the longest.
    doc = _contexts(1, seed=5)[0] + _contexts(1, seed=6)[0]
    mixed = [doc[:k] for k in (3, 17, 9, len(doc), 1)] + contexts[:3] + [doc[:9]]
    chains = prefix_chains(mixed)
    assert sorted(map(sorted, chains))[0] == [0, 1, 2, 3, 4, 8]  # one chain holds every prefix of doc
    ours = DecoderLogits(model.engine.model, batch_tokens=60)(mixed)
    torch.testing.assert_close(ours.double(), _reference_last_logits(tiny.hf, mixed), atol=1e-4, rtol=1e-4)


def test_standard_accuracy_by_hand(tiny, loaded):
    from megatron_rpt.eval.runner import ValidationSet, run_evaluation

    cfg, model = loaded
    contexts = _contexts(8, seed=2)
    argmax = _reference_last_logits(tiny.hf, contexts).argmax(-1).tolist()
    # Right on positions 0, 2, 3, 6; difficulty assigned by hand.
    right = [True, False, True, True, False, False, True, False]
    entropies = [0.7, 0.7, 1.2, 1.7, 1.7, 0.2, None, 1.2]
    problems = [_problem(c, a if ok else (a + 1) % VOCAB, e) for c, a, ok, e in zip(contexts, argmax, right, entropies)]
    val = ValidationSet(problems, contexts, entropies, "hand")
    report, _, res = run_evaluation(cfg, model.engine, model.tokenizer, "tiny", ("standard",), val=val, progress=False)
    assert res.standard_pred == argmax
    (row,) = report.rows
    # easy: entropy > 0.5 -> positions 0,1,2,3,4,7 (right: 0,2,3); medium: 2,3,4,7 (2,3); hard: 3,4 (3)
    assert (row.buckets["easy"].count, row.buckets["medium"].count, row.buckets["hard"].count) == (6, 4, 2)
    assert row.buckets["easy"].accuracy == pytest.approx(3 / 6)
    assert row.buckets["medium"].accuracy == pytest.approx(2 / 4)
    assert row.buckets["hard"].accuracy == pytest.approx(1 / 2)


def test_difficulty_scorers(tiny, loaded):
    from megatron_rpt.eval.runner import evaluate_positions, load_validation_set

    cfg, model = loaded
    contexts = _contexts(5, seed=3)
    unscored = [_problem(c, 4, None) for c in contexts]
    # 1. No scorer configured: the evaluated model scores itself, from its own logits.
    val = load_validation_set(cfg, model.tokenizer, problems=unscored)
    assert val.entropies is None and "evaluated model itself" in val.scorer
    assert val.contexts == contexts  # context text re-encoded by the character tokenizer
    res = evaluate_positions(cfg, model.engine, val, ("reasoning",))  # scores first, then generates
    assert val.entropies == pytest.approx(_reference_entropy(_reference_last_logits(tiny.hf, contexts)), abs=1e-4)
    assert res.standard is None  # not asked for: no standard row
    assert [r is not None for r in res.rewards] == [e > 0.5 for e in val.entropies]
    # 2. eval.scorer_model: every position re-scored with that model.
    scfg = from_dict({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "scorer_model": str(tiny.scorer_dir)}})
    val = load_validation_set(scfg, model.tokenizer, problems=unscored)
    expected = _reference_entropy(_reference_last_logits(_hf_model(tiny.scorer_dir), contexts))
    assert val.entropies == pytest.approx(expected, abs=1e-4) and str(tiny.scorer_dir) in val.scorer
    # 3. Entropies carried by the data pipeline (data.proxy_model) are used as they are.
    carried = [_problem(c, 4, e) for c, e in zip(contexts, [0.1, 0.6, 1.1, 1.6, 2.0])]
    val = load_validation_set(cfg, model.tokenizer, problems=carried)
    assert val.entropies == [0.1, 0.6, 1.1, 1.6, 2.0] and "data pipeline" in val.scorer


def test_heldout_positions_caps_and_document_scorer(tiny, loaded):
    """Every position of the held-out documents by default; caps are seeded draws; the scorer model
    scores each held-out document once and matches transformers on each position's context."""
    from megatron_rpt.data import ProblemStream
    from megatron_rpt.eval.runner import load_validation_set

    cfg, model = loaded
    docs = list(ProblemStream(cfg.data, model.tokenizer, split="val").documents())
    assert len(docs) == cfg.data.val_documents == 4
    every = [(d.doc_id, t) for d in docs for t in range(cfg.data.min_context_tokens, len(d.token_ids))]
    val = load_validation_set(cfg, model.tokenizer)
    assert [(p.doc_id, p.position) for p in val.problems] == every  # 4 documents x 32 positions, none filtered
    assert val.selection["documents"] == 4 and val.selection["positions"] == len(every) == 128
    capped = from_dict({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "positions_per_doc": 3}})
    val3 = load_validation_set(capped, model.tokenizer)
    per_doc = {d.doc_id: sum(p.doc_id == d.doc_id for p in val3.problems) for d in docs}
    assert per_doc == {d.doc_id: 3 for d in docs} and val3.selection["positions_per_doc_cap"] == 3
    capped = from_dict({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "max_positions": 10}})
    val10 = load_validation_set(capped, model.tokenizer)
    keys = [(p.doc_id, p.position) for p in val10.problems]
    assert len(keys) == 10 and set(keys) <= set(every) and len({d for d, _ in keys}) > 1  # not the first document
    assert keys == [(p.doc_id, p.position) for p in load_validation_set(capped, model.tokenizer).problems]
    scfg = from_dict({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "positions_per_doc": 5,
                                                "scorer_model": str(tiny.scorer_dir)}})
    scored = load_validation_set(scfg, model.tokenizer)
    expected = _reference_entropy(_reference_last_logits(_hf_model(tiny.scorer_dir), scored.contexts))
    assert scored.entropies == pytest.approx(expected, abs=1e-4) and str(tiny.scorer_dir) in scored.scorer


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def hf_run(tiny):
    from megatron_rpt.eval.__main__ import main

    out = tiny.root / "out_hf"
    assert main(["--config", str(tiny.cfg_path), "--hf", str(tiny.model_dir), "--out", str(out),
                 "--mode", "both", "--quiet", "--save-responses"]) == 0
    return out


def _positions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "positions.jsonl").read_text().splitlines()]


def test_cli_hf_matches_independent_reference(tiny, hf_run):
    from megatron_rpt.data import ProblemStream, load_tokenizer

    cfg = load_config(tiny.cfg_path, validate_paths=False)
    tok = load_tokenizer(tiny.model_dir)
    problems = list(ProblemStream(cfg.data, tok, split="val"))  # every position of the held-out documents
    contexts = [tok(p.context_text, add_special_tokens=False)["input_ids"] for p in problems]
    logits = _reference_last_logits(tiny.hf, contexts)
    ref_pred = logits.argmax(-1).tolist()
    ref_entropy = _reference_entropy(logits)
    rows = _positions(hf_run)
    assert len(rows) == len(problems) > 5
    assert [r["doc_id"] for r in rows] == [p.doc_id for p in problems]
    assert [r["entropy"] for r in rows] == pytest.approx(ref_entropy, abs=1e-4)
    correct = [float(a == p.target_ids[0]) for a, p in zip(ref_pred, problems)]
    assert [r["standard_correct"] for r in rows] == correct
    assert 0 < sum(correct) < len(correct)  # the corpus is half-predictable: a real test of the comparison
    report = json.loads((hf_run / "eval.json").read_text())
    std = next(r for r in report["rows"] if r["mode"] == "standard")["buckets"]
    for name, th in zip(("easy", "medium", "hard"), cfg.data.difficulty_thresholds):
        members = [c for c, e in zip(correct, ref_entropy) if e > th]
        assert std[name]["count"] == len(members)
        if members:
            assert std[name]["accuracy"] == pytest.approx(sum(members) / len(members))
    # Reasoning rows: only positions in a bucket were generated; Pass@k >= Random@1.
    metrics = {r["metric"]: r["buckets"] for r in report["rows"] if r["mode"] == "reasoning"}
    assert set(metrics) == {"random@1", "pass@2"}
    for name in ("easy", "medium", "hard"):
        if metrics["pass@2"][name]["count"]:
            assert metrics["pass@2"][name]["accuracy"] >= metrics["random@1"][name]["accuracy"]
    for r, e in zip(rows, ref_entropy):
        assert ("rewards" in r) == (e > 0.5)
        if "rewards" in r:
            assert len(r["rewards"]) == 2 and len(r["responses"]) == 2
    assert (hf_run / "eval.md").read_text().startswith("# Next-token prediction accuracy")


def _megatron_eval_worker(cfg_path: str, ckpt_root: str, out: str) -> tuple[int, bool, bool]:
    """The CLI's exit code, and whether the process group the Megatron load creates is gone after a
    block that failed (so the next load in this process can start) and after the CLI."""
    import torch.distributed as dist

    from megatron_rpt.eval.__main__ import main
    from megatron_rpt.eval.engine_loading import model_in_engine

    cfg = load_config(cfg_path, [], validate_paths=False)
    with pytest.raises(ValueError, match="inside the block"):
        with model_in_engine(cfg, None, ckpt_root):
            assert dist.is_initialized()
            raise ValueError("inside the block")
    torn_down_after_error = not dist.is_initialized()
    rc = main(["--config", cfg_path, "--ckpt", ckpt_root, "--out", out, "--mode", "standard", "--quiet"])
    return rc, torn_down_after_error, not dist.is_initialized()


@pytest.mark.slow
def test_cli_megatron_checkpoint_matches_hf(tiny, hf_run, two_rank_run):
    """A TP=2 training checkpoint (its vocabulary padded for TP=2) evaluated at TP=1 gives the HF numbers."""
    from megatron_rpt.distributed import spawn

    out = tiny.root / "out_mcore"
    assert spawn(_megatron_eval_worker, 1, str(tiny.cfg_path), str(two_rank_run.ckpt_root), str(out)) == [
        (0, True, True)]
    ours, ref = _positions(out), _positions(hf_run)
    assert [r["standard_prediction"] for r in ours] == [r["standard_prediction"] for r in ref]
    assert [r["entropy"] for r in ours] == pytest.approx([r["entropy"] for r in ref], abs=1e-4)
    report = json.loads((out / "eval.json").read_text())
    assert report["meta"]["source"].startswith("megatron:") and report["meta"]["source"].endswith("iter_0000003/dist")
    std = lambda rep: next(r for r in rep["rows"] if r["mode"] == "standard")["buckets"]  # noqa: E731
    assert std(report) == std(json.loads((hf_run / "eval.json").read_text()))


def test_cli_bad_paths(tiny, tmp_path, capsys):
    from megatron_rpt.eval.__main__ import main

    base = ["--config", str(tiny.cfg_path), "--quiet", "--out", str(tmp_path / "o")]
    assert main(base + ["--hf", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(base + ["--hf", str(tiny.root)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(base + ["--ckpt", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(base + ["--ckpt", str(tmp_path / "empty")]) == 2
    assert "not a Megatron distributed checkpoint" in capsys.readouterr().err
    (tmp_path / "iter_0000005" / "dist").mkdir(parents=True)
    assert main(base + ["--ckpt", str(tmp_path / "iter_0000005")]) == 2
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written


# ----------------------------------------------------------------------------- training hook


def _two_rank_worker(cfg_path: str, hf_dir: str, log_dir: str, ckpt_root: str) -> dict:
    """Two ranks: the training hook at data-parallel size 2, then a TP=2 training-layout checkpoint
    (iter_0000003/dist + complete.json + latest, and an older incomplete iter_0000001)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_rpt.config import ModelConfig, ParallelConfig
    from megatron_rpt.distributed import init_distributed
    from megatron_rpt.eval import evaluate_during_training
    from megatron_rpt.eval.engine_loading import load_hf_model
    from megatron_rpt.model.build import build_model_chunks
    from megatron_rpt.model.hf_config import load_hf_config
    from megatron_rpt.rollout.layout import RolloutLayout
    from megatron_rpt.topology import Topology
    from megatron_rpt.weights.load import load_hf_into_model
    from megatron_rpt.weights.megatron_ckpt import save_model_checkpoint

    init_distributed(1, 1)  # data-parallel size 2
    cfg = load_config(cfg_path, [f"logging.dir={log_dir}"], validate_paths=False)
    model = load_hf_model(cfg, hf_dir)
    trainer = SimpleNamespace(cfg=cfg, engine=model.engine, tokenizer=model.tokenizer,
                              layout=RolloutLayout.build(cfg.parallel, cfg.rollout.tensor_parallel, Topology.current()),
                              dp_size=parallel_state.get_data_parallel_world_size())
    first = evaluate_during_training(trainer, step=5)
    second = evaluate_during_training(trainer, step=6)  # cached positions and (self-scored) buckets

    init_distributed(2, 1)
    arch = load_hf_config(hf_dir)
    chunks = build_model_chunks(arch, ModelConfig(), ParallelConfig(tensor_parallel=2),
                                config_overrides={"perform_initialization": False})
    load_hf_into_model(chunks, hf_dir, arch)
    it = Path(ckpt_root) / "iter_0000003"
    save_model_checkpoint(chunks, it / "dist")
    if dist.get_rank() == 0:
        (it / "complete.json").write_text(json.dumps({"step": 3}))
        (Path(ckpt_root) / "iter_0000001").mkdir()
        (Path(ckpt_root) / "latest").write_text("iter_0000003\n")
    dist.barrier()
    return {"first": first, "second": second, "dp_size": trainer.dp_size}


@pytest.fixture(scope="module")
def two_rank_run(tiny):
    from megatron_rpt.distributed import spawn

    log_dir, ckpt_root = tiny.root / "hook_log", tiny.root / "ckpts"
    results = spawn(_two_rank_worker, 2, str(tiny.cfg_path), str(tiny.model_dir), str(log_dir), str(ckpt_root))
    return SimpleNamespace(results=results, log_dir=log_dir, ckpt_root=ckpt_root)


@pytest.mark.slow
def test_evaluate_during_training_two_ranks_equals_one(tiny, loaded, two_rank_run):
    from megatron_rpt.eval import evaluate_during_training

    cfg, model = loaded
    single = evaluate_during_training((cfg, model.engine, model.tokenizer), step=5)
    assert {"val/standard_acc_easy", "val/reasoning_random1_hard", "val/reasoning_passk_medium",
            "val/count_easy", "val/positions", "val/time_s"} <= set(single)
    for r in two_rank_run.results:
        assert r["dp_size"] == 2
        for metrics in (r["first"], r["second"]):
            for key, value in single.items():
                if key in ("val/time_s", "val/generated_tokens"):
                    continue
                assert (math.isnan(value) and math.isnan(metrics[key])) or metrics[key] == pytest.approx(value), key
    assert (two_rank_run.log_dir / "eval" / "step_000006.md").is_file()
