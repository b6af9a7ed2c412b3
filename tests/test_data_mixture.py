"""Corpus mixtures (megatron_rpt/data/mixture.py): the weighted document sequence against a
hand-derived one, dedup and length filters, the shares on ../shared's three math corpora, the
config section, resumable reader shares, and the trainer's mixture metrics."""

import hashlib
import json

import pytest

from megatron_rpt.config import ConfigError, CorpusConfig, DataConfig, load_config
from megatron_rpt.data.mixture import Mixture, MixtureStream, check_same_mixture, mixture_metrics
from tests.conftest import shared_path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def two_corpora(tmp_path):
    texts = ("alpha zero", "shared text", "x", "alpha three", "alpha four", "alpha five")
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    b = write_jsonl(tmp_path / "b.jsonl", [{"q": "beta", "a": "zero"}, {"q": "shared", "a": "text"},
                                           {"q": "no answer"}, {"q": "beta", "a": "three"}])
    return [CorpusConfig(name="A", paths=[str(a)], weight=2.0, text_fields=["text"], min_chars=3),
            CorpusConfig(name="B", paths=[str(b)], weight=1.0, text_fields=["q", "a"], text_separator=" ")]


def test_sequence_matches_the_hand_derived_order(two_corpora):
    # Shares 2/3 and 1/3; position n goes to the corpus with the largest share*(n+1) - taken:
    # n=0 A .67/B .33 -> A; n=1 A .33/B .67 -> B; n=2 A 1/B 0 -> A; n=3 -> A (row 2 "x" is too short);
    # n=4 B .67 -> B (row 1 repeats A's "shared text", row 2 has no "a": skipped); n=5, n=6 -> A;
    # n=7 B's turn, B is exhausted: the sequence stops.
    m = Mixture(two_corpora, dedup=True)
    got = [(n, d.doc_id, d.corpus, d.text) for n, d in m]
    assert got == [(0, "A/a.jsonl:0", "A", "alpha zero"), (1, "B/b.jsonl:0", "B", "beta zero"),
                   (2, "A/a.jsonl:1", "A", "shared text"), (3, "A/a.jsonl:3", "A", "alpha three"),
                   (4, "B/b.jsonl:3", "B", "beta three"), (5, "A/a.jsonl:4", "A", "alpha four"),
                   (6, "A/a.jsonl:5", "A", "alpha five")]
    a, b = m.describe()["corpora"]
    assert (a["docs"], a["too_short"], a["duplicates"], a["exhausted"]) == (5, 1, 0, False)
    assert (b["docs"], b["duplicates"], b["bad_rows"], b["exhausted"]) == (2, 1, {"missing_field:a": 1}, True)
    assert a["share"] == pytest.approx(5 / 7) and a["target_share"] == pytest.approx(2 / 3)
    # Without dedup B's "shared text" is taken at n=4 and the sequence runs until A runs out (n=8).
    plain = [d.doc_id for _, d in Mixture(two_corpora, dedup=False)]
    assert plain == ["A/a.jsonl:0", "B/b.jsonl:0", "A/a.jsonl:1", "A/a.jsonl:3", "B/b.jsonl:1", "A/a.jsonl:4",
                     "A/a.jsonl:5", "B/b.jsonl:3"]
    assert [d.doc_id for _, d in Mixture(two_corpora, max_docs=3)] == plain[:3]


def test_reader_shares_partition_the_sequence_and_resume(two_corpora):
    ids = [d.doc_id for _, d in Mixture(two_corpora)]
    shares = [[d.doc_id for d in MixtureStream(Mixture(two_corpora), s, 3)] for s in range(3)]
    assert shares == [ids[0::3], ids[1::3], ids[2::3]]
    stream = MixtureStream(Mixture(two_corpora), 1, 2, keep=lambda i: i != "B/b.jsonl:3")
    it = iter(stream)
    head = [next(it).doc_id]
    state = json.loads(json.dumps(stream.state_dict()))
    fresh = MixtureStream(Mixture(two_corpora), 1, 2, keep=lambda i: i != "B/b.jsonl:3")
    fresh.load_state_dict(state)
    assert head + [d.doc_id for d in fresh] == [i for i in ids[1::2] if i != "B/b.jsonl:3"]
    with pytest.raises(ConfigError, match=r"corpora \['A', 'B'\], data.mixture has \['A'\]"):
        MixtureStream(Mixture(two_corpora[:1]), 1, 2).load_state_dict(state)


