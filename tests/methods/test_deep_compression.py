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


def sensitive_net_error(weights: dict[str, np.ndarray]):
    """A stand-in for Caffe's held-out error: layer `a` costs 100 points per unit of weight mass it loses, `b`
    only 10; quantization error counts the same way."""
    reference = {n: np.abs(w).sum() for n, w in weights.items()}
    cost = {"a": 100.0, "b": 10.0}

    def error_of(replaced):
        return 5.0 + sum(cost[n] * float(np.abs(weights[n] - w).sum()) / reference[n] for n, w in replaced.items())
    return error_of


def test_the_sensitivity_scan_prunes_the_insensitive_layer_further_and_picks_the_fewest_bits_within_tolerance():
    rng = np.random.default_rng(1)
    weights = {"a": rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "b": rng.normal(size=(10, 30)).astype(np.float32)}
    scan = dc.Sensitivity(weights, sensitive_net_error(weights))
    assert scan.base == 5.0 and all(loss == 0 for loss in (scan.pruned["a"][0], scan.pruned["b"][0]))
    plan = scan.plan(tolerance=2.0)
    assert plan["b"].p > plan["a"].p  # b loses a tenth as much per weight: pruned further
    for name, lp in plan.items():
        keep = 1 - lp.p
        assert scan.pruned[name][scan.grid.index(pytest.approx(keep))] <= 2.0
        assert lp.bits in dc.bit_range(weights[name])
        lower = [b for b in dc.bit_range(weights[name]) if b < lp.bits]
        assert all(scan.shared_loss(name, keep, b) > 2.0 for b in lower)
    assert dc.bit_range(weights["a"]) == (4, 5, 6, 7, 8) and dc.bit_range(weights["b"]) == (3, 4, 5, 6)
    assert scan.plan(0.0)["a"].p < scan.plan(5.0)["a"].p  # a larger tolerance prunes more


def test_iterative_pruning_steps_the_kept_fraction_geometrically_and_never_unprunes():
    from clipq.plan import LayerPlan
    method = dc.DeepCompression("deep-compression", {}, plan={"w": LayerPlan(1 - 0.125, 5)}, rounds=3, bias={"w": False})
    phases = method.phases()
    assert [p.name for p in phases] == ["prune1", "prune2", "prune3", "share"]
    assert [p.share for p in phases] == pytest.approx([1 / 6, 1 / 6, 1 / 6, 0.5])
    assert [1 - method.round_p("w", r) for r in (1, 2, 3)] == pytest.approx([0.5, 0.25, 0.125])
    rng = np.random.default_rng(2)
    blobs = {"w": [rng.normal(size=64).astype(np.float32)]}
    masks = []
    for phase in phases[:3]:
        blobs = phase.prepare(blobs)
        blobs["w"][0] = blobs["w"][0] + rng.normal(scale=0.5, size=64).astype(np.float32)  # "retraining"
        masks.append(blobs["w"][-1] > 0)
    assert [int(m.sum()) for m in masks] == [32, 16, 8]
    assert all(not (later & ~earlier).any() for earlier, later in zip(masks, masks[1:]))


def test_compare_tries_the_papers_shape_in_one_and_three_rounds_then_the_scans():
    from clipq.methods.base import Trial
    paper = [Trial(f"paper r{r}", lambda: None) for r in dc.ROUNDS]
    scan = [Trial(f"scan r{r}", lambda: None) for r in dc.ROUNDS]
    labels = [t.label for t in dc.DeepCompression.ordered([paper, scan])]
    assert labels == ["paper r1", "paper r3", "paper r3, lr x2", "scan r3", "scan r1"]
    assert [t.label for t in dc.DeepCompression.ordered([paper])] == ["paper r1", "paper r3"]
