"""Corpus streaming: file formats, bad rows, sharding, held-out split and exact resume."""

import hashlib
import json
import logging

import pytest

from megatron_rpt.config import ConfigError
from megatron_rpt.data.corpus import CorpusStream, heldout_doc_ids, open_sources

FIELDS = ["problem", "solution"]


def rows(n, start=0):
    return [{"problem": f"P{i}", "solution": f"S{i}", "other": i} for i in range(start, start + n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def write_parquet(path, items, row_group_size=3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(items), path, row_group_size=row_group_size)
    return path


def texts(stream):
    return [(d.doc_id, d.text) for d in stream]


def test_jsonl_bad_rows_are_counted_and_skipped(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"problem": "P0", "solution": "S0"}).encode(),
        b"{not json",
        b'{"problem": "P2", "solution": "caf\xe9"}',  # latin-1 byte: not UTF-8
        json.dumps({"problem": "P3"}).encode(),  # missing solution
        json.dumps({"problem": "", "solution": "  "}).encode(),  # empty text
        b"[1, 2]",  # not an object
        b"",  # blank line: ignored, still a row index
        json.dumps({"problem": 5, "solution": "S7"}).encode(),  # not a string
        json.dumps({"problem": "P8", "solution": "S8"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines))  # no trailing newline on the last row
    stream = CorpusStream(open_sources([path]), FIELDS, " | ")
    with caplog.at_level(logging.WARNING):
        docs = texts(stream)
    assert docs == [("mixed.jsonl:0", "P0 | S0"), ("mixed.jsonl:8", "P8 | S8")]
    assert stream.bad_rows.state_dict() == {"not_json": 1, "non_utf8": 1, "missing_field:solution": 1,
                                            "empty_text": 1, "not_an_object": 1, "not_a_string:problem": 1}
    assert any("skipping bad row" in r.message for r in caplog.records)
    assert sum("skipping bad row" in r.message for r in caplog.records) == 1  # rate limited
    assert open_sources([path])[0].num_rows() == 9


def test_parquet_directory_and_hf_sources_agree(tmp_path):
    items = rows(10)
    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "a.jsonl", items[:4])
    write_parquet(d / "b.parquet", items[4:])
    stream = CorpusStream(open_sources([d]), FIELDS)
    docs = texts(stream)
    assert [t for _, t in docs] == [f"P{i}\n\nS{i}" for i in range(10)]
    assert docs[0][0] == "corpus/a.jsonl:0" and docs[4][0] == "corpus/b.parquet:0"

    import datasets

    datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "saved"))
    saved = texts(CorpusStream(open_sources([tmp_path / "saved"]), FIELDS))
    assert [t for _, t in saved] == [t for _, t in docs] and saved[3][0] == "saved/train:3"

    jdir = tmp_path / "hfjson"
    jdir.mkdir()
    write_jsonl(jdir / "part.jsonl", items)
    streamed = texts(CorpusStream(open_sources(hf_dataset=str(jdir), hf_streaming=True), FIELDS))
    assert [t for _, t in streamed] == [t for _, t in docs] and streamed[0][0] == "hfjson/train:0"


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "hf_streaming", "hf_saved"])
def test_resume_gives_the_exact_next_document(tmp_path, kind):
    items = rows(11)
    if kind == "jsonl":
        paths, hf = [write_jsonl(tmp_path / "c.jsonl", items)], None
    elif kind == "parquet":
        paths, hf = [write_parquet(tmp_path / "c.parquet", items)], None
    elif kind == "hf_saved":
        import datasets

        datasets.Dataset.from_list(items).save_to_disk(str(tmp_path / "saved"))
        paths, hf = [tmp_path / "saved"], None
    else:
        (tmp_path / "j").mkdir()
        write_jsonl(tmp_path / "j" / "c.jsonl", items)
        paths, hf = [], str(tmp_path / "j")
    full = texts(CorpusStream(open_sources(paths, hf), FIELDS, shard=1, num_shards=2))
    assert [t for _, t in full] == [f"P{i}\n\nS{i}" for i in range(1, 11, 2)]
    for k in (0, 1, 3, len(full)):
        a = CorpusStream(open_sources(paths, hf), FIELDS, shard=1, num_shards=2)
        it = iter(a)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(a.state_dict()))  # states survive JSON (checkpoints)
        b = CorpusStream(open_sources(paths, hf), FIELDS, shard=1, num_shards=2)
        b.load_state_dict(state)
        assert texts(head) + texts(b) == full, k


def test_jsonl_resume_seeks_instead_of_rereading(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", rows(5))
    a = CorpusStream(open_sources([path]), FIELDS)
    it = iter(a)
    next(it), next(it)
    cursor = a.state_dict()["cursor"]
    assert cursor["row"] == 2 and cursor["offset"] == len("".join(json.dumps(r) + "\n" for r in rows(2)))


def test_sharding_partitions_the_corpus_across_ranks_and_workers(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", rows(7))
    write_jsonl(tmp_path / "b.jsonl", rows(6, start=7))
    srcs = lambda: open_sources([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])  # noqa: E731
    everything = texts(CorpusStream(srcs(), FIELDS))
    dp, workers = 2, 2
    parts = [texts(CorpusStream(srcs(), FIELDS, shard=r * workers + w, num_shards=dp * workers))
             for r in range(dp) for w in range(workers)]
    flat = [d for p in parts for d in p]
    assert sorted(flat) == sorted(everything) and len(flat) == 13
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # global stride, not per file
    assert parts == [texts(CorpusStream(srcs(), FIELDS, shard=s, num_shards=4)) for s in range(4)]  # deterministic


def test_heldout_is_the_smallest_seeded_hashes(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", rows(50))
    ids = [f"c.jsonl:{i}" for i in range(50)]
    ref = sorted(ids, key=lambda d: hashlib.sha256(f"7:{d}".encode()).digest()[:8])[:5]
    held = heldout_doc_ids(open_sources([path]), 5, seed=7)
    assert held == set(ref)
    assert heldout_doc_ids(ids, 5, seed=7) == held
    assert heldout_doc_ids(open_sources([path]), 5, seed=8) != held
    train = texts(CorpusStream(open_sources([path]), FIELDS, keep=lambda d: d not in held))
    val = texts(CorpusStream(open_sources([path]), FIELDS, keep=lambda d: d in held))
    assert len(train) == 45 and {d for d, _ in val} == held


def test_source_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data.paths\[0\]"):
        open_sources([tmp_path / "nope.jsonl"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        open_sources([tmp_path / "x.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="directory without"):
        open_sources([tmp_path / "empty"])
    with pytest.raises(ValueError, match="no data"):
        open_sources([])
    write_jsonl(tmp_path / "c.jsonl", rows(3))
    a = CorpusStream(open_sources([tmp_path / "c.jsonl"]), FIELDS, shard=0, num_shards=2)
    b = CorpusStream(open_sources([tmp_path / "c.jsonl"]), FIELDS, shard=1, num_shards=2)
    with pytest.raises(ValueError, match="same data-parallel size"):
        b.load_state_dict(a.state_dict())
