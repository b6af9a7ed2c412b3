"""Token log-probabilities and entropy from vocab-parallel logits.

Owns: ``log p(target)`` and the entropy of the sampling distribution computed from the
policy's logits while each tensor-parallel rank holds only its slice of the vocabulary
(``GPTModel(parallel_output=True)`` returns ``[b, s, V_padded / tp]`` when called with
``labels=None``). Nothing gathers full-vocabulary logits: the log-probability goes through
Megatron's ``vocab_parallel_cross_entropy`` (logprob = -CE) and the entropy through a
small autograd function that all-reduces the max, the sum of exponentials and
``sum p * logit`` over the TP group.

Two details keep training consistent with the rollouts:
- ``temperature``: rollouts sample from ``softmax(logits / T)``, so the log-probabilities
  of the policy ratio must be taken under the same ``T``.
- ``true_vocab_size``: Megatron pads the vocabulary to a multiple of
  ``make_vocab_size_divisible_by * tp``; the padded columns are set to ``-inf`` on the
  rank that owns them so they take no probability mass (and the result does not depend
  on the TP size).

The tensor-parallel group is passed in (``tp_group``, the policy's
:attr:`~megatron_rpt.topology.Topology.tp_group`); without one (or with a group of one rank:
a single process, a CPU rollout engine, a unit test) the same quantities are computed locally
with plain torch.

:func:`chunked_logprobs_and_entropy` is what the trainer runs: the same two quantities
computed over chunks of tokens by one autograd function that keeps no float32 copy of the
logits. It saves the logits as the model returned them (bf16 on GPU) plus two floats per
token (log Z and H) and rebuilds each chunk's softmax in backward, so the log-prob pass costs
``chunk x V/tp`` float32 temporaries instead of two or three full float32 copies (19-23 bytes
per logit element with Megatron's cross entropy). Same values and gradients as the full path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_rpt.model.mcore_compat import vocab_parallel_cross_entropy


def _tp_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """``group`` when it spans several ranks, else None (the vocabulary is not split)."""
    return group if group is not None and dist.get_world_size(group) > 1 else None


def _tp_rank(group: dist.ProcessGroup | None) -> int:
    """This rank's index in the tensor-parallel group: which vocabulary slice it holds."""
    return dist.get_rank(group) if group is not None else 0


