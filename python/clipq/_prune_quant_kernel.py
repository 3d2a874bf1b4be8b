"""Multi-threaded O(n) kernel behind `prune_quant.clip_quantize` (numba); same results as the reference.

Selection is exact and sort-free: for non-zero float32 values, the bit pattern without the sign bit
orders like the magnitude, so a histogram of the high 15 bits finds the bin holding the k-th smallest
magnitude of each sign, and a histogram of the low 16 bits inside that bin finds its exact value.
Four passes over the weights: high histogram (+ max magnitudes), low histogram, codes (+ interval sums),
output. Work is split into fixed chunks whose partial results are combined in chunk order, so the
result does not depend on thread scheduling. Ties at the threshold are pruned in blob order, using the
per-chunk tie counts of the low histogram as prefix offsets.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from clipq.prune_quant import Partition, Quantized, level_means, make_partition, pruned_count

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16
ABS_MASK = np.uint32(0x7FFFFFFF)
INF_BITS = np.uint32(0x7F800000)
POS, NEG = 0, 1  # side index = sign bit


@njit(parallel=True, cache=True)
def _high_pass(bits, bounds, hist, max_abs):
    nonfinite = np.zeros(bounds.size - 1, np.int64)
    for c in prange(bounds.size - 1):
        for i in range(bounds[c], bounds[c + 1]):
            a = bits[i] & ABS_MASK
            if a == 0:
                continue
            if a >= INF_BITS:
                nonfinite[c] += 1
                continue
            s = bits[i] >> 31
            hist[c, s, a >> 16] += 1
            if a > max_abs[c, s]:
                max_abs[c, s] = a
    return nonfinite.sum()


@njit(parallel=True, cache=True)
def _low_pass(bits, bounds, high_bin, hist):
    for c in prange(bounds.size - 1):
        for i in range(bounds[c], bounds[c + 1]):
            a = bits[i] & ABS_MASK
            if a == 0:
                continue
            s = bits[i] >> 31
            if (a >> 16) == high_bin[s]:
                hist[c, s, a & 0xFFFF] += 1


@njit(parallel=True, cache=True)
def _code_pass(w, bits, bounds, threshold, ties_wanted, ties_before, spanning, n_neg, n_pos,
               neg_left, neg_inv, pos_left, pos_inv, codes, sums, counts):
    for c in prange(bounds.size - 1):
        ties_seen = ties_before[c].copy()
        for i in range(bounds[c], bounds[c + 1]):
            a = bits[i] & ABS_MASK
            if a == 0:
                codes[i] = 0
                continue
            s = bits[i] >> 31
            t = threshold[s]
            if a < t:
                codes[i] = 0
                continue
            if a == t:
                ties_seen[s] += 1
                if ties_seen[s] <= ties_wanted[s]:
                    codes[i] = 0
                    continue
            v = np.float64(w[i])
            if spanning:
                j = 0
            elif s == NEG:
                j = 0 if neg_inv == 0.0 else int(min(max(np.floor((v - neg_left) * neg_inv), 0.0), n_neg - 1))
            else:
                j = n_neg + (0 if pos_inv == 0.0 else
                             int(min(max(np.floor((v - pos_left) * pos_inv), 0.0), n_pos - 1)))
            codes[i] = j + 1
            sums[c, j] += v
            counts[c, j] += 1


@njit(parallel=True, cache=True)
def _output_pass(codes, lut, bounds, out):
    for c in prange(bounds.size - 1):
        for i in range(bounds[c], bounds[c + 1]):
            out[i] = lut[codes[i]]


def _chunk_bounds(n: int) -> np.ndarray:
    chunks = max(1, min(n // (1 << 16), 4 * numba.get_num_threads()))
    return np.linspace(0, n, chunks + 1).astype(np.int64)


def _select(hist_high: np.ndarray, k: int) -> tuple[int, int]:
    """(bin holding the k-th smallest, count below that bin) for one side's summed histogram."""
    cum = np.cumsum(hist_high)
    b = int(np.searchsorted(cum, k))
    return b, int(cum[b - 1]) if b else 0


def clip_quantize(w: np.ndarray, p: float, bits: int, out: np.ndarray | None = None) -> Quantized:
    """Kernel version of `prune_quant.clip_quantize_reference` for a contiguous float32 array."""
    flat = w.ravel()
    u = flat.view(np.uint32)
    bounds = _chunk_bounds(flat.size)
    chunks = bounds.size - 1
    levels = 2 ** bits - 1

    hist = np.zeros((chunks, 2, HIGH_BINS), np.int64)
    max_abs = np.zeros((chunks, 2), np.uint32)
    if _high_pass(u, bounds, hist, max_abs):
        raise ValueError("weights contain NaN or Inf")
    hist_sides = hist.sum(axis=0)
    max_abs = max_abs.max(axis=0)
    count = hist_sides.sum(axis=1)
    k = [pruned_count(p, int(count[s])) for s in (POS, NEG)]

    high_bin = np.full(2, -1, np.int64)
    below = [0, 0]
    for s in (POS, NEG):
        if k[s]:
            high_bin[s], below[s] = _select(hist_sides[s], k[s])
    low = np.zeros((chunks, 2, LOW_BINS), np.int64)
    if k[POS] or k[NEG]:
        _low_pass(u, bounds, high_bin, low)

    threshold = np.zeros(2, np.uint32)    # magnitudes below are pruned (0: nothing pruned)
    ties_wanted = np.zeros(2, np.int64)   # how many weights equal to the threshold are pruned
    ties_before = np.zeros((chunks, 2), np.int64)
    clip_abs = [0.0, 0.0]
    for s in (POS, NEG):
        if not k[s]:
            continue
        low_bin, less = _select(low[:, s, :].sum(axis=0), k[s] - below[s])
        threshold[s] = (high_bin[s] << 16) | low_bin
        ties_wanted[s] = k[s] - below[s] - less
        per_chunk = low[:, s, low_bin]
        ties_before[1:, s] = np.cumsum(per_chunk)[:-1]
        clip_abs[s] = float(threshold[s:s + 1].view(np.float32)[0])

    magnitude = max_abs.view(np.float32).astype(np.float64)
    keep_pos, keep_neg = count[POS] > k[POS], count[NEG] > k[NEG]
    part: Partition = make_partition(levels, -float(magnitude[NEG]), float(magnitude[POS]),
                                     -clip_abs[NEG], clip_abs[POS], bool(keep_neg), bool(keep_pos))

    codes = np.empty(flat.size, np.uint8)
    sums = np.zeros((chunks, levels), np.float64)
    counts = np.zeros((chunks, levels), np.int64)
    _code_pass(flat, u, bounds, threshold, ties_wanted, ties_before, part.spanning, part.n_neg, part.n_pos,
               part.neg_left, 1.0 / part.neg_width if part.neg_width else 0.0,
               part.pos_left, 1.0 / part.pos_width if part.pos_width else 0.0, codes, sums, counts)

    sums, counts = sums.sum(axis=0), counts.sum(axis=0)
    codebook = level_means(sums, counts, part, levels)
    lut = np.concatenate([[np.float32(0)], codebook]).astype(np.float32)
    result = np.empty(w.shape, np.float32) if out is None else out
    _output_pass(codes, lut, bounds, result.reshape(-1))
    return Quantized(result, codes.reshape(w.shape), codebook, part)
