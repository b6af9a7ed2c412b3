"""RPT rewards: extraction of the boxed prediction and byte-level prefix matching.

Ground truth comes from the real Qwen2.5 tokenizer (the R1-Distill vocabulary); every case is small
enough to check by hand, and the tokenizations the cases rely on are asserted first.
"""

import math

import pytest

from megatron_rpt.reward import (
    compute_reward,
    dense_reward,
    extract_prediction,
    first_token_reward,
    group_rewards,
    prediction_of,
    prefix_match_reward,
    writable_prefix_tokens,
)
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def qwen():
    from megatron_rpt.data.tokenizer import load_tokenizer

    return load_tokenizer(shared_path("tokenizers/qwen2_5"))


def target_of(tok, text):
    from megatron_rpt.data.tokenizer import encode_document, token_bytes

    return token_bytes(tok, encode_document(tok, text))


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("response, require_think, expected", [
    ("<think>hmm</think>So \\boxed{ para}", True, " para"),
    ("<think>hmm</think>\n\n\\boxed{ =}\n", True, " ="),
    ("no thinking \\boxed{ x}", True, None),  # no </think>: no prediction
    ("no thinking \\boxed{ x}", False, " x"),
    ("<think>maybe \\boxed{a}</think> nothing boxed after", True, None),  # box only inside the thinking
    ("<think>\\boxed{a}</think>x</think> \\boxed{b}", True, "b"),  # the LAST </think> counts
    ("</think>\\boxed{a} then \\boxed{b} and finally \\boxed{c}", True, "c"),  # last box wins
    ("</think>\\boxed{\\frac{1}{2}}", True, "\\frac{1}{2}"),  # balanced nested braces
    ("</think>\\boxed{a \\boxed{b}}", True, "a \\boxed{b}"),  # nested box: the outer one, verbatim
    ("</think>\\boxed{x} \\boxed{a \\boxed{b} c}", True, "a \\boxed{b} c"),
    ("</think>\\boxed{a} \\boxed{b", True, None),  # the last box is unclosed -> malformed
    ("</think>\\boxed{", True, None),
    ("</think>\\boxed{\\{}", True, "\\{"),  # escaped brace does not open a group
    ("</think>\\boxed{a\\\\}", True, "a\\\\"),  # LaTeX line break then the closing brace
    ("</think>\\boxed{\\text{ para}}", True, "\\text{ para}"),  # kept verbatim (and scores 0)
    ("</think>\\boxed{}", True, ""),
    ("</think>\\boxed{:\n}", True, ":\n"),
    ("</think> the answer", True, None),
])
def test_extract_prediction(response, require_think, expected):
    assert extract_prediction(response, require_think=require_think) == expected


# ----------------------------------------------------------------------------- prefix matching


def test_prefix_match_words_and_leading_space(qwen):
    tgt = target_of(qwen, " the paragraph is long")
    assert tgt == [b" the", b" paragraph", b" is", b" long"]  # hand-checked tokenization
    assert prefix_match_reward(" the", tgt) == 1.0
    assert prefix_match_reward(" the paragraph", tgt) == 1.0  # multi-token prediction on a boundary
    assert prefix_match_reward(" the paragraph is long", tgt) == 1.0  # the whole continuation
    assert prefix_match_reward("the", tgt) == 0.0  # missing leading space: not a byte prefix
    assert prefix_match_reward(" the para", tgt) == 0.0  # byte prefix, but ends inside " paragraph"
    assert prefix_match_reward(" th", tgt) == 0.0  # ends inside the first token
    assert prefix_match_reward(" the paragraph is long.", tgt) == 0.0  # longer than the ground truth
    assert prefix_match_reward(" the  paragraph", tgt) == 0.0
    assert prefix_match_reward("", tgt) == 0.0
    assert prefix_match_reward(None, tgt) == 0.0


