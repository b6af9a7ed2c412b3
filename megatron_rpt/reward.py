"""RPT rewards: pull the prediction out of a response and score it against the ground truth.

Owns the rule-based verifier of Reinforcement Pre-Training (arXiv 2506.08007):

* :func:`extract_prediction` -- "the full sequence inside the last ``\\boxed{}`` following
  ``</think>``" (paper, section 3.3).
* :func:`prefix_match_reward` -- the paper's main reward (eq. 3): 1 when the prediction's UTF-8
  bytes are a prefix of the ground-truth continuation's bytes *and* end on a token boundary of it.
* :func:`first_token_reward`, :func:`dense_reward` -- the alternatives of appendix A.
* :func:`compute_reward` -- dispatch on ``rl.reward``.

Everything works on bytes, never on re-tokenised text: the ground truth is given as the exact byte
strings of the next tokens (``Problem.target_token_bytes``), so a prediction that ends inside a
byte-level token (e.g. half of a CJK character split over two tokens) can never score.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence

from megatron_rpt.config import RewardKind

__all__ = [
    "extract_prediction",
    "prefix_match_reward",
    "first_token_reward",
    "dense_reward",
    "compute_reward",
    "REWARD_KINDS",
]

REWARD_KINDS = typing.get_args(RewardKind)

_BOX = "\\boxed{"
_THINK_END = "</think>"


def _top_level_boxes(text: str) -> list[str | None]:
    """Contents of the top-level ``\\boxed{...}`` groups of ``text``, left to right.

    Braces are matched like LaTeX groups: ``\\{`` / ``\\}`` (and any other backslash pair such as
    ``\\\\``) are escapes and do not open or close a group. A box whose group never closes is
    reported as ``None`` and ends the scan (everything after it is inside the open group).
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
            if c == "\\":
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


def extract_prediction(response: str, require_think: bool = True) -> str | None:
    """The full content of the last top-level ``\\boxed{...}`` after the last ``</think>``.

    * ``require_think=True`` (the paper's setting): a response without ``</think>`` has no
      prediction (the model never finished thinking). With ``False`` the whole response is
      searched when there is no ``</think>``.
    * Nested boxes: ``\\boxed{a \\boxed{b}}`` yields ``"a \\boxed{b}"`` (the outer, top-level box
      is the answer; its content is kept verbatim).
    * Several boxes: the last one wins. If that last box is unclosed the answer is malformed and
      the result is ``None`` (an earlier complete box does not count).
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
    boxes = _top_level_boxes(tail)
    if not boxes:
        return None
    return boxes[-1]


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
                 first_token_prob: float) -> float:
    """Appendix A "dense reward": 1 when the first token is right, else P(y[0] | x_<t).

    Our reading of the paper: a correct prediction (its first token is the ground-truth next token,
    :func:`first_token_reward`; this includes every correct prefix match) gets the full reward 1.
    An incorrect one gets the language-model probability of the token it predicted,
    ``first_token_prob = P(y[0] | x_<t; theta)``: the probability that the model, reading the plain
    context (no reasoning), gives to the first token of the prediction as the next token. The caller
    computes it (it needs the policy and the tokenizer). No prediction at all scores 0.

    The paper's third variant (dense only inside groups where some rollout is right) is a
    group-level rule and belongs to the advantage computation, not here.
    """
    pred = _utf8(prediction)
    if pred is None:
        return 0.0
    if first_token_reward(prediction, target_token_bytes) == 1.0:
        return 1.0
    if first_token_prob is None:
        raise ValueError("dense_reward needs first_token_prob = P(first predicted token | context)")
    p = float(first_token_prob)
    if not math.isfinite(p) or p < -1e-6 or p > 1.0 + 1e-6:
        raise ValueError(f"first_token_prob={first_token_prob!r} is not a probability in [0, 1]")
    return min(max(p, 0.0), 1.0)


def compute_reward(kind: RewardKind, response: str, target_token_bytes: Sequence[bytes],
                   require_think: bool = True, first_token_prob: float | None = None) -> float:
    """Reward of one response. ``kind`` is ``rl.reward``: ``prefix`` | ``first_token`` | ``dense``."""
    if kind not in REWARD_KINDS:
        raise ValueError(f"rl.reward={kind!r} is not one of {list(REWARD_KINDS)}")
    prediction = extract_prediction(response, require_think=require_think)
    if kind == "prefix":
        return prefix_match_reward(prediction, target_token_bytes)
    if kind == "first_token":
        return first_token_reward(prediction, target_token_bytes)
    if prediction and first_token_prob is None and first_token_reward(prediction, target_token_bytes) == 0.0:
        raise ValueError("rl.reward=dense needs first_token_prob (P of the predicted first token) "
                         "for incorrect predictions; compute it with the policy or use rl.reward=prefix")
    return dense_reward(prediction, target_token_bytes, first_token_prob)  # type: ignore[arg-type]
