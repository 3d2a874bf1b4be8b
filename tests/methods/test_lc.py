"""Learning-Compression pruning's C step and multipliers against the method's equations."""

from __future__ import annotations

import numpy as np
import pytest

from clipq.methods import lc


def test_top_kappa_keeps_the_largest_magnitudes_over_all_layers_together():
    theta = lc.top_kappa({"a": np.array([0.1, -3.0, 0.2]), "b": np.array([[2.0, -0.05], [0.3, 1.0]])}, 3)
    assert theta["a"].tolist() == [0, -3.0, 0]
    assert theta["b"].tolist() == [[2.0, 0], [0, 1.0]]  # layer b gets 2 of the 3: the budget is global


def test_top_kappa_refuses_a_budget_larger_than_the_net():
    with pytest.raises(ValueError, match="kappa"):
        lc.top_kappa({"a": np.ones(3)}, 4)


def test_c_step_projects_w_minus_lambda_over_mu_then_updates_lambda():
    w = {"a": np.array([1.0, -0.2, 0.5], np.float32)}
    lam = {"a": np.array([0.0, 0.3, 0.4], np.float32)}
    mu = 2.0
    theta, new_lam = lc.c_step(w, lam, mu, 2)
    shifted = w["a"] - lam["a"] / mu                      # [1.0, -0.35, 0.3]
    assert np.allclose(theta["a"], [shifted[0], shifted[1], 0])
    assert np.allclose(new_lam["a"], lam["a"] - mu * (w["a"] - theta["a"]))


def test_penalty_gradient_and_mu_schedule():
    assert np.allclose(lc.penalty_gradient(np.array([1.0]), np.array([0.25]), np.array([0.5]), 2.0), [1.0])
    assert lc.mu_at(3, 0.01, 2.0) == 0.08


def test_global_kept_shares_one_magnitude_threshold_between_layers():
    kept = lc.global_kept({"a": np.array([3.0, 0.1, 0.2]), "b": np.array([2.0, 1.0, 0.05, 0.3])}, 3)
    assert kept == {"a": pytest.approx(1 / 3), "b": pytest.approx(2 / 4)}


def test_the_toolkit_schedule_is_the_toolkits_mu_sequence():
    # examples/lenet300/lenet300.py: mu_s = 9e-5 * 1.1**s for s in range(40)
    assert lc.TOOLKIT.mus() == pytest.approx([9e-5 * 1.1 ** s for s in range(40)], rel=1e-12)


def test_a_spanning_schedule_runs_from_its_first_to_its_last_mu():
    mus = lc.Schedule.spanning(1e-3, 30.0, 15).mus()
    assert len(mus) == 15 and mus[0] == pytest.approx(1e-3) and mus[-1] == pytest.approx(30.0)
    assert all(b / a == pytest.approx(mus[1] / mus[0]) for a, b in zip(mus, mus[1:]))


def test_the_quantizing_c_step_keeps_kappa_weights_on_at_most_2_to_the_b_minus_1_levels_per_layer():
    rng = np.random.default_rng(0)
    vectors = {"a": rng.normal(size=(20, 10)), "b": rng.normal(size=50)}
    theta = lc.quantized_top_kappa(vectors, 60, 2)
    assert sum(np.count_nonzero(t) for t in theta.values()) <= 60
    plain = lc.top_kappa(vectors, 60)
    for name, t in theta.items():
        assert len(np.unique(t[t != 0])) <= 3
        assert np.array_equal(t != 0, plain[name] != 0)  # the same support as the pruning C step


def test_one_of_lcs_compare_trials_runs_the_toolkits_mu_range():
    ranges = [(s.mus()[0], s.mus()[-1]) for s, _ in lc.TRIALS]
    assert (pytest.approx(9e-5), pytest.approx(lc.TOOLKIT.mus()[-1])) in ranges
    assert 10 <= max(s.steps for s, _ in lc.TRIALS) <= 20