def test_prefix_match_utf8_split_inside_token(qwen):
    # 'ň' = C5 88 and '다' = EB 8B A4; byte-level BPE cuts after C5: [C5] [88 EB 8B A4].
    tgt = target_of(qwen, "ň다")
    assert tgt == [b"\xc5", b"\x88\xeb\x8b\xa4"]
    assert prefix_match_reward("ň다", tgt) == 1.0  # 5 bytes = second boundary
    # 'ň' is valid UTF-8 and a byte prefix, but 2 bytes is not a token boundary (1 or 5).
    assert "ň다".encode().startswith("ň".encode())
    assert prefix_match_reward("ň", tgt) == 0.0
    # A CJK character split over three tokens can only be predicted whole.
    tgt = target_of(qwen, "𠜎好")
    assert tgt == [b"\xf0\xa0", b"\x9c", b"\x8e", b"\xe5\xa5\xbd"]
    assert prefix_match_reward("𠜎", tgt) == 1.0  # 4 bytes = third boundary
    assert prefix_match_reward("𠜎好", tgt) == 1.0
    # Two characters in one token: the first alone ends mid-token.
    tgt = target_of(qwen, "你好世界")
    assert tgt == ["你好".encode(), "世界".encode()]
    assert prefix_match_reward("你", tgt) == 0.0
    assert prefix_match_reward("你好", tgt) == 1.0
    assert prefix_match_reward("🙂", target_of(qwen, "🙂🙂")) == 1.0  # one emoji = one token here


def test_prefix_match_latex(qwen):
    tgt = target_of(qwen, " \\frac{1}{2}")
    assert tgt == [b" \\", b"frac", b"{", b"1", b"}{", b"2", b"}"]
    assert prefix_match_reward(" \\frac", tgt) == 1.0
    assert prefix_match_reward(" \\frac{1", tgt) == 1.0
    assert prefix_match_reward(" \\frac{1}", tgt) == 0.0  # '}{' is one token
    assert prefix_match_reward(" \\frac{1}{", tgt) == 1.0
    assert prefix_match_reward("\\frac", tgt) == 0.0
    # A \text{} wrapper is not the token.
    resp = "</think>\\boxed{\\text{ \\frac}}"
    assert compute_reward("prefix", resp, tgt) == 0.0
    assert compute_reward("prefix", "</think>\\boxed{ \\frac}", tgt) == 1.0


def test_prefix_match_end_to_end_responses(qwen):
    tgt = target_of(qwen, " para graph")
    assert tgt[0] == b" para"
    assert compute_reward("prefix", "<think>It is probably ' para'.</think>\n\n\\boxed{ para}", tgt) == 1.0
    assert compute_reward("prefix", "<think>\\boxed{ para}</think> I give up", tgt) == 0.0
    assert compute_reward("prefix", "\\boxed{ para}", tgt) == 0.0  # never closed its thinking
    assert compute_reward("prefix", "\\boxed{ para}", tgt, require_think=False) == 1.0
    assert compute_reward("prefix", "</think>\\boxed{ para} or \\boxed{ x}", tgt) == 0.0  # last box wins
    assert compute_reward("prefix", "</think>\\boxed{ x} no, \\boxed{ para}", tgt) == 1.0


# ----------------------------------------------------------------------------- alternative rewards


def test_first_token_reward(qwen):
    tgt = target_of(qwen, " the paragraph is")
    assert first_token_reward(" the", tgt) == 1.0
    assert first_token_reward(" the paragraph", tgt) == 1.0
    assert first_token_reward(" the cat", tgt) == 1.0  # tokens after the first are ignored
    assert first_token_reward(" th", tgt) == 0.0  # ends inside the first token
    assert first_token_reward(" a", tgt) == 0.0
    assert first_token_reward(None, tgt) == 0.0
    assert first_token_reward(" the", []) == 0.0


