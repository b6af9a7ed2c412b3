"""Next-token reasoning: sample k reasoned answers per position and score them like RPT training.

Owns: :func:`reasoning_params` (sampling settings from ``eval.*``), :func:`score_response`
(prefix-match accuracy of one response: the last ``\\boxed{}`` after ``</think>``, or the raw
continuation with ``rl.answer_format=raw``), :func:`generate_and_score` (prompts through any
rollout engine, in chunks) and :func:`reasoning_accuracy` (Random@1 and Pass@k per difficulty
bucket).

Random@1 is the mean reward over the k samples of a position (the expected accuracy of one
random sample, as in the paper's Table 1); Pass@k is 1 when any of the k samples is correct.
Accuracy is always the paper's prefix-match reward, whatever ``rl.reward`` trains with (a dense
reward is not an accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from megatron_rpt.config import AnswerFormat, Config
from megatron_rpt.eval.report import BucketAccumulator
from megatron_rpt.reward import prediction_of, prefix_match_reward
from megatron_rpt.rollout.base import SamplingParams

__all__ = [
    "reasoning_params",
    "score_response",
    "generate_and_score",
    "reasoning_accuracy",
    "EVAL_SEED_OFFSET",
]

# Evaluation samples use their own seed stream, fixed across evaluations, so two checkpoints
# are compared on the same random numbers rather than on sampling noise.
EVAL_SEED_OFFSET = 7_777_777


def reasoning_params(cfg: Config) -> SamplingParams:
    e, r = cfg.eval, cfg.rollout
    return SamplingParams(
        n=e.pass_k, temperature=e.temperature, top_p=r.top_p,
        max_tokens=e.max_response_tokens or r.max_response_tokens, stop=list(r.stop),
        seed=r.seed + EVAL_SEED_OFFSET,
    )


def score_response(response: str, target_token_bytes: Sequence[bytes], answer_format: AnswerFormat = "boxed",
                   require_think: bool = True, escapes: bool = True) -> float:
    """1.0 when the response's prediction is a token-boundary prefix of the ground truth."""
    return prefix_match_reward(prediction_of(response, answer_format, require_think, escapes), target_token_bytes)


def generate_and_score(engine: Any, problems: Sequence[Any], params: SamplingParams,
                       answer_format: AnswerFormat = "boxed", require_think: bool = True, chunk: int = 32,
                       progress: bool = False, escapes: bool = True) -> tuple[list[list[float]], list[list[str]], int]:
    """(rewards [problem][sample], texts [problem][sample], generated tokens) for ``problems``.

    Prompts go to the engine ``chunk`` at a time (each call batches their samples itself).
    """
    rewards: list[list[float]] = []
    texts: list[list[str]] = []
    generated = 0
    bar = None
    if progress:
        bar = tqdm(total=len(problems), desc="next-token reasoning", unit="position", dynamic_ncols=True)
    for start in range(0, len(problems), chunk):
        batch = problems[start:start + chunk]
        outputs = engine.generate([list(p.prompt_ids) for p in batch], params)
        for problem, samples in zip(batch, outputs):
            texts.append([s.text for s in samples])
            rewards.append([score_response(s.text, problem.target_token_bytes, answer_format, require_think, escapes)
                            for s in samples])
            generated += sum(len(s.token_ids) for s in samples)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return rewards, texts, generated


def reasoning_accuracy(rewards: Sequence[Sequence[float]], entropies: Sequence[float | None],
                       thresholds: Sequence[float],
                       docs: Sequence[Any] | None = None) -> tuple[BucketAccumulator, BucketAccumulator]:
    """(Random@1, Pass@k) accumulators over positions; each position weighs the same; ``docs`` (each
    position's document) clusters the confidence interval."""
    random1, pass_k = BucketAccumulator(thresholds), BucketAccumulator(thresholds)
    for i, (samples, entropy) in enumerate(zip(rewards, entropies, strict=True)):
        if not samples:
            raise ValueError("a position has no samples; eval.pass_k must be >= 1")
        correct = [1.0 if r >= 1.0 else 0.0 for r in samples]
        doc = None if docs is None else docs[i]
        random1.add(entropy, sum(correct) / len(correct), doc)
        pass_k.add(entropy, 1.0 if any(correct) else 0.0, doc)
    return random1, pass_k
