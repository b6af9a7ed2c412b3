"""RPT rewards: pull the prediction out of a response and score it against the ground truth.

Owns the rule-based verifier of Reinforcement Pre-Training (arXiv 2506.08007):

* :func:`extract_prediction` -- "the full sequence inside the last ``\\boxed{}`` following
  ``</think>``" (paper, section 3.3).
* :func:`prefix_match_reward` -- the paper's main reward (eq. 3): 1 when the prediction's UTF-8
  bytes are a prefix of the ground-truth continuation's bytes *and* end on a token boundary of it.
* :func:`first_token_reward`, :func:`dense_reward`, :func:`group_rewards` -- the alternatives of
  appendix A (first-token matching, dense, conditional dense).
* :func:`compute_reward` -- dispatch on ``rl.reward``; :func:`prediction_of` -- the prediction of
  a response in either answer format (``rl.answer_format``).
* :func:`writable_prefix_tokens` -- the fewest ground-truth tokens a prediction can be written as
  (None: the position can never score), for the data manifest and the evaluation report.

Everything works on bytes, never on re-tokenised text: the ground truth is given as the exact byte
strings of the next tokens (``Problem.target_token_bytes``), so a prediction that ends inside a
byte-level token (e.g. half of a CJK character split over two tokens) can never score.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence

from megatron_rpt.config import AnswerFormat, RewardKind

__all__ = [
    "extract_prediction",
    "prediction_of",
    "prefix_match_reward",
    "first_token_reward",
    "dense_reward",
    "group_rewards",
    "rollout_reward_kind",
    "compute_reward",
    "writable_prefix_tokens",
    "REWARD_KINDS",
    "POLICY_REWARDS",
]

REWARD_KINDS = typing.get_args(RewardKind)
ANSWER_FORMATS = typing.get_args(AnswerFormat)
# Rewards that need P(y[0] | x<t) from the policy: the rollout phase scores correctness (the
# prefix-match reward) and the trainer turns it into these with the policy's probabilities.
POLICY_REWARDS: tuple[RewardKind, ...] = ("dense", "conditional_dense")

_BOX = "\\boxed{"
_THINK_END = "</think>"


def _top_level_boxes(text: str, escapes: bool = True) -> list[str | None]:
    """Contents of the top-level ``\\boxed{...}`` groups of ``text``, left to right.

    Braces are matched like LaTeX groups. With ``escapes`` (``rl.box_escapes``, the default) a
    backslash and the character after it are one pair (``\\{``, ``\\}``, ``\\\\``) that neither
    opens nor closes a group; without it every brace counts, as in the MATH benchmark's
    ``last_boxed_only_string``. A box whose group never closes is reported as ``None`` and ends the
    scan (everything after it is inside the open group).
    """
    boxes: list[str | None] = []
    i = 0
    n = len(text)
    while True:
        start = text.find(_BOX, i)
        if start < 0:
            return boxes
        j = start + len(_BOX)
        content_start = j
        depth = 1
        while j < n:
            c = text[j]
            if c == "\\" and escapes:
                j += 2  # an escape pair never changes the nesting depth
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth != 0 or j >= n:
            boxes.append(None)
            return boxes
        boxes.append(text[content_start:j])
        i = j + 1


def extract_prediction(response: str, require_think: bool = True, escapes: bool = True) -> str | None:
    """The full content of the last top-level ``\\boxed{...}`` after the last ``</think>``.

    * ``require_think=True`` (the paper's setting): a response without ``</think>`` has no
      prediction (the model never finished thinking). With ``False`` the whole response is
      searched when there is no ``</think>``.
    * Nested boxes: ``\\boxed{a \\boxed{b}}`` yields ``"a \\boxed{b}"`` (the outer, top-level box
      is the answer; its content is kept verbatim).
    * Several boxes: the last one wins. If that last box is unclosed the answer is malformed and
      the result is ``None`` (an earlier complete box does not count).
    * ``escapes``: the brace-matching rule of :func:`_top_level_boxes` (``rl.box_escapes``).
    * The content is returned verbatim: no stripping (a leading space is part of the token), no
      ``\\text{}`` unwrapping (the prompt says not to use it), no unescaping.
    """
    if not isinstance(response, str):
        return None
    cut = response.rfind(_THINK_END)
    if cut >= 0:
        tail = response[cut + len(_THINK_END):]
    elif require_think:
        return None
    else:
        tail = response
    boxes = _top_level_boxes(tail, escapes)
    if not boxes:
        return None
    return boxes[-1]


def prediction_of(response: str, answer_format: AnswerFormat = "boxed", require_think: bool = True,
                  escapes: bool = True) -> str | None:
    """The prediction a response makes: the last box (``boxed``) or the whole continuation (``raw``)."""
    if answer_format == "raw":
        return response if isinstance(response, str) else None
    if answer_format != "boxed":
        raise ValueError(f"rl.answer_format={answer_format!r} is not one of {list(ANSWER_FORMATS)}")
    return extract_prediction(response, require_think=require_think, escapes=escapes)


def _utf8(prediction: str | None) -> bytes | None:
    if not prediction:
        return None
    try:
        return prediction.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be bytes of any real text
        return None


def prefix_match_reward(prediction: str | None, target_token_bytes: Sequence[bytes]) -> float:
    """Paper eq. 3: 1.0 iff ``bytes(prediction) == target[:l]`` and ``l`` is a token boundary.

    ``target_token_bytes`` are the byte strings of the ground-truth next tokens x_t, x_{t+1}, ...;
    the valid lengths are their cumulative sums. ``None`` / empty predictions score 0.
    """
    pred = _utf8(prediction)
    if pred is None:
        return 0.0
    length = 0
    for tok in target_token_bytes:
        # Walk token by token: the prediction must cover whole tokens and stop exactly on a boundary.
        end = length + len(tok)
        if end > len(pred):
            return 0.0
        if pred[length:end] != tok:
            return 0.0
        length = end
        if length == len(pred):
            return 1.0
    return 0.0


def first_token_reward(prediction: str | None, target_token_bytes: Sequence[bytes]) -> float:
    """Appendix A "first-token matching": 1.0 iff the prediction starts with the ground-truth token.

    The paper scores only the first token of the prediction and ignores the rest. The verifier has
    no tokenizer, so "the prediction's first token equals x_t" is read on bytes: the prediction's
    first ``len(x_t)`` bytes equal x_t exactly. A prediction that is a strict prefix of x_t (it ends
    inside the token) scores 0. Every prediction with prefix-match reward 1 also scores 1 here.
    """
    pred = _utf8(prediction)
    if pred is None or not target_token_bytes:
        return 0.0
    first = target_token_bytes[0]
    return 1.0 if first and pred.startswith(first) else 0.0


def dense_reward(prediction: str | None, target_token_bytes: Sequence[bytes],
                 first_token_prob: float | None) -> float:
    """Appendix A "dense reward": 1 for a correct prediction, else P(y[0] | x_<t).

    Our reading of the paper: "correct" is the paper's main reward (:func:`prefix_match_reward`
    = 1); an incorrect prediction gets the language-model probability of its first token,
    ``first_token_prob = P(y[0] | x_<t; theta)``: the probability that the policy, reading the
    plain context (no template, no reasoning, temperature 1), gives to the first token of the
    prediction (the prediction tokenised on its own) as the next token. The trainer computes it
    with the Megatron policy (:mod:`megatron_rpt.trainer.dense_reward`). No prediction scores 0.
    """
    pred = _utf8(prediction)
    if pred is None:
        return 0.0
    if prefix_match_reward(prediction, target_token_bytes) == 1.0:
        return 1.0
    if first_token_prob is None:
        raise ValueError("dense_reward needs first_token_prob = P(first predicted token | context) for an "
                         "incorrect prediction")
    p = float(first_token_prob)
    if not math.isfinite(p) or p < -1e-6 or p > 1.0 + 1e-6:
        raise ValueError(f"first_token_prob={first_token_prob!r} is not a probability in [0, 1]")
    return min(max(p, 0.0), 1.0)


def group_rewards(kind: RewardKind, correct: Sequence[float], first_token_probs: Sequence[float | None]) -> list[float]:
    """The rewards of one prompt's group under a policy reward (``dense`` / ``conditional_dense``).

    ``correct`` are the samples' prefix-match rewards (0/1); ``first_token_probs`` P(y[0] | x_<t)
    of each sample's prediction (None where it has none). ``dense``: 1 where correct, else the
    probability. ``conditional_dense`` (appendix A, our reading): the dense reward only inside
    groups where at least one sample is correct; a group with no correct sample keeps its 0s, so
    a wrong guess is never rewarded unless a right one is there to be preferred.
    """
    if kind not in POLICY_REWARDS:
        raise ValueError(f"group_rewards is for rl.reward in {list(POLICY_REWARDS)}, got {kind!r}")
    if len(correct) != len(first_token_probs):
        raise ValueError(f"{len(correct)} rewards but {len(first_token_probs)} first-token probabilities")
    if kind == "conditional_dense" and not any(c == 1.0 for c in correct):
        return [0.0] * len(correct)
    out = []
    for c, p in zip(correct, first_token_probs):
        if c == 1.0:
            out.append(1.0)
        elif p is None:
            out.append(0.0)  # no prediction at all
        else:
            p = float(p)
            if not math.isfinite(p) or p < -1e-6 or p > 1.0 + 1e-6:
                raise ValueError(f"first-token probability {p!r} is not a probability in [0, 1]")
            out.append(min(max(p, 0.0), 1.0))
    return out


def rollout_reward_kind(kind: RewardKind) -> RewardKind:
    """The reward the rollout phase computes alone: a policy reward starts as the correctness."""
    return "prefix" if kind in POLICY_REWARDS else kind


def compute_reward(kind: RewardKind, response: str, target_token_bytes: Sequence[bytes],
                   require_think: bool = True, first_token_prob: float | None = None,
                   answer_format: AnswerFormat = "boxed", escapes: bool = True) -> float:
    """Reward of one response. ``kind`` is ``rl.reward``; ``answer_format`` ``rl.answer_format``
    (``raw``: the whole response is the prediction); ``escapes`` ``rl.box_escapes``.

    ``conditional_dense`` depends on the other samples of the group: use :func:`group_rewards`.
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"rl.reward={kind!r} is not one of {list(REWARD_KINDS)}")
    prediction = prediction_of(response, answer_format, require_think, escapes)
    if kind == "prefix":
        return prefix_match_reward(prediction, target_token_bytes)
    if kind == "first_token":
        return first_token_reward(prediction, target_token_bytes)
    if kind == "conditional_dense":
        raise ValueError("rl.reward=conditional_dense is a rule over a group of samples: use group_rewards()")
    if prediction and first_token_prob is None and prefix_match_reward(prediction, target_token_bytes) == 0.0:
        raise ValueError("rl.reward=dense needs first_token_prob (P of the predicted first token) "
                         "for incorrect predictions; compute it with the policy or use rl.reward=prefix")
    return dense_reward(prediction, target_token_bytes, first_token_prob)


