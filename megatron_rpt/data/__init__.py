"""megatron_rpt.data: corpus streaming, tokenizer bytes, entropy filtering and RPT problems.

The trainer needs only :class:`ProblemStream`, :class:`Problem` and :func:`load_tokenizer`;
``tools/prepare_data.py`` uses :class:`ProxyScorer`, :class:`Mixture` and :func:`prepare`.
"""

from megatron_rpt.data.entropy_filter import ProxyScorer, difficulty_splits, topk_entropy
from megatron_rpt.data.mixture import Mixture
from megatron_rpt.data.problems import Problem, ProblemStream
from megatron_rpt.data.scoring import prepare
from megatron_rpt.data.templates import TEMPLATES, render_prompt
from megatron_rpt.data.tokenizer import load_tokenizer, token_byte_table, token_bytes, tokenizer_hash

__all__ = [
    "Mixture",
    "Problem",
    "ProblemStream",
    "ProxyScorer",
    "TEMPLATES",
    "difficulty_splits",
    "load_tokenizer",
    "prepare",
    "render_prompt",
    "token_byte_table",
    "token_bytes",
    "tokenizer_hash",
    "topk_entropy",
]
