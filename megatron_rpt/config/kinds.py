"""The value kinds of the config tree's fields: numeric ranges and ``Literal`` choices.

One table for every section module (:mod:`megatron_rpt.config`), so that a kind shared by two
sections (``Dtype``) has one owner; the loader in :mod:`megatron_rpt.config_schema` checks a value
against them and ``explain`` prints them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from megatron_rpt.config_schema import Range

PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(gt=0, le=1)]
Dtype = Literal["float32", "bfloat16", "float16"]
TransformerImpl = Literal["auto", "local", "transformer_engine"]
Fp8Format = Literal["hybrid", "e4m3"]
Fp8Recipe = Literal["delayed", "tensorwise", "mxfp8", "blockwise"]
Recompute = Literal["selective", "full"]
EngineKind = Literal["builtin", "vllm"]
Template = Literal["v0", "v1", "v2", "v3", "v4", "v5", "v6", "raw"]
KLType = Literal["k1", "k3"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
RewardKind = Literal["prefix", "first_token", "dense", "conditional_dense"]
AnswerFormat = Literal["boxed", "raw"]
LRSchedule = Literal["constant", "cosine", "linear"]
EvalMode = Literal["standard", "reasoning"]
Objective = Literal["rpt", "ntp"]
