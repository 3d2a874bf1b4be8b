"""The CLIP-Q pruning-quantization operator (Tung & Mori, CVPR 2018, section 3.1, Fig. 2).

`clip_quantize(w, p, bits)` maps full-precision weights to pruned-and-quantized ones in three steps:

1. **Clipping.** Among the positive weights, the `k+ = round(p * n+)` smallest are pruned; among the
   negative weights, the `k- = round(p * n-)` closest to zero are pruned. The clips are the largest
   pruned positive `c+` and the most negative pruned weight `c-` (0 when a side prunes nothing).
2. **Partitioning.** The non-clipped part of the axis, `[min, c-]` and `[c+, max]`, is split into
   `K = 2**bits - 1` intervals, linearly (uniformly) on each side.
3. **Quantizing.** Each interval's level is the mean of the full-precision weights that fall into it;
   every kept weight takes its interval's level, every pruned weight becomes 0.

Choices the paper leaves open, made here (and tested in tests/test_prune_quant.py):

- *Rounding of p * count*: half up, `k = floor(p * n + 0.5)`, per sign; so the pruned count is exact
  whatever the values.
- *Ties*: weights are ranked by magnitude within their sign, equal magnitudes by position in Caffe's
  blob order (the earlier one is pruned first); ties never change the pruned count.
- *Exact zeros* have no sign: they are neither counted in `n+`/`n-` nor kept; they stay 0.
- *Intervals per side*: the two sides share the `K` intervals in proportion to their lengths
  `L- = c- - min` and `L+ = max - c+` (so intervals have about the same width on both sides, and none
  mixes negative and positive weights), rounding half up, with at least one interval for each side that
  keeps weights. A side that keeps no weights gets no interval. With `bits = 1` (`K = 1`) and both signs
  kept, the single interval is the whole non-clipped part, as the paper's rule literally says: its level
  is the mean of all kept weights.
- *Interval index*: `floor((w - left) / width)`, clamped to the side's intervals (so `max` falls into
  the last one); a side of zero length puts all its weights into its first interval.
- *Empty intervals* have no members; their codebook entry is the interval's centre and no code uses it.
- *p = 0* prunes nothing but exact zeros; *all-positive (or all-negative) layers* give all `K` intervals
  to the one side.
- *Idempotence*: for a fixed partition the operator is a projection (re-quantizing its output with the
  same clips and intervals returns it unchanged). Recomputing the partition from the output is not the
  identity in general: `min`/`max` of the output are interval means, so the re-partition's edges move.

The result's codes are `0` for pruned weights and `j` in `1..K` for `codebook[j - 1]`, so a kept weight
needs `bits` bits, as in the paper's sparse encoding. `clip_quantize` runs a multi-threaded O(n) numba
kernel (exact selection on the float bits; no sort, see `_kernels`) for large layers and the plain-numpy
`clip_quantize_reference` for small ones; the tests check that both give identical results, bit for bit:
level sums are exact (integer mantissa sums per exponent), so the order of the additions does not matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_BITS = 8
SMALL_LAYER = 1 << 11  # below this many weights the numpy reference is as fast as the kernel (measured)


@dataclass(frozen=True)
class Quantized:
    """One layer's pruned-and-quantized weights."""

    weights: np.ndarray   # float32, same shape as the input; values in {0} and the codebook
    codes: np.ndarray     # uint8, same shape: 0 = pruned, j = codebook[j - 1]
    codebook: np.ndarray  # float32 (2**bits - 1,), ascending; an unused entry is its interval's centre
    partition: Partition  # clips and intervals this result was quantized with

    @property
    def mask(self) -> np.ndarray:
        """True where the weight is kept."""
        return self.codes != 0

    @property
    def clips(self) -> tuple[float, float]:
        """(c-, c+): the most negative and the largest pruned weight (0 where a side prunes nothing)."""
        return self.partition.c_neg, self.partition.c_pos


