"""Deep Compression's operators against direct numpy statements of the paper's rules."""

from __future__ import annotations

import numpy as np
import pytest

from clipq.methods import deep_compression as dc
from clipq.methods.base import shared


def test_magnitude_mask_keeps_the_largest_magnitudes_with_ties_pruned_in_blob_order():
    w = np.array([0.1, -0.5, 0.3, -0.1, 0.2, 0.05], np.float32)
    assert dc.magnitude_mask(w, 0.5).tolist() == [False, True, True, False, True, False]
    # |0.1| twice: the earlier one goes first
    assert dc.magnitude_mask(w, 4 / 6).tolist() == [False, True, True, True, True, False]


@pytest.mark.parametrize("keep", [0.0, 1.5])
def test_magnitude_mask_refuses_a_keep_fraction_outside_0_1(keep):
    with pytest.raises(ValueError, match="keep fraction"):
        dc.magnitude_mask(np.ones(4), keep)


def test_linear_initialisation_spans_min_to_max_evenly():
    assert np.allclose(dc.linear_centroids(np.array([-1.0, 0.5, 2.0]), 4), [-1, 0, 1, 2])


def test_kmeans_is_lloyd_from_the_linear_initialisation():
    rng = np.random.default_rng(0)
    values = rng.normal(size=500)
    centroids, members = dc.kmeans(values, 7)
    # reference: plain Lloyd iterations from np.linspace(min, max, 7) until nothing moves
    ref = np.linspace(values.min(), values.max(), 7)
    for _ in range(100):
        assign = np.argmin(np.abs(values[:, None] - ref[None, :]), axis=1)
        new = np.array([values[assign == j].mean() if np.any(assign == j) else ref[j] for j in range(7)])
        if np.allclose(new, ref):
            break
        ref = new
    assert np.allclose(centroids, ref, atol=1e-9)
    assert np.array_equal(members, np.argmin(np.abs(values[:, None] - centroids[None, :]), axis=1))


def test_share_weights_codes_zero_for_pruned_and_levels_for_kept():
    w = np.array([[0.9, -0.01], [0.3, -0.7]], np.float32)
    mask = w != -0.01
    codes, codebook = dc.share_weights(w, mask, 2)
    assert codebook.shape == (3,) and codes[0, 1] == 0
    assert np.allclose(shared(codes, codebook), np.where(mask, w, 0))  # 3 kept weights, 3 centroids


def test_centroid_gradient_is_the_sum_of_the_members_gradients():
    codes = np.array([[1, 0, 2], [1, 3, 2]], np.uint8)
    grad = np.array([[0.5, 9.0, 1.0], [0.25, -2.0, 3.0]], np.float32)
    assert dc.centroid_gradient(grad, codes, 3).tolist() == [0.75, 4.0, -2.0]  # the pruned weight's 9 is ignored
