"""The partition maths of the CLIP-Q operator, shared by the numpy reference (`prune_quant`) and the
numba kernel (`kernel`) so that neither imports the other: pruned counts, the linear intervals of the
non-clipped axis, and the exact level means (integer mantissa sums per exponent). The rules are stated in
`prune_quant`'s docstring. Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_BITS = 8


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