def check_args(p: float, bits: int) -> None:
    """Raise ValueError unless 0 <= p < 1 and bits in 1..8."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"pruning rate p must be in [0, 1), got {p}")
    if int(bits) != bits or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits}")


def pruned_count(p: float, n: int) -> int:
    """How many of `n` same-signed weights a pruning rate `p` removes: round half up."""
    return int(np.floor(p * n + 0.5))


def split_intervals(levels: int, len_neg: float, len_pos: float, keep_neg: bool, keep_pos: bool) -> int:
    """Number of the `levels` intervals that go to the negative side (the rest go to the positive side)."""
    if not keep_neg:
        return 0
    if not keep_pos:
        return levels
    if levels == 1:
        return 0  # single interval spanning both sides: handled by the caller
    total = len_neg + len_pos
    share = levels // 2 if total == 0 else int(np.floor(levels * len_neg / total + 0.5))
    return min(max(share, 1), levels - 1)


@dataclass(frozen=True)
class Partition:
    """Clips and the linear intervals of the non-clipped axis (float64)."""

    c_neg: float
    c_pos: float
    n_neg: int         # intervals on the negative side, [w_min, c-]
    n_pos: int         # intervals on the positive side, [c+, w_max]
    neg_left: float
    neg_width: float
    pos_left: float
    pos_width: float
    spanning: bool     # bits = 1 with both signs kept: one interval holds every kept weight

    def index(self, w: np.ndarray) -> np.ndarray:
        """0-based interval of each (kept, non-zero) weight."""
        w = np.asarray(w, dtype=np.float64)
        if self.spanning:
            return np.zeros(w.shape, np.int64)
        neg = _side_index(w, self.neg_left, self.neg_width, self.n_neg)
        pos = self.n_neg + _side_index(w, self.pos_left, self.pos_width, self.n_pos)
        return np.where(w < 0, neg, pos)

    def centres(self) -> np.ndarray:
        """Centre of each interval (the codebook entry of an empty interval)."""
        if self.spanning:
            return np.array([(self.neg_left + self.pos_left + self.pos_width) / 2])
        neg = self.neg_left + (np.arange(self.n_neg) + 0.5) * self.neg_width
        pos = self.pos_left + (np.arange(self.n_pos) + 0.5) * self.pos_width
        return np.concatenate([neg, pos])


def _side_index(w: np.ndarray, left: float, width: float, n: int) -> np.ndarray:
    if n == 0 or width == 0:
        return np.zeros(w.shape, np.int64)
    return np.clip(np.floor((w - left) * (1.0 / width)), 0, n - 1).astype(np.int64)


def make_partition(levels: int, w_min: float, w_max: float, c_neg: float, c_pos: float,
                   keep_neg: bool, keep_pos: bool) -> Partition:
    """The linear partition of [w_min, c-] and [c+, w_max] into `levels` intervals (module docstring)."""
    len_neg = c_neg - w_min if keep_neg else 0.0
    len_pos = w_max - c_pos if keep_pos else 0.0
    n_neg = split_intervals(levels, len_neg, len_pos, keep_neg, keep_pos)
    spanning = levels == 1 and keep_neg and keep_pos
    n_pos = levels - n_neg if (keep_pos and not spanning) else 0
    if not keep_neg and not keep_pos:
        n_neg = n_pos = 0
    return Partition(c_neg, c_pos, n_neg, n_pos,
                     neg_left=w_min, neg_width=len_neg / n_neg if n_neg else 0.0,
                     pos_left=c_pos, pos_width=len_pos / n_pos if n_pos else 0.0, spanning=spanning)


def _prune_side(values: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    """Keep-mask over one sign's weights (given in blob order) and the clip: the k smallest |w| go."""
    k = pruned_count(p, values.size)
    order = np.argsort(np.abs(values), kind="stable")  # stable: equal magnitudes in blob order
    keep = np.ones(values.size, bool)
    keep[order[:k]] = False
    clip = float(values[order[k - 1]]) if k else 0.0
    return keep, clip


EXPONENTS = 256  # float32 biased exponents: an exact level sum keeps one integer per (level, exponent)


