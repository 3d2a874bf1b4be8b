"""Dynamic Network Surgery's mask rule against the paper's statement of it."""

from __future__ import annotations

import numpy as np

from clipq.methods import dns


def test_threshold_is_mean_plus_c_rate_std_of_magnitudes_and_never_negative():
    w = np.array([1.0, -3.0])
    mu, sigma = dns.magnitude_statistics(w)
    assert (mu, sigma) == (2.0, 1.0)
    assert dns.threshold(mu, sigma, 0.5) == 2.5
    assert dns.threshold(mu, sigma, -5.0) == 0.0


def test_mask_prunes_below_0_9t_splices_above_1_1t_and_keeps_the_band():
    t = 1.0
    w = np.array([0.5, -0.9, 0.95, -1.05, 1.2, -2.0], np.float32)
    before = np.array([1, 1, 1, 0, 0, 0], np.float32)
    after = dns.update_mask(w, before, t)
    assert after.tolist() == [0, 0, 1, 0, 1, 1]  # |w| <= 0.9 -> 0; band (0.9, 1.1] unchanged; > 1.1 -> 1 (spliced)
    assert before.tolist() == [1, 1, 1, 0, 0, 0]  # not modified in place


def test_surgery_probability_decays_as_one_plus_gamma_iter_to_the_minus_power():
    assert dns.surgery_probability(0) == 1.0
    assert np.isclose(dns.surgery_probability(10000, 1e-4, 1.0), 0.5)
    assert np.isclose(dns.surgery_probability(30000, 1e-4, 2.0), 1 / 16)


def test_c_rate_for_a_keep_fraction_makes_the_first_surgery_keep_that_fraction():
    w = np.random.default_rng(0).normal(size=10000)
    c = dns.c_rate_for(w, 0.1)
    mu, sigma = dns.magnitude_statistics(w)
    first = dns.update_mask(w, np.ones_like(w), dns.threshold(mu, sigma, c))  # the mask starts all ones
    assert abs(first.mean() - 0.1) < 1e-3
