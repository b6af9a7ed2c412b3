"""The dtype names configs use (``model.params_dtype``, ``rollout.dtype``, ``--dtype``) -> torch dtypes.

A module of its own, free of megatron-core, so the rollout engines and the converters read the
names without importing megatron-core (model/build.py, which also uses them, imports it).
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
