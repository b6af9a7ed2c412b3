"""grpo_loss against a plain float64 loop over tokens, micro-batch decomposition, gradients."""

import itertools
import math

import pytest
import torch

from megatron_rpt.config import Config, ConfigError, RLConfig, load_config, validate
from megatron_rpt.rl import aggregate_loss, grpo_loss, merge_metrics

B, S = 5, 7


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, S, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logprobs + 0.5 * torch.randn(B, S, generator=g, dtype=torch.float64)  # ratios ~ e^{+-1}
    ref = logprobs + 0.3 * torch.randn(B, S, generator=g, dtype=torch.float64)
    entropy = torch.rand(B, S, generator=g, dtype=torch.float64) * 2
    adv = torch.tensor([1.3, -0.7, -0.4, 1.9, -0.9], dtype=torch.float64)
    mask = torch.zeros(B, S, dtype=torch.float64)
    for i, (start, length) in enumerate([(1, 5), (2, 2), (0, 7), (3, 0), (4, 3)]):  # row 3: no response token
        mask[i, start:start + length] = 1
    # garbage off the mask must not leak into the loss
    logprobs = logprobs.masked_fill(mask == 0, -30.0)
    return logprobs, old, ref, entropy, adv, mask


def _reference(logprobs, old, ref, entropy, adv, mask, cfg: RLConfig):
    """Token-by-token float64 GRPO loss written without tensors."""
    seq_sums, seq_counts, token_losses = [], [], []
    clipped = 0
    for i in range(B):
        total, count = 0.0, 0
        for t in range(S):
            if mask[i, t] == 0:
                continue
            a = float(adv[i])
            ratio = math.exp(float(logprobs[i, t] - old[i, t]))
            unclipped = -a * ratio
            clip = -a * min(max(ratio, 1 - cfg.clip_low), 1 + cfg.clip_high)
            loss = max(unclipped, clip)
            clipped += clip > unclipped
            if cfg.dual_clip is not None and a < 0:
                loss = min(loss, -a * cfg.dual_clip)
            if cfg.kl_coef > 0:
                d = float(ref[i, t] - logprobs[i, t])
                kl = -d if cfg.kl_type == "k1" else math.exp(d) - d - 1
                loss += cfg.kl_coef * kl
            loss -= cfg.entropy_coef * float(entropy[i, t])
            total += loss
            count += 1
            token_losses.append(loss)
        seq_sums.append(total)
        seq_counts.append(count)
    seqs = [k for k in range(B) if seq_counts[k] > 0]
    if cfg.loss_aggregation == "token-mean":
        value = sum(token_losses) / len(token_losses)
    elif cfg.loss_aggregation == "seq-mean-token-sum":
        value = sum(seq_sums[k] for k in seqs) / len(seqs)
    else:
        value = sum(seq_sums[k] / seq_counts[k] for k in seqs) / len(seqs)
    return value, clipped / len(token_losses)


CONFIGS = [
    RLConfig(clip_low=0.2, clip_high=clip_high, dual_clip=dual, kl_coef=kl_coef, kl_type=kl_type,
                   entropy_coef=ent, loss_aggregation=agg)
    for clip_high, dual, (kl_coef, kl_type), ent, agg in itertools.product(
        (0.2, 0.28), (None, 1.5), ((0.0, "k3"), (0.1, "k1"), (0.1, "k3")), (0.0, 0.01),
        ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"),
    )
]


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_token_loop_reference_for_every_option(seed):
    logprobs, old, ref, entropy, adv, mask = _inputs(seed)
    for cfg in CONFIGS:
        loss, metrics = grpo_loss(logprobs, old, adv, mask, ref, entropy, cfg)
        want, clip_fraction = _reference(logprobs, old, ref, entropy, adv, mask, cfg)
        assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12), cfg
        assert metrics["clip_fraction"].item() == pytest.approx(clip_fraction, abs=1e-6), cfg
    # the inputs exercise both clip sides and the dual clip
    _, m = grpo_loss(logprobs, old, adv, mask, cfg=RLConfig(dual_clip=1.5))
    assert m["clip_fraction_low"] > 0 and m["clip_fraction_high"] > 0 and m["dual_clip_fraction"] > 0


