"""tools/prepare_data.py end to end on OmniMATH with a tiny random proxy (real Qwen2.5 vocabulary),
and ProblemStream over the prepared shards (entropy-filtered positions, resume, checks)."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_rpt.config import ConfigError, DataConfig
from megatron_rpt.data import ProblemStream, load_tokenizer
from megatron_rpt.data.entropy_filter import topk_entropy
from megatron_rpt.data.tiny_proxy import make_tiny_proxy
from megatron_rpt.data.tokenizer import encode_document
from tests.conftest import shared_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import prepare_data  # noqa: E402

MAX_DOCS = 4
FIELDS = ["problem"]  # problems only: short documents keep the CPU test fast


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    omni = shared_path("data/omni_math_rule.jsonl")
    tok_dir = shared_path("tokenizers/r1_distill_qwen")
    root = tmp_path_factory.mktemp("prep")
    proxy = make_tiny_proxy(root / "proxy", vocab_size=151665)
    out = root / "prepared"
    manifest = prepare_data.main(["--input", str(omni), "--tokenizer", str(tok_dir), "--proxy", str(proxy),
                                  "--out", str(out), "--max-docs", str(MAX_DOCS), "--shard-size", "3",
                                  "--text-fields", *FIELDS,
                                  "--batch-tokens", "4096", "--device", "cpu", "--no-progress"])
    return {"omni": omni, "tok_dir": tok_dir, "tok": load_tokenizer(tok_dir), "proxy": proxy, "out": out,
            "manifest": manifest}


def read_shards(out):
    import pyarrow.parquet as pq

    rows = []
    for f in sorted(out.glob("shard-*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def test_manifest_counts_match_the_shards(env):
    m = json.loads((env["out"] / "manifest.json").read_text())
    assert m == env["manifest"]
    assert m["num_docs"] == MAX_DOCS and [s["docs"] for s in m["shards"]] == [3, 1]
    rows = read_shards(env["out"])
    ent = np.concatenate([np.asarray(r["entropy"][1:], dtype=np.float64) for r in rows])
    assert np.isnan([r["entropy"][0] for r in rows]).all()
    assert m["counts"] == {"scored": ent.size, "kept": int((ent > 0.5).sum()), "easy": int((ent > 0.5).sum()),
                           "medium": int((ent > 1.0).sum()), "hard": int((ent > 1.5).sum())}
    c = m["counts"]
    assert c["scored"] >= c["easy"] >= c["medium"] >= c["hard"] > 0 and c["scored"] > c["easy"]
    assert m["top_k"] == 16 and m["difficulty_thresholds"] == [0.5, 1.0, 1.5] and m["threshold"] == 0.5
    assert m["tokenizer"]["hash"] == hashlib.sha256((env["tok_dir"] / "tokenizer.json").read_bytes()).hexdigest()
    assert m["proxy"]["config_hash"] == hashlib.sha256((env["proxy"] / "config.json").read_bytes()).hexdigest()
    assert m["sources"][0]["rows"] == 2821 and m["bad_rows"] == {} and m["num_tokens"] == ent.size + MAX_DOCS
    assert not list(env["out"].glob(".*tmp*"))  # no temporary files left behind


def _first_writable(tokens: list[bytes], escapes: bool) -> int | None:
    """Reference: the first prefix of the continuation that the real extractor gives back unchanged."""
    from megatron_rpt.reward import extract_prediction

    for k in range(1, len(tokens) + 1):
        try:
            text = b"".join(tokens[:k]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if extract_prediction("</think>\\boxed{" + text + "}", escapes=escapes) == text:
            return k
    return None


def test_manifest_counts_unwinnable_positions(env):
    from megatron_rpt.data.tokenizer import token_bytes

    m = env["manifest"]
    for rule, escapes in (("boxed_escapes", True), ("boxed_no_escapes", False)):
        never = not_first = 0
        for r in read_shards(env["out"]):
            tb = token_bytes(env["tok"], r["token_ids"])
            for t in range(1, len(tb)):
                w = _first_writable(tb[t:], escapes)
                never += w is None
                not_first += w != 1
        assert m["unwinnable"][rule]["never"]["all"] == never
        assert m["unwinnable"][rule]["not_first_token"]["all"] == not_first
    esc = m["unwinnable"]["boxed_escapes"]
    assert esc["not_first_token"]["all"] >= esc["never"]["all"] > 0  # LaTeX problems: some "}" positions
    assert esc["never"]["easy"] <= esc["never"]["all"]


def test_shards_hold_the_tokens_and_reference_entropies(env):
    rows = read_shards(env["out"])
    raw = [json.loads(line) for line in open(env["omni"])][:MAX_DOCS]
    tok = env["tok"]
    for i, (r, src) in enumerate(zip(rows, raw)):
        assert r["doc_id"] == f"omni_math_rule.jsonl:{i}"
        assert r["token_ids"] == encode_document(tok, src["problem"])
    # Reference: the first document alone through an unpacked transformers forward, float64 entropy.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(env["proxy"]), dtype=torch.float32).eval()
    ids = rows[0]["token_ids"]
    with torch.no_grad():
        ref = topk_entropy(model(torch.tensor([ids])).logits[0].double(), 16).numpy()[:-1]
    np.testing.assert_allclose(np.asarray(rows[0]["entropy"][1:]), ref, atol=2e-4)


def prepared_cfg(env, **kw):
    return DataConfig(prepared=str(env["out"]), text_fields=FIELDS,
                      **{"val_documents": 0, "max_positions_per_doc": 4, **kw})


def test_problem_stream_over_prepared_shards(env):
    rows = {r["doc_id"]: r for r in read_shards(env["out"])}
    cfg = prepared_cfg(env, entropy_threshold=1.0, max_prompt_tokens=1024)
    problems = [next(s) for s in [ProblemStream(cfg, env["tok"])] for _ in range(4 * MAX_DOCS)]
    assert {p.doc_id for p in problems} == set(rows)
    for p in problems:
        e = rows[p.doc_id]["entropy"][p.position]
        assert p.entropy == pytest.approx(e, abs=1e-6) and e > 1.0
        assert p.target_ids == rows[p.doc_id]["token_ids"][p.position:]  # the whole continuation (eq. 3)
        assert p.splits[:2] == ("easy", "medium") and p.difficulty == p.splits[-1]
        assert (p.difficulty == "hard") == (e > 1.5)
    val_cfg = prepared_cfg(env, val_documents=1)
    val = list(ProblemStream(val_cfg, env["tok"], split="val"))
    train = [next(s) for s in [ProblemStream(val_cfg, env["tok"])] for _ in range(10)]
    assert len({p.doc_id for p in val}) == 1 and not {p.doc_id for p in val} & {p.doc_id for p in train}
    # Held-out positions are not filtered by the training proxy: the easy ones (<= 0.5) are there too.
    held = rows[val[0].doc_id]
    assert [p.position for p in val] == list(range(val_cfg.min_context_tokens, len(held["token_ids"])))
    assert any(p.entropy <= val_cfg.entropy_threshold for p in val)


def key(p):
    return (p.doc_id, p.position)


def test_prepared_stream_resumes_exactly(env):
    cfg = prepared_cfg(env, max_positions_per_doc=2, max_prompt_tokens=512)
    ref_stream = ProblemStream(cfg, env["tok"])
    ref = [next(ref_stream) for _ in range(20)]  # 8 per epoch: crosses epochs (with reshuffled order)
    assert [key(p) for p in ref[:8]] != [key(p) for p in ref[8:16]]
    for k in (0, 1, 2, 7, 8, 9, 15):
        s = ProblemStream(cfg, env["tok"])
        head = [next(s) for _ in range(k)]
        state = json.loads(json.dumps(s.state_dict()))
        fresh = ProblemStream(cfg, env["tok"])
        fresh.load_state_dict(state)
        assert head + [next(fresh) for _ in range(4)] == ref[:k + 4], k


def test_on_the_fly_proxy_filters_positions(env):
    from megatron_rpt.data.entropy_filter import ProxyScorer

    rows = read_shards(env["out"])
    cfg = DataConfig(paths=[str(env["omni"])], text_fields=FIELDS, val_documents=0, entropy_threshold=1.5,
                     max_positions_per_doc=3)
    stream = ProblemStream(cfg, env["tok"], proxy=ProxyScorer(env["proxy"], device="cpu"))
    first = [next(stream) for _ in range(3)]
    assert {p.doc_id for p in first} == {"omni_math_rule.jsonl:0"}
    for p in first:
        assert p.entropy > 1.5 and p.difficulty == "hard"
        assert p.entropy == pytest.approx(rows[0]["entropy"][p.position], abs=2e-4)  # same as prepared


def test_prepared_data_checks(env, tmp_path):
    char_tok = load_tokenizer(shared_path("models/tiny_random_llama"))
    with pytest.raises(ValueError, match="does not match"):
        ProblemStream(prepared_cfg(env), char_tok)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(env["out"], unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="did not finish"):
        ProblemStream(DataConfig(prepared=str(unfinished)), env["tok"])
    # a prepared directory given in data.paths is recognised too
    s = ProblemStream(DataConfig(paths=[str(env["out"])], val_documents=0), env["tok"])
    assert s.prepared_dir == env["out"]


def test_cli_rejects_bad_arguments(env, tmp_path):
    base = ["--tokenizer", str(env["tok_dir"]), "--proxy", str(env["proxy"])]
    with pytest.raises(SystemExit, match="--input .*does not exist"):
        prepare_data.main(["--input", str(tmp_path / "nope.jsonl"), *base, "--out", str(tmp_path / "o")])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not prepare_data's")
    with pytest.raises(SystemExit, match="not an empty directory or an unfinished prepare_data run"):
        prepare_data.main(["--input", str(env["omni"]), *base, "--out", str(foreign)])
    # The finished output of other settings (here: both text fields) is not resumed into.
    with pytest.raises(prepare_data.UserError,
                       match=r"holds a run with other inputs or settings \(mixture.corpora\[0\].text_fields: "
                             r"\[\"problem\"\] there, \[\"problem\", \"solution\"\] here\)"):
        prepare_data.main(["--input", str(env["omni"]), *base, "--out", str(env["out"]), "--max-docs", str(MAX_DOCS),
                           "--shard-size", "3", "--batch-tokens", "4096", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--max-docs=0"):
        prepare_data.main(["--input", str(env["omni"]), *base, "--out", str(tmp_path / "o"), "--max-docs", "0"])
    with pytest.raises(ConfigError, match="no config.json"):
        prepare_data.main(["--input", str(env["omni"]), "--tokenizer", str(env["tok_dir"]), "--proxy",
                           str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="increasing"):
        prepare_data.main(["--input", str(env["omni"]), *base, "--out", str(tmp_path / "o"),
                           "--difficulty-thresholds", "1.0", "0.5"])
    bad_fields = tmp_path / "o2"
    with pytest.raises(ValueError, match="no usable documents"):
        prepare_data.main(["--input", str(env["omni"]), *base, "--out", str(bad_fields), "--max-docs", "2",
                           "--text-fields", "nonexistent", "--no-progress"])
    assert not list(tmp_path.glob("o*"))  # nothing half-written, no temporary directory left
