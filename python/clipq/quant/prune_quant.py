"""The CLIP-Q pruning-quantization operator (Tung & Mori, CVPR 2018, section 3.1, Fig. 2).

`clip_quantize(w, p, bits)` maps full-precision weights to pruned-and-quantized ones in three steps:

1. **Clipping.** Among the positive weights, the `k+ = round(p * n+)` smallest are pruned; among the
   negative weights, the `k- = round(p * n-)` closest to zero are pruned. The clips are the largest
   pruned positive `c+` and the most negative pruned weight `c-` (0 when a side prunes nothing).
2. **Partitioning.** The non-clipped part of the axis, `[min, c-]` and `[c+, max]`, is split into
   `K = 2**bits - 1` intervals, linearly (uniformly) on each side.
3. **Quantizing.** Each interval's level is the mean of the full-precision weights that fall into it;
   every kept weight takes its interval's level, every pruned weight becomes 0.

Choices the paper leaves open, made here (and tested in tests/quant/test_prune_quant.py):

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
kernel (exact selection on the float bits; no sort, see `kernel`) for large layers and the plain-numpy
`clip_quantize_reference` for small ones; the tests check that both give identical results, bit for bit:
level sums are exact (integer mantissa sums per exponent), so the order of the additions does not matter.
"""

from __future__ import annotations

import numpy as np

from clipq.quant.partition import (
    EXPONENTS,
    Partition,
    Quantized,
    check_args,
    level_means,
    make_partition,
    mantissa_parts,
    pruned_count,
)

SMALL_LAYER = 1 << 11  # below this many weights the numpy reference is as fast as the kernel (measured)


def _prune_side(values: np.ndarray, p: float) -> tuple[np.ndarray, float]:
    """Keep-mask over one sign's weights (given in blob order) and the clip: the k smallest |w| go."""
    k = pruned_count(p, values.size)
    order = np.argsort(np.abs(values), kind="stable")  # stable: equal magnitudes in blob order
    keep = np.ones(values.size, bool)
    keep[order[:k]] = False
    clip = float(values[order[k - 1]]) if k else 0.0
    return keep, clip


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
    from clipq.quant import kernel  # lazy: numba's import (0.4 s) stays out of `clipq --help`

    check_args(p, bits)
    return kernel.clip_quantize(np.ascontiguousarray(w, dtype=np.float32), p, bits, out, previous)


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