def test_metrics_against_plain_math():
    logprobs, old, ref, entropy, adv, mask = _inputs(3)
    cfg = RLConfig(kl_coef=0.1, kl_type="k3")
    _, metrics = grpo_loss(logprobs, old, adv.unsqueeze(-1).expand(B, S), mask, ref, entropy, cfg)
    sel = mask.bool()
    ratio = (logprobs - old).exp()[sel]
    d = (ref - logprobs)[sel]
    assert metrics["ratio_mean"].item() == pytest.approx(ratio.mean().item(), rel=1e-6)
    assert metrics["ratio_max"].item() == pytest.approx(ratio.max().item(), rel=1e-6)
    assert metrics["approx_kl"].item() == pytest.approx((ratio - 1 - ratio.log()).mean().item(), rel=1e-6)
    assert metrics["kl_to_ref"].item() == pytest.approx((d.exp() - d - 1).mean().item(), rel=1e-6)
    assert metrics["entropy"].item() == pytest.approx(entropy[sel].mean().item(), rel=1e-6)
    assert metrics["num_tokens"].item() == sel.sum().item() and metrics["num_seqs"].item() == 4


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_and_dp_ranks_sum_to_full_batch(agg):
    logprobs, old, ref, entropy, adv, mask = _inputs(4)
    cfg = RLConfig(clip_high=0.28, kl_coef=0.05, entropy_coef=0.01, loss_aggregation=agg)
    entropy.requires_grad_()  # the entropy bonus needs a differentiable entropy
    full_lp = logprobs.clone().requires_grad_()
    full_loss, _ = grpo_loss(full_lp, old, adv, mask, ref, entropy, cfg)
    full_loss.backward()

    n_tokens = int(mask.sum())
    n_seqs = int((mask.sum(-1) > 0).sum())
    chunk_lp = logprobs.clone().requires_grad_()
    total = 0.0
    local_means = []
    # rows {0,1} | {2} on "DP rank 0" and {3} | {4} on "DP rank 1": uneven token counts on purpose
    for rows in ([0, 1], [2], [3], [4]):
        r = torch.tensor(rows)
        loss, _ = grpo_loss(chunk_lp[r], old[r], adv[r], mask[r], ref[r], entropy[r], cfg,
                            num_global_tokens=n_tokens, num_global_seqs=n_seqs)
        loss.backward()
        total += loss.item()
        local_means.append(grpo_loss(logprobs[r], old[r], adv[r], mask[r], ref[r], entropy[r], cfg)[0].item())
    assert entropy.grad is not None
    assert total == pytest.approx(full_loss.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(chunk_lp.grad, full_lp.grad, rtol=1e-12, atol=1e-14)
    # the naive mean of per-micro-batch means (row 3 has no tokens: its 0 counts) is different
    assert sum(local_means) / len(local_means) != pytest.approx(full_loss.item(), rel=1e-3)


def test_gradients_by_hand():
    # one sequence of five tokens, token-mean over 5; ratios chosen in each region of the surrogate
    old = torch.zeros(1, 5, dtype=torch.float64)
    ratios = torch.tensor([[1.1, 1.5, 0.5, 4.0, 2.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    logprobs = ratios.log().requires_grad_()
    cfg = RLConfig(clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    loss, m = grpo_loss(logprobs, old, adv, torch.ones(1, 5), cfg=cfg)
    # token losses: -1.1 (unclipped) | -1.2 (clipped at 1.2) | 0.8 (clipped at 0.8) | 3 (dual clip) | 2 (unclipped)
    assert loss.item() == pytest.approx((-1.1 - 1.2 + 0.8 + 3.0 + 2.0) / 5, rel=1e-12)
    loss.backward()
    # d(-A * ratio)/dlogp = -A * ratio where unclipped, 0 where a clip bound is active
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1.1, 0.0, 0.0, 0.0, 2.0]], dtype=torch.float64) / 5)
    assert m["clip_fraction"].item() == pytest.approx(2 / 5) and m["dual_clip_fraction"].item() == pytest.approx(1 / 5)

    # KL and entropy terms: d k3/dlogp = 1 - exp(ref - logp), d k1/dlogp = 1, d(-c H)/dH = -c
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    ent = torch.tensor([[0.7, 1.2]], dtype=torch.float64, requires_grad=True)
    zero_adv = torch.zeros(1, 2, dtype=torch.float64)
    for kl_type, want in (("k3", 1 - torch.exp(ref - logp.detach())), ("k1", torch.ones(1, 2, dtype=torch.float64))):
        logp.grad, ent.grad = None, None
        cfg = RLConfig(kl_coef=0.3, kl_type=kl_type, entropy_coef=0.05, loss_aggregation="seq-mean-token-sum")
        loss, _ = grpo_loss(logp, logp.detach(), zero_adv, torch.ones(1, 2), ref, ent, cfg)
        loss.backward()
        torch.testing.assert_close(logp.grad, 0.3 * want)
        torch.testing.assert_close(ent.grad, torch.full((1, 2), -0.05, dtype=torch.float64))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_gradcheck_finite_differences(agg):
    logprobs, old, ref, entropy, adv, mask = _inputs(5)
    cfg = RLConfig(clip_high=0.28, dual_clip=1.5, kl_coef=0.1, kl_type="k3", entropy_coef=0.02,
                         loss_aggregation=agg)

    def f(lp, ent):
        return grpo_loss(lp, old, adv, mask, ref, ent, cfg)[0]

    assert torch.autograd.gradcheck(f, (logprobs.clone().requires_grad_(), entropy.clone().requires_grad_()))


def test_k3_is_capped_and_ratio_clamped():
    logp = torch.tensor([[-40.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    cfg = RLConfig(kl_coef=1.0, kl_type="k3")
    loss, m = grpo_loss(logp, old, torch.ones(1), torch.ones(1, 2), ref, cfg=cfg)
    assert torch.isfinite(loss) and m["kl_to_ref"].item() == pytest.approx(5.0)  # (10 + 0) / 2
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_rl_section_rules_and_loss_errors():
    # The loss reads the rl section itself; its rules are the config loader's (files, --set and code).
    for override, message in [("rl.dual_clip=0.5", r"rl\.dual_clip=0\.5 must be > 1"),
                              ("rl.loss_aggregation=mean", r"rl\.loss_aggregation='mean' is not one of"),
                              ("rl.clip_low=1.0", r"rl\.clip_low=1\.0 must be >= 0 and < 1"),
                              ("rl.kl_type=k2", r"rl\.kl_type='k2' is not one of \['k1', 'k3'\]"),
                              ("rl.kl_coef=-0.1", r"rl\.kl_coef=-0\.1 must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override], validate_paths=False)
    with pytest.raises(ConfigError, match=r"rl\.dual_clip=0\.5 must be > 1"):
        validate(Config(rl=RLConfig(dual_clip=0.5)))
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(x, x, torch.ones(1), x + 1, cfg=RLConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(x, x, torch.ones(1), x + 1, cfg=RLConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="no gradient"):
        grpo_loss(x.clone().requires_grad_(), x, torch.ones(1), x + 1, entropy=x,
                  cfg=RLConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="old_logprobs shape"):
        grpo_loss(x, torch.zeros(1, 3), torch.ones(1), x + 1)
    with pytest.raises(ValueError, match="num_global_tokens"):
        aggregate_loss(x, x + 1, "token-mean", num_global_tokens=0)


def test_merge_metrics_weights_by_tokens():
    logprobs, old, ref, entropy, adv, mask = _inputs(6)
    cfg = RLConfig(kl_coef=0.1)
    n = int(mask.sum())
    parts = [grpo_loss(logprobs[r], old[r], adv[r], mask[r], ref[r], entropy[r], cfg, num_global_tokens=n)[1]
             for r in (slice(0, 2), slice(2, 5))]
    merged = merge_metrics(parts)
    _, full = grpo_loss(logprobs, old, adv, mask, ref, entropy, cfg)
    for key in ("loss", "pg_loss", "clip_fraction", "approx_kl", "kl_to_ref", "entropy", "ratio_mean", "ratio_max",
                "num_tokens", "num_seqs"):
        assert merged[key] == pytest.approx(full[key].item(), rel=1e-6), key
