"""The numba kernel of the O(n) operator behind `prune_quant.clip_quantize`.

Same results as `prune_quant.clip_quantize_reference`, bit for bit: codes, clips and codebook (level
sums are exact integer sums of mantissas per exponent, so their order does not matter).

Selection is exact and sort-free. For non-zero float32 values the bit pattern without the sign bit
orders like the magnitude, so everything works on those integers. Three passes over the weights:

1. *Scan*: per sign, count the weights and those below a bracket [lo, hi] that very likely holds the
   k-th smallest magnitude, find the extrema, and copy the few weights inside the bracket (value,
   index); the k-th smallest is then found among them exactly, ties in blob order. The chunk is read
   from memory once: each block of SCAN_BLOCK weights is counted, searched for extrema and gathered
   while it is in cache. The bracket is the previous call's clips +- NEAR_ULPS (fine-tuning moves them
   little per iteration), else a random sample's quantile +- 5 sigma. If the bracket misses, the next
   one is tried, and last an exact two-pass radix selection (histograms of the high, then the low 16
   bits).
2. *Codes*: per block, the kept weights are marked (vectorized), listed without branches, and only
   they get an interval index and join the per-interval mantissa sums of the levels.
3. *Output*: quantized weight = codebook[code].

Work is split into fixed chunks whose partial results are combined in chunk order, so results do not
depend on thread scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from clipq.quant.partition import EXPONENTS, Quantized, level_means, make_partition, pruned_count
from clipq.util.parallel import chunk_bounds

ABS_MASK = np.uint32(0x7FFFFFFF)
INF_BITS = np.uint32(0x7F800000)
POS, NEG = 0, 1  # side index = sign bit
SIGN_BIT = np.uint32(0x80000000)
SAMPLE = 1 << 16
GATHER_BLOCK = 64
LANES = 4  # independent accumulators per interval in the code pass, to break add-latency chains
SCAN_BLOCK = 8192  # weights read from memory once per scan, then counted, searched and gathered in cache
NEAR_ULPS = 1 << 14  # the previous clips' bracket: +- 2**14 units in the last place, +-0.2..0.4 %
HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16
GATHER_MAGIC = np.uint64(0x0102040810204080)  # x * this >> 56: the low bits of x's 8 bytes as one byte
SET_BITS = np.array([[i for i in range(8) if b >> i & 1] + [0] * (8 - bin(b).count("1")) for b in range(256)],
                    np.int64)  # SET_BITS[b, :popcount(b)]: the positions of b's set bits
SET_BIT_COUNT = np.array([bin(b).count("1") for b in range(256)], np.int64)


# Each parallel kernel hands contiguous slices (one chunk each) to a serial helper: numba vectorizes a
# loop over a whole slice, but not one over an index range of a bigger array (measured: 6x slower).

@njit(cache=True)
def _count_block(bits, lo_pos, lo_neg):
    """Non-zero, negative, and below-the-bracket counts per sign of a block of at most 65535 weights.
    Vectorizes: no stores, no branches, and the four counts travel as 16-bit fields of two words
    (lo >= 1, so "0 < |w| < lo" is one unsigned comparison after a shift)."""
    one, first_neg = np.uint32(1), np.uint32(0x80000001)
    lo_pos1, lo_neg1 = np.uint32(lo_pos - one), np.uint32(lo_neg - one)
    signs = bracket = np.uint32(0)
    for i in range(bits.size):
        u = bits[i]
        signs += np.uint32((u & ABS_MASK) != 0) | (np.uint32(u > SIGN_BIT) << np.uint32(16))
        below_neg = np.uint32(np.uint32(u - first_neg) < lo_neg1)
        bracket += np.uint32(np.uint32(u - one) < lo_pos1) | (below_neg << np.uint32(16))
    low = np.uint32(0xFFFF)
    return int(signs & low), int(signs >> np.uint32(16)), int(bracket & low), int(bracket >> np.uint32(16))


@njit(cache=True)
def _extrema_block(bits):
    """Largest positive and largest overall bit patterns: the largest weight, the most negative one, and
    (>= the infinity pattern) NaN or Inf. Separate from the counts: together they do not vectorize."""
    top_pos = top_all = np.uint32(0)
    for i in range(bits.size):
        u = bits[i]
        top_pos = max(top_pos, u if u < SIGN_BIT else np.uint32(0))
        top_all = max(top_all, u)
    return top_pos, top_all


@njit(cache=True)
def _gather_block(bits, lo_pos, hi_pos, lo_neg, hi_neg, lo_any, span, offset, cand_bits, cand_idx, n):
    """Append the weights whose magnitude is inside the bracket of their sign (bit pattern, blob index)
    at position n; return the new n (past the capacity it only counts). Groups of 64 are first tested
    (vectorized) against the union of both brackets: few groups hit; a hit group is copied without
    branches (every weight is written, the position moves on for those inside)."""
    cap = cand_bits.size - GATHER_BLOCK  # room for one whole group past cap
    groups = bits.size // GATHER_BLOCK
    for g in range(groups + 1):
        start = g * GATHER_BLOCK
        stop = min(start + GATHER_BLOCK, bits.size)
        hits = np.uint32(0)
        if g < groups:  # a fixed trip count: this test vectorizes (the general loop does not, 4x slower)
            for j in range(GATHER_BLOCK):
                hits |= np.uint32(np.uint32((bits[start + j] & ABS_MASK) - lo_any) <= span)  # wraps below lo_any
        else:
            for i in range(start, stop):
                hits |= np.uint32(np.uint32((bits[i] & ABS_MASK) - lo_any) <= span)
        if hits == 0:
            continue
        if n > cap:
            n += 1  # full: the scan only reports an overflow
            continue
        for i in range(start, stop):
            u = bits[i]
            a = u & ABS_MASK
            neg = u >= SIGN_BIT
            lo_s = lo_neg if neg else lo_pos
            hi_s = hi_neg if neg else hi_pos
            cand_bits[n], cand_idx[n] = u, offset + i
            n += (a != 0) & (a >= lo_s) & (a <= hi_s)
    return n


@njit(cache=True)
def _scan_chunk(bits, lo, hi, lo_any, span, offset, cand_bits, cand_idx, stats):
    """stats = [nonzero, negative, below+, below-, top+ bits, top bits, candidates] of one chunk."""
    nonzero = negative = below_pos = below_neg = candidates = 0
    top_pos = top_all = np.uint32(0)
    for start in range(0, bits.size, SCAN_BLOCK):
        block = bits[start:start + SCAN_BLOCK]
        block_pos, block_all = _extrema_block(block)  # first: the lightest loop streams best from memory
        top_pos, top_all = max(top_pos, block_pos), max(top_all, block_all)
        counts = _count_block(block, lo[0], lo[1])
        nonzero += counts[0]
        negative += counts[1]
        below_pos += counts[2]
        below_neg += counts[3]
        candidates = _gather_block(block, lo[0], hi[0], lo[1], hi[1], lo_any, span, offset + start,
                                   cand_bits, cand_idx, candidates)
    stats[0], stats[1], stats[2], stats[3] = nonzero, negative, below_pos, below_neg
    stats[4], stats[5], stats[6] = top_pos, top_all, candidates


@njit(parallel=True, cache=True)
def _scan(bits, bounds, lo, hi, lo_any, span, cand_bits, cand_idx, stats):
    if bounds.size == 2:  # one chunk: no thread launch (it costs more than small work)
        _scan_chunk(bits, lo, hi, lo_any, span, 0, cand_bits[0], cand_idx[0], stats[0])
        return
    for c in prange(bounds.size - 1):
        b0, b1 = bounds[c], bounds[c + 1]
        _scan_chunk(bits[b0:b1], lo, hi, lo_any, span, b0, cand_bits[c], cand_idx[c], stats[c])


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
def _interval(v, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg):
    """The reference's interval formula: first + clamp(floor((w - left) * inv), 0, last) on w's side
    (the side's numbers are selected, not branched to: signs are random)."""
    neg = v < 0
    left = left_neg if neg else left_pos
    inv = inv_neg if neg else inv_pos
    last = np.float64(last_neg if neg else last_pos)
    f = min(max(np.floor((v - left) * inv), 0.0), last)
    return (0 if neg else first_pos) + np.int64(f)


@njit(cache=True)
def _add_member(u, code, lane, sums, counts):
    """Add the weight of bit pattern u to interval `code`'s exact sum: its 24-bit signed mantissa in
    the row of its exponent (partition.mantissa_parts)."""
    biased = (u >> 23) & 0xFF
    mantissa = np.int64((u & 0x7FFFFF) | (0x800000 if biased else 0))
    sums[lane, code, max(biased, 1)] += -mantissa if u >= SIGN_BIT else mantissa
    counts[lane, code] += 1


@njit(cache=True)
def _keep_block(w, t_pos, t_neg, codes):
    """codes = 1 for the weights beyond the clips, 0 for the rest (vectorizes: it streams the block into
    cache for the loops that follow)."""
    for i in range(w.size):
        x = w[i]
        codes[i] = (x > t_pos) | (x < t_neg)


@njit(cache=True)
def _code_kept(w, bits, codes, i, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg, lane,
               sums, counts):
    """The kept weight i gets its code, and joins its level's sum."""
    code = 1 + _interval(np.float64(w[i]), left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg)
    codes[i] = code
    _add_member(bits[i], code, lane, sums, counts)


@njit(cache=True)
def _kept_positions(marks, positions):
    """Write the positions of the non-zero marks (0/1 bytes) into `positions` (room for 8 more); return
    how many. No branch: 8 marks at a time become one byte (a multiply gathers their low bits), whose set
    bits' positions come from a table."""
    words = marks[:marks.size // 8 * 8].view(np.uint64)
    n = 0
    for j in range(words.size):
        byte = (words[j] * GATHER_MAGIC) >> np.uint64(56)
        for t in range(8):
            positions[n + t] = 8 * j + SET_BITS[byte, t]
        n += SET_BIT_COUNT[byte]
    for i in range(words.size * 8, marks.size):
        positions[n] = i
        n += marks[i]
    return n


@njit(cache=True)
def _code_chunk(w, bits, t_pos, t_neg, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg,
                codes, sums, counts):
    """code = interval + 1 for weights beyond the clips, 0 for the rest (ties at a clip are fixed up
    afterwards); sums/counts[lane, code] accumulate the levels, lanes breaking the chains of adds into
    one bin. Block by block: a vectorized loop marks the kept weights (streaming the block into cache),
    their positions are listed without branches, and only they are coded (no mispredicted branch on
    a random keep/prune decision)."""
    positions = np.empty(SCAN_BLOCK + 8, np.int64)
    for start in range(0, w.size, SCAN_BLOCK):
        stop = min(start + SCAN_BLOCK, w.size)
        block_w, block_bits, block_codes = w[start:stop], bits[start:stop], codes[start:stop]
        _keep_block(block_w, t_pos, t_neg, block_codes)
        for t in range(_kept_positions(block_codes, positions)):
            _code_kept(block_w, block_bits, block_codes, positions[t], left_pos, inv_pos, first_pos, last_pos,
                       left_neg, inv_neg, last_neg, t & (LANES - 1), sums, counts)


@njit(parallel=True, cache=True)
def _code_pass(w, bits, bounds, t_pos, t_neg, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg,
               last_neg, codes, sums, counts):
    if bounds.size == 2:  # one chunk: no thread launch (it costs more than small work)
        _code_chunk(w, bits, t_pos, t_neg, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg,
                    codes, sums[0], counts[0])
        return
    for c in prange(bounds.size - 1):
        b0, b1 = bounds[c], bounds[c + 1]
        _code_chunk(w[b0:b1], bits[b0:b1], t_pos, t_neg, left_pos, inv_pos, first_pos, last_pos, left_neg,
                    inv_neg, last_neg, codes[b0:b1], sums[c], counts[c])


@njit(cache=True)
def _keep_ties(w, bits, index, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg,
               codes, sums, counts):
    """Give the kept weights that equal a clip (ties after the last pruned one) their codes."""
    for i in index:
        _code_kept(w, bits, codes, i, left_pos, inv_pos, first_pos, last_pos, left_neg, inv_neg, last_neg, 0,
                   sums, counts)


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


def _side_args(part) -> tuple:
    """The partition as the scalars of `_code_pass`: left, 1/width, first and last interval per side."""
    if part.spanning:  # one interval for everything: index 0 whatever the value
        return 0.0, 0.0, 0, 0, 0.0, 0.0, 0
    inv_pos = 1.0 / part.pos_width if part.pos_width else 0.0
    inv_neg = 1.0 / part.neg_width if part.neg_width else 0.0
    return (part.pos_left, inv_pos, part.n_neg, max(part.n_pos - 1, 0),
            part.neg_left, inv_neg, max(part.n_neg - 1, 0))


def _bracket_sampled(u: np.ndarray, p: float, chunks: int) -> tuple[np.ndarray, np.ndarray, int]:
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
    return lo, hi, int(expected * u.size / chunks * 2) + 1024


def _bracket_near(clips: tuple[float, float], size: int, chunks: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per sign, the previous clip's magnitude bits +- NEAR_ULPS (empty where it pruned nothing), and a
    candidate capacity per chunk (3 %: fine-tuning keeps the bracket's share far below that)."""
    clip_bits = np.abs(np.array([clips[1], clips[0]], np.float32)).view(np.uint32).astype(np.int64)
    lo = np.where(clip_bits > 0, np.maximum(clip_bits - NEAR_ULPS, 1), 1).astype(np.uint32)
    hi = np.where(clip_bits > 0, np.minimum(clip_bits + NEAR_ULPS, INF_BITS - 1), 0).astype(np.uint32)
    return lo, hi, size // chunks // 32 + 1024


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


@dataclass
class _Scan:
    """Pass 1's totals: weights per sign, below each bracket, the extrema, and the candidates."""

    count: list[int]         # non-zero weights per sign
    below: list[int]         # per sign, magnitudes below the bracket
    top_pos: np.uint32       # largest positive bit pattern
    top_all: np.uint32       # largest bit pattern (a negative one, or NaN/Inf)
    candidates: tuple[np.ndarray, np.ndarray] | None  # (bits, blob index) in blob order; None: overflowed


def _scan_all(u: np.ndarray, bounds: np.ndarray, lo: np.ndarray, hi: np.ndarray, cap: int) -> _Scan:
    chunks = bounds.size - 1
    cand_bits = np.empty((chunks, cap + GATHER_BLOCK), np.uint32)
    cand_idx = np.empty((chunks, cap + GATHER_BLOCK), np.int64)
    stats = np.zeros((chunks, 7), np.int64)
    lo_any = np.uint32(lo.min())
    span = np.uint32(max(int(hi.max()) - int(lo_any), 0))  # both brackets inside [lo_any, lo_any + span]
    _scan(u, bounds, lo, hi, lo_any, span, cand_bits, cand_idx, stats)
    top_pos, top_all = np.uint32(stats[:, 4].max()), np.uint32(stats[:, 5].max())
    if top_pos >= INF_BITS or top_all >= (SIGN_BIT | INF_BITS):
        raise ValueError("weights contain NaN or Inf")
    total = stats.sum(axis=0)
    candidates = None
    if stats[:, 6].max() <= cap:
        candidates = (np.concatenate([cand_bits[c, :n] for c, n in enumerate(stats[:, 6])]),
                      np.concatenate([cand_idx[c, :n] for c, n in enumerate(stats[:, 6])]))
    return _Scan([int(total[0] - total[1]), int(total[1])], [int(total[2]), int(total[3])], top_pos, top_all,
                 candidates)


def _select_in_bracket(scan: _Scan, k: list[int]) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """Per sign, the k-th smallest magnitude's bits and the kept ties, if the bracket holds both."""
    if scan.candidates is None:
        return None
    values, index = scan.candidates
    found = []
    for s in (POS, NEG):
        side = (values >= SIGN_BIT) if s == NEG else (values < SIGN_BIT)
        found.append(_select_from_candidates(k[s], scan.below[s], values[side] & ABS_MASK, index[side])
                     if k[s] else (0, np.zeros(0, np.int64)))
    if None in found:
        return None
    return np.array([found[POS][0], found[NEG][0]], np.uint32), [found[POS][1], found[NEG][1]]


def clip_quantize(w: np.ndarray, p: float, bits: int, out: np.ndarray | None = None,
                  previous: Quantized | None = None, use_sample: bool = True) -> Quantized:
    """Kernel version of `prune_quant.clip_quantize_reference` for a contiguous float32 array.

    `previous`, this call's result for the same layer a step earlier, brackets the selection with its
    clips and lends its codes buffer (overwritten). `use_sample=False` without `previous` forces the
    exact radix fallback (for tests)."""
    flat = w.reshape(-1)
    u = flat.view(np.uint32)
    bounds = chunk_bounds(flat.size)
    chunks = bounds.size - 1
    levels = 2 ** bits - 1

    reuse = previous is not None and previous.codes.size == flat.size
    codes = previous.codes.reshape(-1) if reuse else np.empty(flat.size, np.uint8)

    def brackets():  # the cheapest first; each one only if the one before missed
        if reuse:
            yield _bracket_near(previous.clips, flat.size, chunks)
        if use_sample:
            yield _bracket_sampled(u, p, chunks)
        elif not reuse:
            yield np.ones(2, np.uint32), np.zeros(2, np.uint32), 0  # empty: counts and extrema only

    for lo, hi, cap in brackets():
        scan = _scan_all(u, bounds, lo, hi, cap)
        k = [pruned_count(p, scan.count[s]) for s in (POS, NEG)]
        selection = _select_in_bracket(scan, k)
        if selection is not None:
            break
    threshold, kept_ties = selection if selection is not None else _select_radix(u, bounds, k)

    magnitude = np.array([scan.top_pos, scan.top_all & ABS_MASK if scan.top_all > SIGN_BIT else 0], np.uint32)
    max_abs = magnitude.view(np.float32).astype(np.float64)
    clip_abs = threshold.view(np.float32)
    count = scan.count
    part = make_partition(levels, -float(max_abs[NEG]), float(max_abs[POS]), -float(clip_abs[NEG]),
                          float(clip_abs[POS]), count[NEG] > k[NEG], count[POS] > k[POS])

    sums = np.zeros((chunks, LANES, levels + 1, EXPONENTS), np.int64)  # row 0 (pruned) stays empty
    counts = np.zeros((chunks, LANES, levels + 1), np.int64)
    side = _side_args(part)
    _code_pass(flat, u, bounds, clip_abs[POS], -clip_abs[NEG], *side, codes, sums, counts)
    ties = np.concatenate(kept_ties).astype(np.int64)
    if ties.size:
        _keep_ties(flat, u, ties, *side, codes, sums[0], counts[0])
    codebook = level_means(sums.sum(axis=(0, 1))[1:], counts.sum(axis=(0, 1))[1:], part, levels)
    lut = np.concatenate([[0], codebook]).astype(np.float32)
    result = np.empty(w.shape, np.float32) if out is None else out
    _output_pass(codes, lut, bounds, result.reshape(-1))
    return Quantized(result, codes.reshape(w.shape), codebook, part)