def mantissa_parts(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 weights as exact integer parts: w == mantissa * 2**(exponent - 150), mantissa a signed
    24-bit integer, exponent in 1..255 (subnormals have exponent 1)."""
    u = np.ascontiguousarray(w, np.float32).view(np.uint32)
    biased = (u >> 23) & 0xFF
    mantissa = (u & 0x7FFFFF).astype(np.int64) | np.where(biased > 0, 0x800000, 0)
    return np.where(u >> 31, -mantissa, mantissa), np.maximum(biased, 1).astype(np.int64)


def level_means(mantissa_sums: np.ndarray, counts: np.ndarray, part: Partition, levels: int) -> np.ndarray:
    """Codebook: each interval's mean, the centre for an empty interval.

    `mantissa_sums[j, e]` is the exact integer sum of the mantissas of interval j's members of exponent e
    (`mantissa_parts`), so the sum is exact whatever the order of the additions, and the mean (Python's
    correctly rounded int / int) is the same float64 for the reference and for the parallel kernel."""
    codebook = np.zeros(levels, np.float64)
    centres = part.centres()
    codebook[:centres.size] = centres
    exponents = np.flatnonzero(mantissa_sums[:levels].any(axis=0))
    low = int(exponents[0]) if exponents.size else 0
    shifts = (exponents - low).tolist()
    for j in np.flatnonzero(counts[:levels] > 0):
        total = sum(m << shift for m, shift in zip(mantissa_sums[j, exponents].tolist(), shifts))
        codebook[j] = math.ldexp(total / int(counts[j]), low - 150)  # 0.0 if the members cancel exactly
    return codebook.astype(np.float32)


def quantize_with(w: np.ndarray, keep: np.ndarray, part: Partition, levels: int) -> Quantized:
    """Quantize the kept weights into `part`'s intervals; levels are the members' means."""
    flat = np.asarray(w, dtype=np.float32).ravel()
    idx = part.index(flat[keep])
    counts = np.bincount(idx, minlength=levels)[:levels]
    mantissa, exponent = mantissa_parts(flat[keep])
    # float64 bincount of 24-bit integers is exact below 2**29 members per bin
    sums = np.bincount(idx * EXPONENTS + exponent, weights=mantissa.astype(np.float64),
                       minlength=levels * EXPONENTS)[:levels * EXPONENTS]
    codebook = level_means(sums.astype(np.int64).reshape(levels, EXPONENTS), counts, part, levels)
    codes = np.zeros(flat.size, np.uint8)
    codes[keep] = idx + 1
    weights = np.zeros(flat.size, np.float32)
    weights[keep] = codebook[idx]
    shape = np.shape(w)
    return Quantized(weights.reshape(shape), codes.reshape(shape), codebook, part)


def clip_quantize_reference(w: np.ndarray, p: float, bits: int) -> Quantized:
    """Plain-numpy CLIP-Q pruning-quantization (sorts; O(n log n)). The specification of the kernel."""
    check_args(p, bits)
    flat = np.asarray(w, dtype=np.float32).ravel()
    if not np.all(np.isfinite(flat)):
        raise ValueError("weights contain NaN or Inf")
    levels = 2 ** bits - 1
    keep = np.zeros(flat.size, bool)
    neg, pos = flat < 0, flat > 0
    keep_neg, c_neg = _prune_side(flat[neg], p)
    keep_pos, c_pos = _prune_side(flat[pos], p)
    keep[neg], keep[pos] = keep_neg, keep_pos
    part = make_partition(levels, float(flat.min(initial=0.0)), float(flat.max(initial=0.0)), c_neg, c_pos,
                          bool(keep_neg.any()), bool(keep_pos.any()))
    return quantize_with(w, keep, part, levels)


def clip_quantize(w: np.ndarray, p: float, bits: int, out: np.ndarray | None = None,
                  previous: Quantized | None = None) -> Quantized:
    """CLIP-Q pruning-quantization of one layer's weights (any shape; float32 result of the same shape).

    `out`, a float32 array of w's size (e.g. a Caffe blob's data), receives the quantized weights.
    `previous`, the result of the last call for the same layer (e.g. a training step earlier), makes a
    large layer's selection faster (its clips bracket the new ones) and lends its codes buffer: the
    previous result's codes are overwritten. The result does not depend on it.
    """
    w = np.asarray(w)
    if out is not None and (out.dtype != np.float32 or out.size != w.size or not out.flags.c_contiguous):
        raise ValueError(f"out must be a contiguous float32 array of {w.size} elements")
    if w.size < SMALL_LAYER:
        result = clip_quantize_reference(w, p, bits)
        if out is None:
            return result
        out.reshape(-1)[...] = result.weights.reshape(-1)
        return Quantized(out, result.codes, result.codebook, result.partition)
    from clipq import _kernels

    check_args(p, bits)
    return _kernels.clip_quantize(np.ascontiguousarray(w, dtype=np.float32), p, bits, out, previous)


def quantize_kept(w: np.ndarray, keep: np.ndarray, bits: int) -> Quantized:
    """CLIP-Q's linear partition and interval means applied to the weights a fixed mask keeps: the
    intervals span [min, largest kept negative] and [smallest kept positive, max] (the sequential
    ablation's quantization, after pruning)."""
    check_args(0.0, bits)
    flat = np.asarray(w, np.float32).ravel()
    keep = np.asarray(keep, bool).ravel() & (flat != 0)
    neg, pos = flat[keep & (flat < 0)], flat[keep & (flat > 0)]
    part = make_partition(2 ** bits - 1, float(neg.min(initial=0.0)), float(pos.max(initial=0.0)),
                          float(neg.max(initial=0.0)), float(pos.min(initial=0.0)), bool(neg.size), bool(pos.size))
    return quantize_with(np.asarray(w, np.float32), keep, part, 2 ** bits - 1)