def test_shares_and_dedup_on_the_three_math_corpora():
    paths = {n: shared_path(f"data/{f}") for n, f in
             (("omni", "omni_math_rule.jsonl"), ("gsm8k", "gsm8k_train.jsonl"), ("math", "math_test_5000.jsonl"))}
    weights = {"omni": 0.5, "gsm8k": 0.3, "math": 0.2}
    fields = {"omni": ["problem", "solution"], "gsm8k": ["question", "answer"], "math": ["problem", "solution"]}
    m = Mixture([CorpusConfig(name=n, paths=[str(paths[n])], weight=weights[n], text_fields=fields[n])
                 for n in paths], dedup=True)
    seq = list(m)
    taken = dict.fromkeys(weights, 0)
    for n, doc in seq:  # every prefix holds each corpus within one document of its share
        taken[doc.corpus] += 1
        for c, w in weights.items():
            assert abs(taken[c] - w * (n + 1)) < 1, (n, c, taken)
    texts = [d.text for _, d in seq]
    assert len(set(texts)) == len(texts)
    # Independently: OmniMATH runs out first (2821 rows at share 0.5). No OmniMATH text occurs in
    # the other two corpora, so its dropped duplicates are its rows repeating an earlier row.
    def texts(name):
        a, b = fields[name]
        return [r[a] + "\n\n" + r[b] for r in map(json.loads, open(paths[name]))]

    omni = texts("omni")
    assert not set(omni) & (set(texts("gsm8k")) | set(texts("math")))
    seen, dups = set(), 0
    for t in omni:
        h = hashlib.sha256(t.encode()).digest()
        dups += h in seen
        seen.add(h)
    omni_rows = omni
    drawn = {c["name"]: c for c in m.describe()["corpora"]}
    assert drawn["omni"]["exhausted"] and drawn["omni"]["docs"] == len(omni_rows) - dups
    assert drawn["omni"]["duplicates"] == dups > 0
    assert taken == {c: drawn[c]["docs"] for c in weights} and len(seq) == sum(taken.values())


def test_mixture_config_rules(tmp_path):
    ok = "data.mixture=[{name: a, paths: [x.jsonl]}, {name: b, paths: [y.jsonl], weight: 3}]"
    cfg = load_config(None, [ok], validate_paths=False)
    assert [(c.name, c.weight, c.text_fields) for c in cfg.data.mixture] == [("a", 1.0, ["text"]), ("b", 3.0, ["text"])]
    bad = {
        "data.mixture=[{name: a, paths: [x], weight: 0}]": r"data.mixture\[0\].weight=0.0 must be > 0",
        "data.mixture=[{name: a, paths: [x], wieght: 1}]": r"unknown key\(s\) data.mixture\[0\].wieght",
        "data.mixture=[{name: a, paths: [x]}, {name: a, paths: [y]}]": "names corpus 'a' twice",
        "data.mixture=[{name: a/b, paths: [x]}]": "without '/', ':'",
        "data.mixture=[{name: a, paths: []}]": "corpus 'a' has no paths",
        "data.mixture=[{name: a, paths: [x], min_chars: 9, max_chars: 3}]": "max_chars=3 is below min_chars=9",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override], validate_paths=False)
    with pytest.raises(ConfigError, match="data.mixture replaces data.paths"):
        load_config(None, [ok, "data.paths=[z.jsonl]"], validate_paths=False)
    with pytest.raises(ConfigError, match=r"corpus 'a': paths\[0\]='x.jsonl' does not exist"):
        load_config(None, [ok, "model.hf_checkpoint=auto:tiny-qwen2"])


def test_empty_corpus_is_refused_naming_it(two_corpora, tmp_path):
    empty = CorpusConfig(name="C", paths=[str(write_jsonl(tmp_path / "c.jsonl", [{"other": "field"}]))])
    with pytest.raises(ConfigError, match=r"no usable documents in corpus 'C' .*missing_field:text.*\['text'\]"):
        Mixture([*two_corpora, empty]).check_usable()


def test_prepared_mixture_must_be_the_configured_one(two_corpora):
    from megatron_rpt.data.mixture import mixture_spec

    data = DataConfig(mixture=two_corpora)
    manifest = {"mixture_spec": json.loads(json.dumps(mixture_spec(two_corpora, True)))}
    check_same_mixture(data, manifest, "prep")
    reweighted = DataConfig(mixture=[two_corpora[0], CorpusConfig(**{**vars(two_corpora[1]), "weight": 2.0})])
    with pytest.raises(ConfigError, match=r"corpora\[1\].weight: 1.0 there, 2.0 here"):
        check_same_mixture(reweighted, manifest, "prep")
    with pytest.raises(ConfigError, match="prepared from plain --input files"):
        check_same_mixture(data, {"mixture_spec": None}, "prep")


def test_mixture_metrics_are_shares_of_the_problems_drawn():
    assert mixture_metrics({"a": 3, "b": 1}, ["a", "b", "c"]) == {
        "mixture/a/problems": 3.0, "mixture/a/share": 0.75, "mixture/b/problems": 1.0, "mixture/b/share": 0.25,
        "mixture/c/problems": 0.0, "mixture/c/share": 0.0}
