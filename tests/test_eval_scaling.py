"""Compute accounting (FLOPs from the metrics rows) and the power-law fit of megatron_rpt.eval.scaling."""


import numpy as np
import pytest

from megatron_rpt.eval.scaling import ComputeModel, cumulative_compute, fit_power_law, power_law
from megatron_rpt.model.hf_config import arch_from_dict


def test_fit_recovers_known_parameters_from_noisy_points():
    # Accuracy rising with compute: A < 0, approaching P* = 0.55 from below, like the paper's curves.
    a_true, alpha_true, p_true = -0.4 * (1e18 ** 0.3), 0.3, 0.55
    compute = np.geomspace(1e18, 1e21, 14)
    rng = np.random.default_rng(0)
    accuracy = power_law(compute, a_true, alpha_true, p_true) + rng.normal(0, 5e-4, compute.shape)
    fit = fit_power_law(compute.tolist(), accuracy.tolist())
    assert fit.r2 > 0.99
    assert fit.alpha == pytest.approx(alpha_true, rel=0.05)
    assert fit.p_star == pytest.approx(p_true, abs=0.01)
    assert fit.a == pytest.approx(a_true, rel=0.15)
    # The fitted curve reproduces the noiseless truth inside the data range.
    assert np.allclose(fit.predict(compute), power_law(compute, a_true, alpha_true, p_true), atol=3e-3)


def test_fit_exact_points_and_decreasing_curve():
    compute = np.geomspace(10.0, 1e4, 8)
    loss = power_law(compute, 2.0, 0.5, 0.1)  # a falling quantity: A > 0
    fit = fit_power_law(compute, loss)
    assert fit.r2 > 0.9999
    assert (fit.a, fit.alpha, fit.p_star) == pytest.approx((2.0, 0.5, 0.1), rel=1e-3)


def test_fit_rejects_too_few_points():
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_power_law([1.0, 2.0, 3.0], [0.1, 0.2, 0.3])


def test_cumulative_compute_by_hand():
    n = 1_000
    rows = [
        {"step": 1, "compute/trained_tokens": 100, "compute/generated_tokens": 40},
        {"step": 2, "compute/trained_tokens": 200, "compute/generated_tokens": 50},
        {"step": 2, "compute/trained_tokens": 210, "compute/generated_tokens": 60},  # re-logged after resume
        {"step": 3, "val/standard_acc_easy": 0.5},  # no compute in this row
        {"step": 4, "rollout/generated_tokens": 30},  # old run: per-rank average only
    ]
    out = cumulative_compute(rows, ComputeModel(num_params=n, data_parallel=2))
    step1 = 6 * n * 100 + 2 * n * 40
    step2 = 6 * n * 210 + 2 * n * 60
    step4 = 6 * n * 60 + 2 * n * 60  # 30 tokens x 2 ranks, trained = generated (prompts not counted)
    assert out == [(1, step1), (2, step1 + step2), (4, step1 + step2 + step4)]


def test_num_parameters_matches_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = dict(architectures=["Qwen2ForCausalLM"], hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=96, vocab_size=300, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg))
    expected = sum(p.numel() for p in model.parameters())
    assert arch_from_dict(cfg).num_parameters() == expected
