"""Problem construction from raw documents (no proxy): contexts, targets, prompts, the held-out
split, data-parallel sharding and exact resume."""

import json
import unicodedata
from dataclasses import replace

import pytest

from megatron_rpt.config import ConfigError, DataConfig
from megatron_rpt.data import Problem, ProblemStream, load_tokenizer
from megatron_rpt.data.corpus import heldout_doc_ids, open_sources
from megatron_rpt.data.templates import render_prompt
from megatron_rpt.data.tokenizer import encode_document, token_bytes
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(shared_path("tokenizers/r1_distill_qwen"))


@pytest.fixture(scope="module")
def omni():
    return shared_path("data/omni_math_rule.jsonl")


@pytest.fixture(scope="module")
def omni_rows(omni):
    return [json.loads(line) for line in open(omni)]


def take(stream, n):
    return [next(stream) for _ in range(n)]


def key(p: Problem):
    return (p.doc_id, p.position)


def test_problems_cut_the_document_correctly(tok, omni, omni_rows):
    cfg = DataConfig(paths=[str(omni)], max_prompt_tokens=300, target_tokens=8, min_context_tokens=16)
    problems = take(ProblemStream(cfg, tok), 60)
    assert len({p.doc_id for p in problems}) > 3
    cut = 0
    for p in problems:
        row = omni_rows[int(p.doc_id.split(":")[1])]
        text = unicodedata.normalize("NFC", row["problem"] + "\n\n" + row["solution"])
        ids = encode_document(tok, text)
        tb = token_bytes(tok, ids)
        t = p.position
        assert 16 <= t < len(ids)
        assert p.target_ids == ids[t:t + 8]
        assert p.target_token_bytes == tb[t:t + 8]
        prefix = b"".join(tb[:t]).decode("utf-8")  # the position is on a character boundary
        assert prefix.endswith(p.context_text) and p.context_text
        assert p.context_ids == ids[t - len(p.context_ids):t]
        assert b"".join(token_bytes(tok, p.context_ids)) == p.context_text.encode()
        # context + target is a real piece of the document
        assert (p.context_text.encode() + b"".join(p.target_token_bytes)) in text.encode()
        assert p.prompt_text == render_prompt(p.context_text, tok, "v0", True)
        assert p.prompt_ids == tok(p.prompt_text, add_special_tokens=False)["input_ids"]
        assert len(p.prompt_ids) <= 300
        if p.context_text != prefix:  # left-truncated: only as much as needed
            cut += 1
            assert len(p.prompt_ids) >= 300 - 16
            assert len(p.prompt_ids) - len(tok(render_prompt("", tok, "v0", True),
                                                add_special_tokens=False)["input_ids"]) > 100
        assert p.entropy is None and p.difficulty is None and p.splits == ()
    assert cut > 5  # max_prompt_tokens=300 really cuts contexts of these documents


def test_positions_are_seeded_and_deterministic(tok, omni):
    cfg = DataConfig(paths=[str(omni)], max_positions_per_doc=4)
    a = [key(p) for p in take(ProblemStream(cfg, tok), 20)]
    b = [key(p) for p in take(ProblemStream(cfg, tok), 20)]
    c = [key(p) for p in take(ProblemStream(replace(cfg, seed=99), tok), 20)]
    assert a == b and a != c
    per_doc = {}
    for d, _ in a:
        per_doc[d] = per_doc.get(d, 0) + 1
    assert max(per_doc.values()) == 4


def test_heldout_split_is_never_trained_on(tok, omni):
    cfg = DataConfig(paths=[str(omni)], val_documents=200, max_positions_per_doc=1)
    held = heldout_doc_ids(open_sources([omni]), 200, cfg.seed)
    stream = ProblemStream(cfg, tok, split="val")
    docs = list(stream.documents())
    assert {d.doc_id for d in docs} == set(held) and len(docs) == 200
    # The held-out split is every position of those documents, not max_positions_per_doc of them.
    first = list(ProblemStream(cfg, tok, split="val").documents())[0]
    positions = [p.position for p in stream.problems_for(first)]
    assert positions == list(range(cfg.min_context_tokens, len(first.token_ids))) or (
        len(positions) > 0.9 * (len(first.token_ids) - cfg.min_context_tokens))
    train = take(ProblemStream(cfg, tok, split="train"), 400)
    assert not {p.doc_id for p in train} & held
    assert len(train) == 400 and len({p.doc_id for p in train}) == 400