def test_dense_reward(qwen):
    tgt = target_of(qwen, " the paragraph")
    assert dense_reward(" the", tgt, first_token_prob=0.3) == 1.0  # correct -> full reward
    assert dense_reward(" a", tgt, first_token_prob=0.3) == pytest.approx(0.3)  # wrong -> P(y0 | x<t)
    # "Correct" is the paper's prefix-match reward: a right first token followed by a wrong one is wrong.
    assert dense_reward(" the cat", tgt, first_token_prob=0.4) == pytest.approx(0.4)
    assert dense_reward(None, tgt, first_token_prob=0.3) == 0.0
    assert dense_reward(" a", tgt, first_token_prob=0.0) == 0.0
    with pytest.raises(ValueError, match="probability"):
        dense_reward(" a", tgt, first_token_prob=1.5)
    with pytest.raises(ValueError, match="probability"):
        dense_reward(" a", tgt, first_token_prob=math.nan)
    assert compute_reward("dense", "</think>\\boxed{ a}", tgt, first_token_prob=0.25) == 0.25
    assert compute_reward("dense", "</think>\\boxed{ the}", tgt) == 1.0  # no probability needed
    with pytest.raises(ValueError, match="first_token_prob"):
        compute_reward("dense", "</think>\\boxed{ a}", tgt)
    assert compute_reward("first_token", "</think>\\boxed{ the cat}", tgt) == 1.0
    assert compute_reward("prefix", "</think>\\boxed{ the cat}", tgt) == 0.0


def test_unknown_kind():
    with pytest.raises(ValueError, match="rl.reward"):
        compute_reward("exact", "</think>\\boxed{a}", [b"a"])


def test_prefix_reward_against_bruteforce_reference(qwen):
    """Every string prefix of the decoded target: reward 1 exactly at the decoded token boundaries."""
    text = " Let $x^2+y^2=1$ and 你好𠜎 then"
    tgt = target_of(qwen, text)
    full = b"".join(tgt)
    assert full == text.encode()
    boundaries = {sum(len(t) for t in tgt[:i]) for i in range(1, len(tgt) + 1)}
    for end in range(1, len(text) + 1):
        pred = text[:end]
        expected = 1.0 if len(pred.encode()) in boundaries else 0.0
        assert prefix_match_reward(pred, tgt) == expected, pred


def test_group_rewards_dense_and_conditional_by_hand():
    correct = [1.0, 0.0, 0.0, 0.0]
    probs = [0.9, 0.25, None, 0.5]  # None: that sample has no prediction
    assert group_rewards("dense", correct, probs) == [1.0, 0.25, 0.0, 0.5]
    assert group_rewards("conditional_dense", correct, probs) == [1.0, 0.25, 0.0, 0.5]
    # No sample is right: conditional dense keeps the zeros, dense pays the wrong guesses.
    assert group_rewards("conditional_dense", [0.0, 0.0], [0.3, 0.6]) == [0.0, 0.0]
    assert group_rewards("dense", [0.0, 0.0], [0.3, 0.6]) == [0.3, 0.6]
    with pytest.raises(ValueError, match="probability"):
        group_rewards("dense", [0.0], [1.5])
    with pytest.raises(ValueError, match="group_rewards is for"):
        group_rewards("prefix", [0.0], [0.1])
    with pytest.raises(ValueError, match="group"):
        compute_reward("conditional_dense", "</think>\\boxed{a}", [b"a"])


def test_raw_answer_format_honours_the_reward_kind(qwen):
    tgt = target_of(qwen, " the paragraph")
    # The raw continuation is the prediction; each kind scores it its own way.
    assert compute_reward("prefix", " the cat", tgt, answer_format="raw") == 0.0
    assert compute_reward("first_token", " the cat", tgt, answer_format="raw") == 1.0
    assert compute_reward("dense", " a", tgt, answer_format="raw", first_token_prob=0.2) == pytest.approx(0.2)
    assert prediction_of("</think>\\boxed{x}", "raw") == "</think>\\boxed{x}"
    assert prediction_of("</think>\\boxed{x}", "boxed") == "x"