# ----------------------------------------------------------------------------- unwinnable positions


def writable_prefix_tokens(target_token_bytes: Sequence[bytes], answer_format: AnswerFormat = "boxed",
                           escapes: bool = True) -> int | None:
    """The fewest ground-truth tokens whose bytes a prediction can be; None: no prefix can be.

    A prediction scores only if it is a token-boundary prefix of the ground truth, so a position
    can be won only if such a prefix can be *written*: it must be valid UTF-8 (a response is text)
    and, in the boxed format, come back unchanged from :func:`extract_prediction` when written as
    ``</think>\\boxed{PREFIX}``: its braces (outside escape pairs) must never close the box early
    and must end balanced, it must not end inside an escape pair (``\\`` would escape the closing
    brace), and it must not contain ``</think>``. A ground truth starting with ``}`` can never be
    written; one whose first token ends in an odd backslash needs a second token (with
    ``escapes``). The scan stops at the first writable prefix or when the box closes early.
    """
    # Braces and backslashes are ASCII, and UTF-8 continuation bytes never are: scan bytes.
    depth, pending, seen = 1, False, b""
    for count, tok in enumerate(target_token_bytes, 1):
        seen += tok
        if answer_format == "boxed":
            for byte in tok:
                if pending:
                    pending = False
                elif byte == 0x5C and escapes:  # backslash
                    pending = True
                elif byte == 0x7B:  # {
                    depth += 1
                elif byte == 0x7D:  # }
                    depth -= 1
                    if depth == 0:
                        return None  # the box closes inside the prefix: every longer one too
            if _THINK_END.encode() in seen:
                return None
            if depth != 1 or pending:
                continue
        elif answer_format != "raw":
            raise ValueError(f"rl.answer_format={answer_format!r} is not one of {list(ANSWER_FORMATS)}")
        try:
            seen.decode("utf-8")
        except UnicodeDecodeError:
            continue  # ends inside a character
        if seen:
            return count
    return None
