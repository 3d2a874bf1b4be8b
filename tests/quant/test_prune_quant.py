"""The CLIP-Q operator: the paper's Fig. 2 example, its properties, the choices it documents, and the
fast kernel against the plain-numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from clipq.quant import kernel, partition, prune_quant
from clipq.quant.partition import pruned_count
from clipq.quant.prune_quant import clip_quantize, clip_quantize_reference, quantize_with
from clipq.util import parallel

FIG2 = np.array([-2.1, -1.5, -0.9, -0.4, -0.3, -0.05, -0.02, -1.2,
                 0.01, 0.03, 0.2, 0.5, 0.8, 1.1, 1.6, 2.4], np.float32)


def random_weights(n, seed=0, scale=0.01):
    return np.random.default_rng(seed).normal(0, scale, n).astype(np.float32)


def test_fig2_example_prunes_two_per_sign_and_keeps_three_levels():
    q = clip_quantize(FIG2, p=0.25, bits=2)
    assert np.array_equal(np.flatnonzero(q.weights == 0), [5, 6, 8, 9])  # -0.05, -0.02, 0.01, 0.03
    assert q.clips == pytest.approx((-0.05, 0.03))
    assert len(np.unique(q.weights[q.weights != 0])) <= 3
    # L- = 2.05, L+ = 2.37: one interval left of c-, two right of c+ (width 1.185 from 0.03).
    expected = {-2.1: -6.4 / 6, -1.5: -6.4 / 6, -0.9: -6.4 / 6, -0.4: -6.4 / 6, -0.3: -6.4 / 6, -1.2: -6.4 / 6,
                0.2: 0.65, 0.5: 0.65, 0.8: 0.65, 1.1: 0.65, 1.6: 2.0, 2.4: 2.0}
    for w, level in expected.items():
        assert q.weights[np.isclose(FIG2, w)][0] == pytest.approx(level, rel=1e-6)


@pytest.mark.parametrize("p,bits", [(0.0, 8), (0.25, 2), (0.5, 3), (0.9, 4), (0.96, 3), (0.3, 1)])
def test_levels_are_at_most_2_to_the_b_minus_1(p, bits):
    q = clip_quantize(random_weights(5000), p, bits)
    assert len(np.unique(q.weights[q.mask])) <= 2 ** bits - 1
    assert q.codebook.shape == (2 ** bits - 1,)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.96])
def test_pruned_count_is_round_p_times_each_sign(p):
    w = random_weights(4001, seed=1)
    q = clip_quantize(w, p, 3)
    assert np.count_nonzero(~q.mask) == pruned_count(p, np.sum(w < 0)) + pruned_count(p, np.sum(w > 0))


@pytest.mark.parametrize("p", [0.2, 0.7])
def test_pruned_weights_are_the_smallest_magnitudes_of_each_sign(p):
    w = random_weights(3000, seed=2)
    q = clip_quantize(w, p, 4)
    for side in (w < 0, w > 0):
        kept, pruned = np.abs(w[side & q.mask]), np.abs(w[side & ~q.mask])
        assert pruned.max() <= kept.min()


@pytest.mark.parametrize("p,bits", [(0.3, 2), (0.6, 5), (0.0, 8)])
def test_levels_are_the_means_of_their_intervals(p, bits):
    w = random_weights(6000, seed=3)
    q = clip_quantize(w, p, bits)
    for code in np.unique(q.codes[q.mask]):
        members = w[q.codes == code].astype(np.float64)
        assert q.codebook[code - 1] == np.float32(members.mean())
        assert np.all(q.weights[q.codes == code] == q.codebook[code - 1])


def test_codebook_is_ascending_and_each_interval_holds_its_members():
    w = random_weights(6000, seed=4)
    q = clip_quantize(w, 0.4, 4)
    assert np.all(np.diff(q.codebook) > 0)
    idx = q.partition.index(w[q.mask])
    assert np.array_equal(idx + 1, q.codes[q.mask])


def test_quantizing_the_output_with_the_same_partition_returns_it():
    w = random_weights(6000, seed=5)
    q = clip_quantize(w, 0.5, 3)
    again = quantize_with(q.weights, q.mask.ravel(), q.partition, 7)
    assert np.array_equal(again.weights, q.weights)
    assert np.array_equal(again.codes, q.codes)


def test_ties_do_not_change_the_pruned_count_and_go_in_blob_order():
    w = np.array([0.5, -0.5, 0.5, 0.5, -0.5, 0.5, -0.5, 0.5], np.float32)
    q = clip_quantize(w, 0.4, 2)  # 5 positives -> 2 pruned, 3 negatives -> 1 pruned
    assert np.array_equal(np.flatnonzero(~q.mask), [0, 1, 2])


def test_p_zero_prunes_only_exact_zeros_which_count_for_neither_sign():
    w = np.array([0.0, 0.3, -0.2, 0.0, 0.1, -0.4], np.float32)
    q = clip_quantize(w, 0.0, 8)
    assert np.array_equal(q.mask, w != 0)
    q = clip_quantize(w, 0.5, 8)  # 2 positives -> 1 pruned (half up), 2 negatives -> 1 pruned
    assert np.array_equal(np.flatnonzero(q.mask), [1, 5])


def test_all_positive_layer_gives_every_interval_to_the_positive_side():
    w = np.abs(random_weights(2000, seed=6)) + 1e-4
    q = clip_quantize(w, 0.5, 3)
    assert q.partition.n_neg == 0 and q.partition.n_pos == 7
    assert np.all(q.codebook > 0)


def test_one_bit_with_both_signs_is_one_level_the_mean_of_the_kept_weights():
    w = random_weights(1000, seed=7)
    q = clip_quantize(w, 0.5, 1)
    assert q.codebook[0] == np.float32(w[q.mask].astype(np.float64).mean())


def test_empty_interval_gets_its_centre_and_no_weight():
    w = np.array([-1.0, -0.99, 1.0, 1.01, 4.0], np.float32)  # the positive middle intervals stay empty
    q = clip_quantize(w, 0.0, 3)
    used = np.unique(q.codes[q.mask])
    unused = sorted(set(range(1, 8)) - set(used))
    assert unused
    centres = q.partition.centres()
    assert np.allclose(q.codebook[np.array(unused) - 1], centres[np.array(unused) - 1])


def test_a_pruned_weight_comes_back_when_it_grows():
    w = random_weights(1000, seed=8)
    w[10] = 1e-6
    assert not clip_quantize(w, 0.3, 3).mask[10]
    w[10] = 0.05
    assert clip_quantize(w, 0.3, 3).mask[10]


@pytest.mark.parametrize("p,bits", [(1.0, 3), (-0.1, 3), (0.5, 0), (0.5, 9), (0.5, 2.5)])
def test_invalid_p_or_bits_is_rejected(p, bits):
    with pytest.raises(ValueError):
        clip_quantize(FIG2, p, bits)


def test_nan_weights_are_rejected_by_both_implementations():
    w = random_weights(prune_quant.SMALL_LAYER + 10)
    w[123] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        clip_quantize(w, 0.5, 3)
    with pytest.raises(ValueError, match="NaN"):
        clip_quantize(w[100:200], 0.5, 3)


def assert_identical(fast, ref):
    assert np.array_equal(ref.codes, fast.codes)
    assert ref.clips == fast.clips
    assert np.array_equal(fast.codebook.view(np.uint32), ref.codebook.view(np.uint32))  # bit for bit
    assert np.array_equal(fast.weights, np.concatenate([[0], fast.codebook])[fast.codes])


@pytest.mark.parametrize("threads", ["serial", "parallel"])
@pytest.mark.parametrize("use_sample", [True, False], ids=["sampled-bracket", "radix-fallback"])
@pytest.mark.parametrize("p,bits", [(0.0, 8), (0.3, 3), (0.96, 3), (0.5, 1), (0.99, 2), (0.2, 8)])
def test_kernel_equals_reference_with_ties_and_zeros(p, bits, use_sample, threads, monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_MIN", 1 if threads == "parallel" else 1 << 30)
    w = random_weights(300_001, seed=9)
    w[::7] = w[3]  # many exact ties, on both the pruned and the kept side
    w[5::11] = 0
    assert_identical(kernel.clip_quantize(w, p, bits, use_sample=use_sample), clip_quantize_reference(w, p, bits))


@pytest.mark.parametrize("step", [1e-6, 1e-3, 1.0], ids=["fine-tuning-step", "large-step", "other-weights"])
@pytest.mark.parametrize("p,bits", [(0.96, 3), (0.5, 4), (0.0, 2)])
def test_kernel_bracketed_by_the_previous_clips_equals_reference(p, bits, step, monkeypatch):
    monkeypatch.setattr(parallel, "PARALLEL_MIN", 1)
    w = random_weights(300_001, seed=3)
    previous = kernel.clip_quantize(w, p, bits)
    w2 = (w + step * random_weights(w.size, seed=4)).astype(np.float32)
    ref = clip_quantize_reference(w2, p, bits)
    fast = kernel.clip_quantize(w2, p, bits, previous=previous)
    assert fast.codes is not None and np.shares_memory(fast.codes, previous.codes)  # the buffer is reused
    assert_identical(fast, ref)


def test_level_means_are_exact_whatever_the_order_of_the_members():
    w = np.array([1e30, 1.0, -1e30, 3.0] * 2, np.float32)  # float64 sums in blob order lose the small ones
    part = partition.make_partition(1, -1e30, 1e30, 0.0, 0.0, True, True)  # one spanning interval
    keep = np.ones(w.size, bool)
    levels = [quantize_with(order, keep, part, 1).codebook[0] for order in (w, w[::-1], np.sort(w))]
    assert levels == [np.float32(1.0)] * 3


def test_out_receives_the_quantized_weights_in_the_callers_shape():
    w = random_weights(prune_quant.SMALL_LAYER * 2).reshape(64, -1)
    out = np.empty_like(w)
    q = clip_quantize(w, 0.5, 3, out=out)
    assert q.weights is out
    assert np.array_equal(out, clip_quantize_reference(w, 0.5, 3).weights)
