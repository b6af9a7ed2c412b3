"""Logprobs / entropy helpers in one process (no Megatron parallel state) vs float64 references.

The TP=2 path through Megatron's vocab_parallel_cross_entropy is tested in
test_rl_megatron_tp.py on real megatron-core.
"""

import pytest
import torch

from megatron_rpt.rl import (
    chunked_logprobs_and_entropy,
    scaled_logits,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_and_entropy,
)
from megatron_rpt.rl.logprobs import _VocabParallelEntropy

V_TRUE, V_PADDED, T = 37, 48, 0.6


def _logits(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, V_PADDED, generator=g) * 3
    logits[..., V_TRUE:] += 20.0  # padded columns would dominate if they were not masked
    labels = torch.randint(0, V_TRUE, (2, 6), generator=g)
    return logits, labels


def _reference(logits, labels):
    logp = torch.log_softmax(logits[..., :V_TRUE].double() / T, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_values_match_float64_reference_with_temperature_and_padding():
    logits, labels = _logits()
    want_lp, want_ent = _reference(logits, labels)
    lp, ent = vocab_parallel_logprobs_and_entropy(logits, labels, temperature=T, true_vocab_size=V_TRUE)
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), want_ent, rtol=0, atol=2e-5)
    torch.testing.assert_close(vocab_parallel_logprobs(logits, labels, T, V_TRUE).double(), want_lp, rtol=0, atol=2e-5)
    torch.testing.assert_close(vocab_parallel_entropy(logits, T, V_TRUE).double(), want_ent, rtol=0, atol=2e-5)
    # without the mask the padded columns take the mass: the mask matters
    assert (vocab_parallel_logprobs(logits, labels, T).double() - want_lp).abs().max() > 1.0


def test_gradients_match_float64_reference():
    logits, labels = _logits(1)
    w = torch.randn(2, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = logits.clone().requires_grad_()
    lp, ent = vocab_parallel_logprobs_and_entropy(x, labels, T, V_TRUE, entropy_grad=True)
    ((w * lp).sum() + (w * w * ent).sum()).backward()
    x64 = logits.double().requires_grad_()
    want_lp, want_ent = _reference(x64, labels)
    ((w * want_lp).sum() + (w * w * want_ent).sum()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=2e-5)
    assert x.grad[..., V_TRUE:].abs().max() == 0


def test_entropy_backward_is_exact_by_finite_differences():
    z = torch.randn(3, 4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z[..., -2:] = float("-inf")  # padded columns as scaled_logits leaves them
    zr = z.clone().requires_grad_()
    ent = _VocabParallelEntropy.apply(zr, None)
    w = torch.randn(3, 4, dtype=torch.float64)
    (w * ent).sum().backward()
    eps = 1e-6
    for idx in [(0, 0, 0), (1, 2, 5), (2, 3, 6)]:
        plus, minus = z.clone(), z.clone()
        plus[idx] += eps
        minus[idx] -= eps
        def f(t):
            return (w * _VocabParallelEntropy.apply(t, None)).sum()

        fd = (f(plus) - f(minus)) / (2 * eps)
        assert zr.grad[idx].item() == pytest.approx(fd.item(), abs=1e-7)
    assert torch.isfinite(zr.grad).all() and zr.grad[..., -2:].abs().max() == 0


def test_entropy_is_detached_unless_asked_and_input_is_not_overwritten():
    logits, labels = _logits(4)
    x = logits.clone().requires_grad_()
    before = x.detach().clone()
    _, ent = vocab_parallel_logprobs_and_entropy(x, labels, 1.0, V_TRUE)
    assert ent.grad_fn is None and not ent.requires_grad
    assert torch.equal(x.detach(), before)
    z = scaled_logits(x, 1.0)
    assert z.data_ptr() != x.data_ptr()


def test_bad_inputs():
    logits, labels = _logits()
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="labels shape"):
        vocab_parallel_logprobs(logits, labels[:, :3])
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_logprobs(logits, labels.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 12, 100])
def test_chunked_pass_matches_float64_reference_values_and_gradients(dtype, chunk):
    """The trainer's chunked pass: values and gradients of logp and H as the float64 math, at any
    chunk size (1 token, uneven, exactly the token count, larger), bf16 logits included; the
    input logits are neither overwritten nor given gradient in the padded columns."""
    logits, labels = _logits(4)
    logits = logits.to(dtype)
    g = torch.Generator().manual_seed(6)
    w, w2 = torch.randn(2, 2, 6, generator=g, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    lp, ent = chunked_logprobs_and_entropy(x, labels, T, V_TRUE, chunk_tokens=chunk, entropy_grad=True)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == labels.shape
    ((w * lp).sum() + (w2 * ent).sum()).backward()
    x64 = logits.double().requires_grad_()
    want_lp, want_ent = _reference(x64, labels)
    ((w * want_lp).sum() + (w2 * want_ent).sum()).backward()
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradient itself is stored in bf16
    torch.testing.assert_close(lp.double(), want_lp.detach(), rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), want_ent.detach(), rtol=0, atol=2e-5)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    assert x.grad[..., V_TRUE:].abs().max() == 0
    assert torch.equal(x.detach(), logits)


def test_chunked_pass_entropy_metric_is_detached_and_logp_only_gradient_is_exact():
    logits, labels = _logits(5)
    x = logits.clone().requires_grad_()
    lp, ent = chunked_logprobs_and_entropy(x, labels, T, V_TRUE, chunk_tokens=4)
    assert not ent.requires_grad and lp.requires_grad
    lp.sum().backward()
    x64 = logits.double().requires_grad_()
    _reference(x64, labels)[0].sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="chunk_tokens=0 must be >= 1"):
        chunked_logprobs_and_entropy(logits, labels, T, V_TRUE, chunk_tokens=0)