def scaled_logits(logits: Tensor, temperature: float = 1.0, true_vocab_size: int | None = None,
                  tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """``logits / temperature`` in float32 with padded vocabulary columns at ``-inf``.

    Always returns a NEW tensor: Megatron's cross entropy overwrites its input in place,
    so the caller's logits must never be handed to it directly.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use the rollout sampling temperature)")
    z = logits.float() / temperature
    if true_vocab_size is None:
        return z
    if true_vocab_size <= 0:
        raise ValueError(f"true_vocab_size={true_vocab_size} must be > 0")
    rank = _tp_rank(_tp_group(tp_group))
    part = z.shape[-1]
    start = rank * part
    if start + part <= true_vocab_size:
        return z  # this rank owns no padded column
    padded = torch.arange(start, start + part, device=z.device) >= true_vocab_size
    return z.masked_fill(padded, float("-inf"))


class _VocabParallelEntropy(torch.autograd.Function):
    """H = log Z - sum_v p_v (z_v - m), reduced over the TP group.

    Backward needs no communication: dH/dz_v = -p_v (log p_v + H) uses only the global
    softmax (saved) and H, both already reduced. Every TP rank holds the same loss, so
    the incoming gradient is the same on each rank and each returns the gradient of its
    own vocabulary slice.
    """

    @staticmethod
    def forward(ctx, z: Tensor, group: object | None) -> Tensor:  # type: ignore[override]
        m = z.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shifted = z - m.unsqueeze(-1)
        e = shifted.exp()
        sum_exp = e.sum(dim=-1)
        if group is not None:
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        p = e.div_(sum_exp.unsqueeze(-1))
        # Padded columns have p == 0 and shifted == -inf; their term is 0, not 0 * -inf.
        sum_p_shifted = (p * shifted.masked_fill_(p == 0, 0.0)).sum(dim=-1)
        if group is not None:
            dist.all_reduce(sum_p_shifted, op=dist.ReduceOp.SUM, group=group)
        entropy = sum_exp.log() - sum_p_shifted
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(p, entropy)
        return entropy

    @staticmethod
    def backward(ctx, grad_entropy: Tensor):  # type: ignore[override]
        p, entropy = ctx.saved_tensors
        grad = torch.xlogy(p, p).add_(p * entropy.unsqueeze(-1)).mul_(-grad_entropy.unsqueeze(-1))
        return grad, None


def vocab_parallel_entropy(
    logits: Tensor,
    temperature: float = 1.0,
    true_vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Entropy ``[...]`` of ``softmax(logits / temperature)`` from vocab-parallel ``logits [..., V/tp]``.

    Differentiable (the gradient flows back to this rank's logits) when ``logits``
    requires grad.
    """
    group = _tp_group(tp_group)
    z = scaled_logits(logits, temperature, true_vocab_size, group)
    return _VocabParallelEntropy.apply(z, group)


def vocab_parallel_logprobs(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    true_vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """``log softmax(logits / temperature)[label]`` ``[...]`` from vocab-parallel ``logits [..., V/tp]``.

    ``labels`` are global token ids shaped like ``logits`` without the last dim (e.g.
    ``[b, s]`` next-token labels from :func:`megatron_rpt.rl.batch.build_batch`).
    Returns float32.
    """
    _check_labels(logits, labels)
    group = _tp_group(tp_group)
    z = scaled_logits(logits, temperature, true_vocab_size, group)
    return _logprobs_from_scaled(z, labels, group)


def vocab_parallel_logprobs_and_entropy(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    true_vocab_size: int | None = None,
    entropy_grad: bool = False,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """(logprobs, entropy), both ``[...]`` float32, sharing one scaled copy of the logits.

    ``entropy_grad=False`` computes the entropy as a detached metric (no extra activation
    memory); set it True when the loss has an entropy bonus (``rl.entropy_coef > 0``).
    """
    _check_labels(logits, labels)
    group = _tp_group(tp_group)
    z = scaled_logits(logits, temperature, true_vocab_size, group)
    # The entropy must read z before the cross entropy below overwrites it in place.
    if entropy_grad:
        entropy = _VocabParallelEntropy.apply(z, group)
    else:
        with torch.no_grad():
            entropy = _VocabParallelEntropy.apply(z.detach(), group)
    return _logprobs_from_scaled(z, labels, group), entropy


class _ChunkedLogprobsEntropy(torch.autograd.Function):
    """(log p(label), H) per token over chunks of ``chunk`` tokens, vocab-parallel.

    Forward, per chunk: ``z = logits / T`` in float32 (padded columns at -inf), the max
    all-reduced, then one all-reduce of [sum exp(z - m), z[label] on the owning rank,
    sum exp(z - m) * (z - m)]: ``log Z = m + log s``, ``logp = z[label] - log Z``,
    ``H = log s - sum_v p_v (z_v - m)``. Saves the caller's logits (no copy), the labels,
    ``log Z`` and ``H``. Backward, per chunk, without communication (every TP rank holds the
    same per-token losses): ``p = exp(z - log Z)``; ``d logp / dz = onehot - p`` and
    ``d H / dz = -p (log p + H)``; both times ``1 / T``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, temperature: float,  # type: ignore[override]
                true_vocab_size: int | None, chunk: int, group: object | None) -> tuple[Tensor, Tensor]:
        rank = _tp_rank(group)
        flat = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1)
        n, part = flat.shape
        start = rank * part
        padded = None
        if true_vocab_size is not None and start + part > true_vocab_size:
            padded = torch.arange(start, start + part, device=flat.device) >= true_vocab_size
        logz = torch.empty(n, dtype=torch.float32, device=flat.device)
        logp = torch.empty_like(logz)
        entropy = torch.empty_like(logz)
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            z = _chunk_scaled(flat[lo:hi], temperature, padded)
            m = z.max(dim=-1).values
            if group is not None:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            z.sub_(m.unsqueeze(-1))  # shifted in place
            local = flat_labels[lo:hi] - start
            owned = (local >= 0) & (local < part)
            target = z.gather(-1, local.clamp(0, part - 1).unsqueeze(-1)).squeeze(-1) * owned
            e = z.exp()
            stats = torch.stack([e.sum(-1), target, (e * z.masked_fill_(e == 0, 0.0)).sum(-1)])
            del e, z
            if group is not None:
                dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
            sum_exp, target, weighted = stats
            log_s = sum_exp.log()
            logz[lo:hi] = m + log_s
            logp[lo:hi] = target - log_s
            entropy[lo:hi] = log_s - weighted / sum_exp
        ctx.save_for_backward(logits, labels, logz, entropy)
        ctx.set_materialize_grads(False)  # an unused output (the entropy metric) costs no backward work
        ctx.settings = (temperature, chunk, start, padded)
        shape = logits.shape[:-1]
        return logp.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_logp: Tensor | None, grad_entropy: Tensor | None):  # type: ignore[override]
        logits, labels, logz, entropy = ctx.saved_tensors
        temperature, chunk, start, padded = ctx.settings
        flat = logits.reshape(-1, logits.shape[-1])
        flat_labels = labels.reshape(-1)
        n, part = flat.shape
        grad = torch.empty_like(flat)
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None, None
        g_lp = grad_logp.reshape(-1).float() if grad_logp is not None else None
        g_h = grad_entropy.reshape(-1).float() if grad_entropy is not None else None
        for lo in range(0, n, chunk):
            hi = min(lo + chunk, n)
            z = _chunk_scaled(flat[lo:hi], temperature, padded)
            log_p = z.sub_(logz[lo:hi].unsqueeze(-1))  # log p, in place
            p = log_p.exp()
            g = torch.zeros_like(p)
            if g_h is not None:
                # dH/dz = -p (log p + H); padded columns have p = 0 (and log p = -inf): xlogy gives 0.
                g = torch.xlogy(p, p).add_(p * entropy[lo:hi].unsqueeze(-1)).mul_(-g_h[lo:hi].unsqueeze(-1))
            if g_lp is not None:
                g.sub_(p * g_lp[lo:hi].unsqueeze(-1))
                local = flat_labels[lo:hi] - start
                owned = (local >= 0) & (local < part)
                rows = torch.nonzero(owned).squeeze(-1)
                g[rows, local[rows]] += g_lp[lo:hi][rows]
            grad[lo:hi] = g.div_(temperature)
            del z, p, g
        return grad.view_as(logits), None, None, None, None, None


def _chunk_scaled(logits: Tensor, temperature: float, padded: Tensor | None) -> Tensor:
    """A float32 copy of ``logits / T`` with the padded vocabulary columns at -inf."""
    z = logits.float() / temperature if logits.dtype != torch.float32 else logits / temperature
    if padded is not None:
        z.masked_fill_(padded, float("-inf"))
    return z


def chunked_logprobs_and_entropy(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    true_vocab_size: int | None = None,
    chunk_tokens: int = 1024,
    entropy_grad: bool = False,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """(logprobs, entropy) like :func:`vocab_parallel_logprobs_and_entropy`, ``chunk_tokens`` at a time.

    ``logits`` ``[..., V/tp]`` in the model's dtype (never copied whole to float32), ``labels``
    its shape without the last dim. Both results are float32; the entropy carries a gradient
    only with ``entropy_grad`` (an entropy bonus in the loss), else it is a detached metric.
    """
    _check_labels(logits, labels)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1 (rl.logprob_chunk_tokens)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use the rollout sampling temperature)")
    if true_vocab_size is not None and true_vocab_size <= 0:
        raise ValueError(f"true_vocab_size={true_vocab_size} must be > 0")
    logp, entropy = _ChunkedLogprobsEntropy.apply(logits, labels.long(), temperature, true_vocab_size,
                                                  chunk_tokens, _tp_group(tp_group))
    return logp, entropy if entropy_grad else entropy.detach()


def _check_labels(logits: Tensor, labels: Tensor) -> None:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)} without the "
            "vocab dim; GPTModel returns [b, s, V/tp] logits for [b, s] labels"
        )
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")


def _logprobs_from_scaled(z: Tensor, labels: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """-CE of ``z`` (consumed: may be overwritten in place) at ``labels``, over the TP ``group``."""
    if group is None:
        return torch.log_softmax(z, dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return -vocab_parallel_cross_entropy(z, labels.long(), group)
