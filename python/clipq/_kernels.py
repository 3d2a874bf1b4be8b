"""numba kernels: the O(n) operator behind `prune_quant.clip_quantize`, and the layers' gradient hand-off.

Same results as `prune_quant.clip_quantize_reference`, bit for bit in the codes and clips.

Selection is exact and sort-free. For non-zero float32 values the bit pattern without the sign bit
orders like the magnitude, so everything works on those integers:

1. *Scan* (one pass): per sign, count the weights and those below a bracket [lo, hi] that a random
   sample of 65536 weights says holds the k-th smallest magnitude, and copy the few weights inside the
   bracket (value, index). The k-th smallest is then found among them exactly, ties in blob order.
   If the bracket misses (a sample can mislead, e.g. with huge blocks of equal weights), an exact
   two-pass radix selection (histograms of the high, then the low 16 bits) takes over.
2. *Codes* (one pass): pruned or interval index per weight, and per-interval sums for the levels.
3. *Output* (one pass): quantized weight = codebook[code].

Work is split into fixed chunks whose partial results are combined in chunk order, so results do not
depend on thread scheduling.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from clipq.prune_quant import Quantized, level_means, make_partition, pruned_count

ABS_MASK = np.uint32(0x7FFFFFFF)
INF_BITS = np.uint32(0x7F800000)
POS, NEG = 0, 1  # side index = sign bit
SIGN_BIT = np.uint32(0x80000000)
SAMPLE = 1 << 16
GATHER_BLOCK = 64
PARALLEL_MIN = 1 << 20  # below this many weights, threads cost more than they save (they contend with BLAS's)
MOSTLY_PRUNED = 0.8  # from this pruned fraction on, the code pass branches over pruned weights (faster)
LANES = 4  # independent accumulators per interval, to break add-latency chains
HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16


# Each parallel kernel hands contiguous slices (one chunk each) to a serial helper: numba vectorizes a
# loop over a whole slice, but not one over an index range of a bigger array (measured: 6x slower).

@njit(cache=True)
def _count_chunk(bits, lo_pos, lo_neg, stats):
    """Non-zero, negative, and below-the-bracket counts per sign (vectorizes: no stores, no branches)."""
    nonzero = negative = below_pos = below_neg = 0
    for i in range(bits.size):
        u = bits[i]
        a = u & ABS_MASK
        neg = u > SIGN_BIT
        pos = (u > 0) & (u < SIGN_BIT)
        nonzero += pos | neg
        negative += neg
        below_pos += pos & (a < lo_pos)
        below_neg += neg & (a < lo_neg)
    stats[0], stats[1], stats[2], stats[3] = nonzero, negative, below_pos, below_neg


@njit(cache=True)
def _extrema_chunk(bits, stats):
    """Largest positive and largest overall bit patterns: the largest weight, the most negative one, and
    (>= the infinity pattern) NaN or Inf. Separate from the counts: together they do not vectorize."""
    top_pos = top_all = np.uint32(0)
    for i in range(bits.size):
        u = bits[i]
        top_pos = max(top_pos, u if u < SIGN_BIT else np.uint32(0))
        top_all = max(top_all, u)
    stats[4], stats[5] = top_pos, top_all


@njit(cache=True)
def _gather_chunk(bits, lo_pos, hi_pos, lo_neg, hi_neg, lo_any, span, offset, cand_bits, cand_idx):
    """Copy the weights whose magnitude is inside the bracket of their sign (bit pattern, blob index);
    return how many there are. Blocks of 64 are first tested (vectorized) against the union of both
    brackets: few blocks hit. Inside a block, no branch on the (random) sign."""
    cap = cand_bits.size
    n = 0
    for start in range(0, bits.size, GATHER_BLOCK):
        stop = min(start + GATHER_BLOCK, bits.size)
        hits = 0
        for i in range(start, stop):
            a = bits[i] & ABS_MASK
            hits += np.uint32(a - lo_any) <= span  # wraps below lo_any: no hit
        if hits == 0:
            continue
        for i in range(start, stop):
            u = bits[i]
            a = u & ABS_MASK
            neg = u >= SIGN_BIT
            lo_s = lo_neg if neg else lo_pos
            hi_s = hi_neg if neg else hi_pos
            if (a != 0) & (a >= lo_s) & (a <= hi_s):
                if n < cap:
                    cand_bits[n], cand_idx[n] = u, offset + i
                n += 1
    return n


@njit(cache=True)
def _scan_one(chunk, lo, hi, lo_any, span, cand_bits, cand_idx, stats, offset=0):
    _count_chunk(chunk, lo[0], lo[1], stats)
    _extrema_chunk(chunk, stats)
    return _gather_chunk(chunk, lo[0], hi[0], lo[1], hi[1], lo_any, span, offset, cand_bits, cand_idx)


@njit(parallel=True, cache=True)
def _scan(bits, bounds, lo, hi, lo_any, span, cand_bits, cand_idx, stats):
    """stats[c] = [nonzero, negative, below+, below-, top+ bits, top bits, candidates]."""
    if bounds.size == 2:  # one chunk: no thread launch (it costs more than small work)
        stats[0, 6] = _scan_one(bits, lo, hi, lo_any, span, cand_bits[0], cand_idx[0], stats[0])
        return
    for c in prange(bounds.size - 1):
        b0, b1 = bounds[c], bounds[c + 1]
        stats[c, 6] = _scan_one(bits[b0:b1], lo, hi, lo_any, span, cand_bits[c], cand_idx[c], stats[c], b0)


@njit(cache=True)
def _radix_high_chunk(bits, hist):
    for i in range(bits.size):
        a = bits[i] & ABS_MASK
        if a != 0 and a < INF_BITS:
            hist[bits[i] >> 31, a >> 16] += 1


@njit(parallel=True, cache=True)
def _radix_high(bits, bounds, hist):
    if bounds.size == 2:  # one chunk: no thread launch (it costs more than small work)
        _radix_high_chunk(bits, hist[0])
        return
    for c in prange(bounds.size - 1):
        _radix_high_chunk(bits[bounds[c]:bounds[c + 1]], hist[c])


@njit(cache=True)
def _radix_low_chunk(bits, high_bin, hist):
    for i in range(bits.size):
        a = bits[i] & ABS_MASK
        s = bits[i] >> 31
        if a != 0 and (a >> 16) == high_bin[s]:
            hist[s, a & 0xFFFF] += 1


@njit(parallel=True, cache=True)
def _radix_low(bits, bounds, high_bin, hist):
    if bounds.size == 2:  # one chunk: no thread launch (it costs more than small work)
        _radix_low_chunk(bits, high_bin, hist[0])
        return
    for c in prange(bounds.size - 1):
        _radix_low_chunk(bits[bounds[c]:bounds[c + 1]], high_bin, hist[c])


@njit(cache=True)
def _last_tie_index(bits, threshold, sign, ties):
    """Index of the `ties`-th weight (in blob order) of the given sign whose magnitude equals threshold."""
    seen = 0
    for i in range(bits.size):
        if (bits[i] & ABS_MASK) == threshold and (bits[i] >> 31) == sign:
            seen += 1
            if seen == ties:
                return i
    return bits.size


@njit(cache=True)
def _interval(v, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg):
    """The reference's interval formula: first + clamp(floor((w - left) * inv), 0, last) on w's side."""
    if v < 0:
        return np.int64(min(max(np.floor((v - left_neg) * inv_neg), 0.0), last_neg))
    return first_pos + np.int64(min(max(np.floor((v - left_pos) * inv_pos), 0.0), last_pos))


@njit(cache=True)
def _code_chunk(w, t_pos, t_neg, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg,
                mostly_pruned, codes, sums, counts):
    """code = interval + 1 for weights beyond the clips, 0 for the rest (ties at a clip are fixed up
    afterwards); sums/counts[lane, code] accumulate the levels (slot 0 is unused).

    When most weights are pruned, a branch skips them (it predicts well); otherwise the loop is
    branch-free, since random signs and keep/prune decisions would mispredict."""
    if mostly_pruned:
        for i in range(w.size):
            x = w[i]
            if x <= t_pos and x >= t_neg:
                codes[i] = 0
                continue
            v = np.float64(x)
            if x < 0:
                code = 1 + np.int64(min(max(np.floor((v - left_neg) * inv_neg), 0.0), last_neg))
            else:
                code = 1 + first_pos + np.int64(min(max(np.floor((v - left_pos) * inv_pos), 0.0), last_pos))
            codes[i] = code
            sums[i & (LANES - 1), code] += v
            counts[i & (LANES - 1), code] += 1
        return
    for i in range(w.size):
        x = w[i]
        v = np.float64(x)
        keep = (x > t_pos) | (x < t_neg)
        jn = np.int64(min(max(np.floor((v - left_neg) * inv_neg), 0.0), last_neg))
        jp = first_pos + np.int64(min(max(np.floor((v - left_pos) * inv_pos), 0.0), last_pos))
        code = ((jn if x < 0 else jp) + 1) * keep
        codes[i] = code
        sums[i & (LANES - 1), code] += v
        counts[i & (LANES - 1), code] += 1


@njit(parallel=True, cache=True)
def _code_pass(w, bounds, t_pos, t_neg, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg,
               mostly_pruned, codes, sums, counts):
    if bounds.size == 2:  # one chunk: no thread launch (it costs more than small work)
        _code_chunk(w, t_pos, t_neg, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg,
                    mostly_pruned, codes, sums[0], counts[0])
        return
    for c in prange(bounds.size - 1):
        b0, b1 = bounds[c], bounds[c + 1]
        _code_chunk(w[b0:b1], t_pos, t_neg, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg,
                    mostly_pruned, codes[b0:b1], sums[c], counts[c])


@njit(cache=True)
def _keep_ties(w, index, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg, codes, sums, counts):
    """Give the kept weights that equal a clip (ties after the last pruned one) their codes."""
    for i in index:
        v = np.float64(w[i])
        code = _interval(v, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg) + 1
        codes[i] = code
        sums[0, code] += v
        counts[0, code] += 1


@njit(cache=True)
def _output_chunk(codes, lut, out):
    for i in range(codes.size):
        out[i] = lut[codes[i]]


@njit(parallel=True, cache=True)
def _output_pass(codes, lut, bounds, out):
    if bounds.size == 2:  # one chunk: no thread launch (it costs more than small work)
        _output_chunk(codes, lut, out)
        return
    for c in prange(bounds.size - 1):
        _output_chunk(codes[bounds[c]:bounds[c + 1]], lut, out[bounds[c]:bounds[c + 1]])


@njit(cache=True)
def _add_and_clear_chunk(dst, src):
    for i in range(dst.size):
        dst[i] += src[i]
        src[i] = 0


@njit(parallel=True, cache=True)
def _add_and_clear(dst, src, bounds):
    if bounds.size == 2:  # one chunk: no thread launch (it costs more than small work)
        _add_and_clear_chunk(dst, src)
        return
    for c in prange(bounds.size - 1):
        _add_and_clear_chunk(dst[bounds[c]:bounds[c + 1]], src[bounds[c]:bounds[c + 1]])


@njit(cache=True)
def _codes_for_levels_chunk(w, levels, codes):
    for i in range(w.size):
        x = w[i]
        code = 0
        if x != 0:
            code = -1
            for j in range(levels.size):
                if levels[j] == x:
                    code = j + 1
                    break
            if code < 0:
                return False
        codes[i] = code
    return True


@njit(parallel=True, cache=True)
def _codes_for_levels(w, levels, bounds, codes, ok):
    if bounds.size == 2:  # one chunk: no thread launch (it costs more than small work)
        ok[0] = _codes_for_levels_chunk(w, levels, codes)
        return
    for c in prange(bounds.size - 1):
        ok[c] = _codes_for_levels_chunk(w[bounds[c]:bounds[c + 1]], levels, codes[bounds[c]:bounds[c + 1]])


def codes_for_levels(w: np.ndarray, levels: np.ndarray) -> np.ndarray | None:
    """uint8 codes (0 for zero, j for levels[j - 1]) if every non-zero weight is one of `levels`, else None."""
    flat = np.ascontiguousarray(w, np.float32).reshape(-1)
    bounds = _chunk_bounds(flat.size)
    codes = np.empty(flat.size, np.uint8)
    ok = np.zeros(bounds.size - 1, np.bool_)
    _codes_for_levels(flat, np.ascontiguousarray(levels, np.float32), bounds, codes, ok)
    return codes.reshape(w.shape) if ok.all() else None


@njit(cache=True)
def pack_bits(values, width):
    """Unsigned `width`-bit integers packed MSB first, padded to a byte (uint8 array)."""
    out = np.zeros((values.size * width + 7) // 8, np.uint8)
    bit = 0
    for i in range(values.size):
        v = values[i]
        for b in range(width - 1, -1, -1):
            if (v >> b) & 1:
                out[bit >> 3] |= np.uint8(1 << (7 - (bit & 7)))
            bit += 1
    return out


@njit(cache=True)
def filler_counts(gaps, max_bits):
    """fillers[k] = sum(gaps >> k) for k in 0..max_bits: the extra entries an index width k needs."""
    fillers = np.zeros(max_bits + 1, np.int64)
    for g in gaps:
        for k in range(1, max_bits + 1):
            shifted = g >> k
            if shifted == 0:
                break
            fillers[k] += shifted
    return fillers


@njit(cache=True)
def unpack_bits(data, width, count):
    """`count` unsigned `width`-bit integers packed MSB first (the inverse of sparse_codec.pack_bits)."""
    out = np.empty(count, np.int64)
    bit = 0
    for i in range(count):
        value = 0
        for _ in range(width):
            value = (value << 1) | ((data[bit >> 3] >> (7 - (bit & 7))) & 1)
            bit += 1
        out[i] = value
    return out


@njit(cache=True)
def scatter_entries(index, code_entries, lut, size):
    """Weights and codes of a sparse layer from its index and code streams; -1 if an index runs past `size`."""
    weights = np.zeros(size, np.float32)
    codes = np.zeros(size, np.uint8)
    pos = -1
    for i in range(index.size):
        pos += index[i] + 1
        if pos >= size:
            return weights, codes, -1
        codes[pos] = code_entries[i]
        weights[pos] = lut[code_entries[i]]
    return weights, codes, 0


def add_and_clear(dst: np.ndarray, src: np.ndarray) -> None:
    """dst += src; src = 0 (one parallel pass; float32 arrays of the same size)."""
    d, s = dst.reshape(-1), src.reshape(-1)
    _add_and_clear(d, s, _chunk_bounds(d.size))


def _chunk_bounds(n: int) -> np.ndarray:
    """Chunk edges: one chunk (serial) below PARALLEL_MIN elements, else 4 per thread."""
    chunks = 1 if n < PARALLEL_MIN else 4 * numba.get_num_threads()
    return np.linspace(0, n, chunks + 1).astype(np.int64)


def _side_args(part) -> tuple:
    """The partition as the scalars of `_code_pass`: left, 1/width, first and last interval per side."""
    if part.spanning:  # one interval for everything: index 0 whatever the value
        return 0.0, 0.0, 0, 0, 0.0, 0.0, 0
    inv_pos = 1.0 / part.pos_width if part.pos_width else 0.0
    inv_neg = 1.0 / part.neg_width if part.neg_width else 0.0
    return (part.pos_left, inv_pos, part.n_neg, max(part.n_pos - 1, 0),
            part.neg_left, inv_neg, max(part.n_neg - 1, 0))


def _brackets(u: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Per sign, a [lo, hi] range of magnitude bits that very likely holds the k-th smallest
    (quantile p +- 5 sigma of a random sample), and a candidate capacity per chunk."""
    rng = np.random.default_rng(12345)  # fixed: the result never depends on it, only the speed
    sample = u[rng.integers(0, u.size, min(SAMPLE, max(u.size // 32, 1024)))]
    lo, hi = np.ones(2, np.uint32), np.zeros(2, np.uint32)
    expected = 0.0
    for s in (POS, NEG):
        mags = np.sort(sample[((sample >> 31) == s) & ((sample & ABS_MASK) != 0)] & ABS_MASK)
        if mags.size == 0:
            continue
        delta = 5 * np.sqrt(max(p * (1 - p), 1 / mags.size) / mags.size) + 2 / mags.size
        lo[s] = mags[max(int((p - delta) * mags.size), 0)] if p - delta > 0 else 1
        hi[s] = mags[min(int(np.ceil((p + delta) * mags.size)), mags.size - 1)] if p + delta < 1 else INF_BITS - 1
        expected = max(expected, 2 * delta)
    return lo, hi, expected


def _select_from_candidates(k: int, below: int, values: np.ndarray, index: np.ndarray) -> tuple[int, np.ndarray] | None:
    """(threshold, indices of the kept ties) if the candidates (magnitude bits of one sign, blob order)
    hold the k-th smallest magnitude, else None."""
    need = k - below
    if need <= 0 or need > values.size:
        return None
    threshold = np.partition(values, need - 1)[need - 1]
    ties = index[values == threshold]
    pruned_ties = need - int(np.count_nonzero(values < threshold))
    return int(threshold), ties[pruned_ties:]


def _select_radix(u: np.ndarray, bounds: np.ndarray, k: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Exact fallback: per sign, the k-th smallest magnitude by two histogram passes, ties in blob order."""
    chunks = bounds.size - 1
    high = np.zeros((chunks, 2, HIGH_BINS), np.int64)
    _radix_high(u, bounds, high)
    high = high.sum(axis=0)
    high_bin, below = np.full(2, -1, np.int64), [0, 0]
    for s in (POS, NEG):
        if k[s]:
            cum = np.cumsum(high[s])
            high_bin[s] = np.searchsorted(cum, k[s])
            below[s] = int(cum[high_bin[s] - 1]) if high_bin[s] else 0
    low = np.zeros((chunks, 2, LOW_BINS), np.int64)
    _radix_low(u, bounds, high_bin, low)
    low = low.sum(axis=0)
    threshold, kept_ties = np.zeros(2, np.uint32), [np.zeros(0, np.int64), np.zeros(0, np.int64)]
    for s in (POS, NEG):
        if k[s]:
            cum = np.cumsum(low[s])
            low_bin = int(np.searchsorted(cum, k[s] - below[s]))
            threshold[s] = (int(high_bin[s]) << 16) | low_bin
            less = below[s] + (int(cum[low_bin - 1]) if low_bin else 0)
            ties = np.flatnonzero(u == (threshold[s] | (SIGN_BIT if s else 0)))
            kept_ties[s] = ties[k[s] - less:]
    return threshold, kept_ties


def clip_quantize(w: np.ndarray, p: float, bits: int, out: np.ndarray | None = None,
                  use_sample: bool = True) -> Quantized:
    """Kernel version of `prune_quant.clip_quantize_reference` for a contiguous float32 array.

    `use_sample=False` forces the exact radix fallback (for tests)."""
    flat = w.reshape(-1)
    u = flat.view(np.uint32)
    bounds = _chunk_bounds(flat.size)
    chunks = bounds.size - 1
    levels = 2 ** bits - 1

    lo, hi, expected = _brackets(u, p) if use_sample else (np.ones(2, np.uint32), np.zeros(2, np.uint32), 0.0)
    cap = int(expected * flat.size / chunks * 2) + 1024
    cand_bits = np.empty((chunks, cap), np.uint32)
    cand_idx = np.empty((chunks, cap), np.int64)
    stats = np.zeros((chunks, 7), np.int64)
    lo_any = np.uint32(lo.min())
    span = np.uint32(max(int(hi.max()) - int(lo_any), 0))  # both brackets inside [lo_any, lo_any + span]
    _scan(u, bounds, lo, hi, lo_any, span, cand_bits, cand_idx, stats)
    top_pos, top_all = np.uint32(stats[:, 4].max()), np.uint32(stats[:, 5].max())
    if top_pos >= INF_BITS or top_all >= (SIGN_BIT | INF_BITS):
        raise ValueError("weights contain NaN or Inf")
    total = stats.sum(axis=0)
    count = [int(total[0] - total[1]), int(total[1])]
    k = [pruned_count(p, count[s]) for s in (POS, NEG)]

    found = None
    if stats[:, 6].max() <= cap:
        bits_all = np.concatenate([cand_bits[c, :n] for c, n in enumerate(stats[:, 6])])
        index_all = np.concatenate([cand_idx[c, :n] for c, n in enumerate(stats[:, 6])])  # blob order
        sides = [bits_all < SIGN_BIT, bits_all >= SIGN_BIT]
        found = [_select_from_candidates(k[s], int(total[2 + s]), bits_all[sides[s]] & ABS_MASK, index_all[sides[s]])
                 if k[s] else (0, np.zeros(0, np.int64)) for s in (POS, NEG)]
    if found is None or None in found:
        threshold, kept_ties = _select_radix(u, bounds, k)
    else:
        threshold = np.array([found[POS][0], found[NEG][0]], np.uint32)
        kept_ties = [found[POS][1], found[NEG][1]]

    magnitude = np.array([top_pos, top_all & ABS_MASK if top_all > SIGN_BIT else 0], np.uint32)
    max_abs = magnitude.view(np.float32).astype(np.float64)
    clip_abs = threshold.view(np.float32)
    part = make_partition(levels, -float(max_abs[NEG]), float(max_abs[POS]), -float(clip_abs[NEG]),
                          float(clip_abs[POS]), count[NEG] > k[NEG], count[POS] > k[POS])

    codes = np.empty(flat.size, np.uint8)
    sums = np.zeros((chunks, LANES, levels + 1), np.float64)  # slot 0: the pruned weights, unused
    counts = np.zeros((chunks, LANES, levels + 1), np.int64)
    side = _side_args(part)
    mostly_pruned = sum(k) >= MOSTLY_PRUNED * max(sum(count), 1)
    _code_pass(flat, bounds, clip_abs[POS], -clip_abs[NEG], *side, mostly_pruned, codes, sums, counts)
    ties = np.concatenate(kept_ties).astype(np.int64)
    if ties.size:
        _keep_ties(flat, ties, *side, codes, sums[0], counts[0])
    codebook = level_means(sums.sum(axis=(0, 1))[1:], counts.sum(axis=(0, 1))[1:], part, levels)
    lut = np.concatenate([[0], codebook]).astype(np.float32)
    result = np.empty(w.shape, np.float32) if out is None else out
    _output_pass(codes, lut, bounds, result.reshape(-1))
    return Quantized(result, codes.reshape(w.shape), codebook, part)
