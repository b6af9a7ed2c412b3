"""Group-relative advantages (GRPO).

Owns: turning the scalar rewards of the ``n`` samples drawn for each prompt into
advantages relative to their group: ``(r - mean_group) / (std_group + eps)`` (GRPO,
DeepSeekMath) or ``r - mean_group`` when the std normalisation is off (Dr. GRPO).
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor,
    normalize_std: bool = True,
    eps: float = 1e-6,
    group_ids: Tensor | None = None,
) -> Tensor:
    """Advantages of each sample relative to the other samples of its prompt.

    ``rewards`` is either ``[num_prompts, n]`` (one row per prompt) or flat ``[N]`` with
    ``group_ids`` ``[N]`` naming each sample's prompt (any integers; groups may differ in
    size). The std is the unbiased sample std (``torch.std``, as in the GRPO reference and
    verl). A group of one sample has no baseline and gets advantage 0. Returns a tensor
    shaped like ``rewards`` (float32 unless ``rewards`` is already floating point);
    the arithmetic itself runs in float64.
    """
    if normalize_std and not eps > 0:
        # A group whose rewards are all equal has std 0; eps keeps its advantage at 0, not NaN.
        raise ValueError(f"eps={eps} must be > 0 when normalize_std is on")
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.detach().to(torch.float64)
    if group_ids is None:
        if r.dim() != 2:
            raise ValueError(
                f"rewards has shape {tuple(rewards.shape)}; pass [num_prompts, n] or a flat [N] tensor "
                "together with group_ids [N]"
            )
        return _normalise(r, r.mean(dim=1, keepdim=True), _std(r, dim=1), normalize_std, eps).to(out_dtype)

    if r.dim() != 1 or group_ids.shape != r.shape:
        raise ValueError(
            f"with group_ids, rewards and group_ids must both be flat [N]; got rewards {tuple(rewards.shape)} "
            f"and group_ids {tuple(group_ids.shape)}"
        )
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    sums = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, r)
    counts_f = counts.to(torch.float64)
    mean = sums / counts_f
    centred = r - mean[inverse]
    sq = torch.zeros_like(sums).index_add_(0, inverse, centred * centred)
    std = torch.where(counts > 1, (sq / (counts_f - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
    return _normalise(r, mean[inverse], std[inverse], normalize_std, eps).to(out_dtype)


def _std(r: Tensor, dim: int) -> Tensor:
    if r.shape[dim] < 2:
        return torch.zeros_like(r.select(dim, 0)).unsqueeze(dim)
    return r.std(dim=dim, keepdim=True)


def _normalise(r: Tensor, mean: Tensor, std: Tensor, normalize_std: bool, eps: float) -> Tensor:
    centred = r - mean
    return centred / (std + eps) if normalize_std else centred