def test_data_parallel_ranks_get_disjoint_documents(tok, omni):
    cfg = DataConfig(paths=[str(omni)], max_positions_per_doc=2)
    r0 = take(ProblemStream(cfg, tok, dp_rank=0, dp_size=2), 40)
    r1 = take(ProblemStream(cfg, tok, dp_rank=1, dp_size=2), 40)
    assert not {p.doc_id for p in r0} & {p.doc_id for p in r1}
    rows0 = sorted({int(p.doc_id.split(":")[1]) % 2 for p in r0})
    assert rows0 == [0]  # global row stride (no held-out row breaks the parity)


def small_corpus(tmp_path, n=3):
    text = ("The quick brown fox jumps over the lazy dog while 你好 the cat sleeps; "
            "then $x^2 + y^2 = z^2$ holds for 𠜎 every right triangle we can draw. ")
    rows = [{"problem": f"Problem {i}: " + text * (i + 1), "solution": "Solution."} for i in range(n)]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_resume_yields_identical_next_problems_across_epochs(tok, tmp_path):
    path = small_corpus(tmp_path)
    cfg = DataConfig(paths=[str(path)], val_documents=0, max_positions_per_doc=3, max_prompt_tokens=200)
    ref = take(ProblemStream(cfg, tok), 25)  # 3 docs x 3 positions = 9 per epoch: crosses 2 epoch boundaries
    assert {key(p) for p in ref[:9]} != {key(p) for p in ref[9:18]}  # a new draw every epoch
    for k in range(0, 20):
        s = ProblemStream(cfg, tok)
        head = take(s, k)
        state = json.loads(json.dumps(s.state_dict()))
        fresh = ProblemStream(cfg, tok)
        fresh.load_state_dict(state)
        assert head + take(fresh, 5) == ref[:k + 5], k


def test_resume_with_a_different_dp_layout_is_refused(tok, tmp_path):
    cfg = DataConfig(paths=[str(small_corpus(tmp_path))], val_documents=0)
    state = ProblemStream(cfg, tok, dp_rank=0, dp_size=2).state_dict()
    with pytest.raises(ValueError, match="same data-parallel size"):
        ProblemStream(cfg, tok, dp_rank=0, dp_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="split"):
        ProblemStream(cfg, tok, split="val").load_state_dict(ProblemStream(cfg, tok).state_dict())


def test_bad_settings_have_clear_errors(tok, tmp_path):
    path = small_corpus(tmp_path)
    with pytest.raises(ConfigError, match="data.max_prompt_tokens"):
        ProblemStream(DataConfig(paths=[str(path)], val_documents=0, max_prompt_tokens=100), tok)
    too_short = DataConfig(paths=[str(path)], val_documents=0, min_context_tokens=100000)
    with pytest.raises(ConfigError, match=r"no problems from 3 documents.*data\.min_context_tokens=100000"):
        next(ProblemStream(too_short, tok))
    with pytest.raises(ValueError, match="split"):
        ProblemStream(DataConfig(paths=[str(path)], val_documents=0), tok, split="test")
    with pytest.raises(ConfigError, match=r"data\.val_documents=200 holds out every document of the corpus \(3 rows"):
        ProblemStream(DataConfig(paths=[str(path)]), tok)  # 3 documents, 200 held out


def test_empty_and_all_bad_corpora_say_so(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"the corpus is empty: data\.paths=\[.*empty\.jsonl'\] hold no rows"):
        ProblemStream(DataConfig(paths=[str(empty)]), tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n' * 5)
    with pytest.raises(ConfigError, match=r"every row .* is bad \(5 rows: \{'missing_field:problem': 5\}\); check "
                                          r"data\.text_fields=\['problem', 'solution'\]"):
        next(ProblemStream(DataConfig(paths=[str(bad)], val_documents=0), tok))
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(ConfigError, match=r"fake\.parquet is not a readable Parquet file .*data\.paths"):
        ProblemStream(DataConfig(paths=[str(fake)]), tok)


def test_problem_dict_round_trip(tok, tmp_path):
    cfg = DataConfig(paths=[str(small_corpus(tmp_path))], val_documents=0)
    p = next(ProblemStream(cfg, tok))
    d = json.loads(json.dumps(p.to_dict()))
    assert Problem.from_dict(d) == p