@pytest.mark.parametrize("response, expected", [
    ("</think>\\boxed{\\}", "\\"),  # no escapes: the backslash is plain, so this closes the box
    ("</think>\\boxed{\\{}}", "\\{}"),  # and \\{ opens a group
    ("</think>\\boxed{\\{}", None),
    ("</think>\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
])
def test_extract_prediction_without_escapes(response, expected):
    assert extract_prediction(response, escapes=False) == expected


@pytest.mark.parametrize("tokens, escapes, expected", [
    ([b"}", b" x"], True, None),  # a box can never hold a leading closing brace
    ([b"}", b" x"], False, None),
    ([b" \\", b"frac"], True, 2),  # " \\" alone would escape the closing brace; " \\frac" is fine
    ([b" \\", b"frac"], False, 1),  # without the escape rule the backslash is plain
    ([b"{", b"x", b"}"], True, 3),  # balanced only after three tokens
    ([b"\\{", b"x"], True, 1),  # an escaped brace does not open a group
    ([b"\\{", b"x"], False, None),  # without escapes it does, and never closes here
    ([b"\xe4\xbd", b"\xa0"], True, 2),  # half a character is not text
    ([b" x", b"}"], True, 1),
    ([b"</", b"think>"], True, 1),
    ([b"a</think>", b"b"], True, None),  # the response's last </think> would be inside the box
])
def test_writable_prefix_tokens_by_hand(tokens, escapes, expected):
    assert writable_prefix_tokens(tokens, "boxed", escapes) == expected


def test_writable_prefix_tokens_raw_format():
    assert writable_prefix_tokens([b"}", b" x"], "raw") == 1
    assert writable_prefix_tokens([b"\xe4\xbd", b"\xa0"], "raw") == 2
    assert writable_prefix_tokens([b"\xe4\xbd"], "raw") is None


def _brute_force_writable(tokens: list[bytes], escapes: bool) -> int | None:
    """The first k whose prefix comes back from the real extractor, written as a boxed answer."""
    for k in range(1, len(tokens) + 1):
        try:
            text = b"".join(tokens[:k]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if extract_prediction("</think>\\boxed{" + text + "}", escapes=escapes) == text:
            return k
    return None


def test_writable_prefix_tokens_against_the_extractor(qwen, shared):
    """Every position of a few OmniMATH documents (LaTeX-heavy): the scan agrees with the extractor."""
    import json

    from megatron_rpt.data.tokenizer import encode_document, token_bytes

    rows = [json.loads(line) for line in shared("data/omni_math_rule.jsonl").read_text().splitlines()[:6]]
    checked = unwritable = 0
    for row in rows:
        table = token_bytes(qwen, encode_document(qwen, row["problem"] + "\n\n" + row["solution"]))
        for t in range(len(table)):
            window = table[t:t + 12]
            for escapes in (True, False):
                got = writable_prefix_tokens(window, "boxed", escapes)
                assert got == _brute_force_writable(window, escapes), (window, escapes)
                unwritable += got != 1
                checked += 1
    assert checked > 1000 and unwritable > 0


def test_rollout_score_honours_rl_reward_with_raw_answers(qwen):
    """The trainer's scorer: rl.answer_format=raw used to ignore rl.reward (always prefix)."""
    from types import SimpleNamespace

    from megatron_rpt.config import Config
    from megatron_rpt.trainer.rollout_phase import score

    cfg = Config()
    cfg.rl.answer_format, cfg.rl.require_think = "raw", False
    problem = SimpleNamespace(target_token_bytes=target_of(qwen, " the paragraph"))
    cfg.rl.reward = "first_token"
    assert score(cfg, " the cat", problem) == 1.0
    cfg.rl.reward = "prefix"
    assert score(cfg, " the cat", problem) == 0.0
    cfg.rl.reward = "dense"  # the rollout phase scores correctness; the trainer adds P(y0 | x<t)
    assert score(cfg, " the cat", problem) == 0.0
    assert score(cfg, " the", problem) == 1.0
