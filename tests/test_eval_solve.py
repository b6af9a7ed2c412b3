"""Problem-solving responses for the reasoning-pattern comparison (paper section 4.5): the command end to end
on a tiny random model with the real Qwen2.5 vocabulary, and its output read by the pattern analysis."""

from __future__ import annotations

import json

import pytest

from megatron_rpt.config import load_config
from megatron_rpt.eval import patterns
from megatron_rpt.eval.solve import SOLVING_INSTRUCTION, heldout_problems, main, solving_prompt
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_rpt.model.zoo import ensure_tiny_random

    tok_dir = shared_path("tokenizers/qwen2_5")
    root = tmp_path_factory.mktemp("solve")
    model = ensure_tiny_random(tok_dir, cache=root / "cache")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "solution": f"It is {2 * i}."}) + "\n"
                              for i in range(6)))
    cfg = root / "cfg.yaml"
    cfg.write_text(f"""
model: {{hf_config: {model}, tokenizer: {tok_dir}}}
data: {{paths: [{corpus}], val_documents: 2, use_chat_template: false, template: raw}}
rollout: {{batch_size: 8}}
eval: {{max_response_tokens: 5, temperature: 1.0}}
""")
    return root, model, cfg


def test_prompt_by_hand(setup):
    from megatron_rpt.data.tokenizer import load_tokenizer

    root, model, _ = setup
    tok = load_tokenizer(model)
    assert solving_prompt("What is 1 + 1?", tok, use_chat_template=False) == (
        "What is 1 + 1?\nPlease reason step by step, and put your final answer within \\boxed{}.")
    chat = solving_prompt("What is 1 + 1?", tok, use_chat_template=True)
    assert chat.index("What is 1 + 1?") < chat.index(SOLVING_INSTRUCTION) and chat != "What is 1 + 1?"


def test_solve_writes_responses_the_pattern_analysis_reads(setup, capsys):
    from megatron_rpt.data.corpus import heldout_doc_ids

    root, model, cfg_path = setup
    cfg = load_config(cfg_path, validate_paths=False)
    held = heldout_doc_ids([f"corpus.jsonl:{i}" for i in range(6)], 2, cfg.data.seed)
    assert {d for d, _ in heldout_problems(cfg, "problem")} == set(held)
    out = root / "out"
    assert main(["--config", str(cfg_path), "--hf", str(model), "--out", str(out), "--samples", "2", "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["doc_id"] for r in rows} == set(held)
    for r in rows:
        i = int(r["doc_id"].split(":")[1])
        assert r["problem"] == f"What is {i} + {i}?" and isinstance(r["response"], str)
    # The comparison the paper makes: next-token reasoning responses vs problem-solving responses.
    positions = root / "positions.jsonl"
    positions.write_text(json.dumps({"doc_id": "x", "responses": ["Wait, probably 'the'.", "Finally: 9."]}) + "\n")
    assert patterns.main(["--rollouts", str(positions), "--compare", str(out / "responses.jsonl")]) == 0
    table = capsys.readouterr().out
    assert "(n=2)" in table and "(n=4)" in table


def test_solve_bad_field(setup, capsys):
    root, model, cfg_path = setup
    assert main(["--config", str(cfg_path), "--hf", str(model), "--out", str(root / "bad"), "--field", "nope"]) == 2
    assert "--field" in capsys.readouterr().err and not (root / "bad").exists()
