"""Top-k entropy: the formula in float64, difficulty splits, and packed/windowed proxy scoring
against an unpacked transformers forward pass."""

import math

import numpy as np
import pytest
import torch

from megatron_rpt.config import ConfigError
from megatron_rpt.data.entropy_filter import (
    ProxyScorer,
    difficulty_label,
    difficulty_splits,
    pack_first_fit,
    topk_entropy,
)
from megatron_rpt.data.tiny_proxy import make_tiny_proxy


def test_topk_entropy_float64_reference():
    # Top-4 of these logits are log(0.4), log(0.3), log(0.2), log(0.1) (+ a shared constant);
    # renormalised they are exactly those probabilities. The two small ones must be ignored.
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = torch.tensor([[math.log(p) + 3.0 for p in [0.2, 0.4, 1e-3, 0.1, 0.3, 1e-4]]], dtype=torch.float64)
    expected = -sum(p * math.log(p) for p in probs)  # 1.2798542258336676 nats
    got = topk_entropy(logits, k=4)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1.2798542258336676, abs=1e-15)
    # float32 / bf16 inputs are computed in float32
    assert topk_entropy(logits.float(), 4).item() == pytest.approx(expected, abs=1e-6)
    assert topk_entropy(logits.bfloat16(), 4).dtype == torch.float32
    # k >= vocab: the full softmax; uniform over 16 -> ln 16
    assert topk_entropy(torch.zeros(16, dtype=torch.float64), 64).item() == pytest.approx(math.log(16), abs=1e-12)
    # a one-hot-ish distribution has ~0 entropy
    spike = torch.tensor([100.0] + [0.0] * 20, dtype=torch.float64)
    assert topk_entropy(spike, 16).item() < 1e-30


def test_difficulty_splits_are_nested():
    th = [0.5, 1.0, 1.5]
    assert difficulty_splits(1.2, th) == ("easy", "medium")
    assert difficulty_label(1.2, th) == "medium"
    assert difficulty_splits(1.6, th) == ("easy", "medium", "hard")
    assert difficulty_splits(0.5, th) == ()  # strictly above
    assert difficulty_label(0.3, th) is None
    assert difficulty_splits(float("nan"), th) == () and difficulty_splits(None, th) == ()
    assert difficulty_splits(0.9, [0.1, 0.8]) == ("level0", "level1")


def test_pack_first_fit():
    rows = pack_first_fit([5, 3, 4, 2, 6], capacity=8)
    lengths = [5, 3, 4, 2, 6]
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum(lengths[i] for i in r) <= 8 for r in rows)
    assert len(rows) == 3  # 20 tokens need at least 3 rows of 8
    with pytest.raises(ValueError):
        pack_first_fit([9], capacity=8)


@pytest.fixture(scope="module")
def small_proxy(tmp_path_factory):
    return make_tiny_proxy(tmp_path_factory.mktemp("proxy"), vocab_size=300, hidden_size=32, num_layers=2)


def reference(model, ids):
    """Entropy per position from an unpacked, unpadded forward pass, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    ent = topk_entropy(logits, 16).numpy()
    return np.concatenate([[np.nan], ent[:-1]])


def test_packed_scoring_matches_unpacked_forward(small_proxy):
    gen = np.random.default_rng(0)
    docs = [gen.integers(0, 300, n).tolist() for n in (37, 5, 60, 1, 22, 41, 2)]
    scorer = ProxyScorer(small_proxy, top_k=16, device="cpu", batch_tokens=128, max_seq_len=64)
    got = scorer.score(docs)
    assert scorer.packing and scorer.rows_per_batch == 2  # several rows per forward, several documents per row
    ref_model = scorer.model
    for d, g in zip(docs, got):
        ref = reference(ref_model, d)
        assert g.shape == (len(d),) and np.isnan(g[0])
        np.testing.assert_allclose(g[1:], ref[1:], rtol=0, atol=2e-5)
    assert scorer.tokens_scored == sum(len(d) for d in docs if len(d) >= 2)
    scorer.packing = False  # the fallback for transformers without packed-sequence masks
    for d, g in zip(docs, scorer.score(docs)):
        np.testing.assert_allclose(g[1:], reference(ref_model, d)[1:], rtol=0, atol=2e-5)


def test_long_documents_are_scored_in_overlapping_windows(small_proxy):
    gen = np.random.default_rng(1)
    doc = gen.integers(0, 300, 100).tolist()
    scorer = ProxyScorer(small_proxy, top_k=16, device="cpu", batch_tokens=64, max_seq_len=32)
    windows = scorer._windows(len(doc))
    assert windows[0] == (0, 32, 1) and all(first == 8 for _, _, first in windows[1:])
    covered = [s + j for s, e, first in windows for j in range(first, e - s)]
    assert covered == list(range(1, 100))  # every position once
    got = scorer.score([doc])[0]
    for s, e, first in windows:  # each position equals a forward pass over exactly its window
        ref = reference(scorer.model, doc[s:e])
        np.testing.assert_allclose(got[s + first:e], ref[first:], atol=2e-5)
    np.testing.assert_allclose(got[1:32], reference(scorer.model, doc)[1:32], atol=2e-5)  # first window = full context


def test_proxy_errors(small_proxy, tmp_path):
    scorer = ProxyScorer(small_proxy, device="cpu")
    with pytest.raises(ValueError, match="vocab_size"):
        scorer.score([[1, 2, 300]])
    with pytest.raises(ConfigError, match="config.json"):
        ProxyScorer(tmp_path)
