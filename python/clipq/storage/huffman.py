"""Canonical Huffman coding of small-alphabet integer streams (the index and code streams of a layer).

Deep Compression applies Huffman coding after pruning and quantization (the bracketed sizes of the
CLIP-Q paper's Table 4); `clipq encode --huffman` does the same. The table is stored as one code length
per symbol; codes are canonical (assigned in order of length, then symbol), so the lengths suffice.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_CODE_LENGTH = 30


def code_lengths(values: np.ndarray, alphabet: int) -> np.ndarray:
    """Huffman code length of each symbol 0..alphabet-1 (0 for symbols that do not occur)."""
    freq = np.bincount(values, minlength=alphabet)[:alphabet]
    used = np.flatnonzero(freq)
    lengths = np.zeros(alphabet, np.int64)
    if used.size == 1:
        lengths[used] = 1
        return lengths
    heap = [(int(freq[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tiebreak = len(heap)
    while len(heap) > 1:
        f1, _, s1 = heapq.heappop(heap)
        f2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (f1 + f2, tiebreak, s1 + s2))
        tiebreak += 1
    if lengths.max() > MAX_CODE_LENGTH:
        raise ValueError(f"Huffman code longer than {MAX_CODE_LENGTH} bits")
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol (as an integer of its length's width)."""
    codes = np.zeros(lengths.size, np.int64)
    code, prev_len = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - prev_len
        codes[symbol] = code
        code += 1
        prev_len = int(lengths[symbol])
    return codes


def encode(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """The concatenated codes of `values` (MSB first), padded to a byte."""
    if values.size == 0:
        return b""
    codes = canonical_codes(lengths)
    width = int(lengths.max())
    value_lengths, value_codes = lengths[values], codes[values]
    # Each value's code right-aligned in `width` bits; keep only its last `length` bits.
    shifts = np.arange(width - 1, -1, -1)
    bits = ((value_codes[:, None] >> shifts) & 1).astype(np.uint8)
    keep = shifts[None, :] < value_lengths[:, None]
    return np.packbits(bits[keep]).tobytes()


def decode(data: bytes, count: int, lengths: np.ndarray) -> np.ndarray:
    """Inverse of `encode`: `count` symbols. ValueError if the data is too short or not decodable."""
    if count == 0:
        return np.zeros(0, np.int64)
    lengths = np.asarray(lengths, np.int64)
    max_len = int(lengths.max())
    symbols = np.array(sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)), np.int64)
    per_length = np.bincount(lengths[lengths > 0], minlength=max_len + 2)
    first_index = np.concatenate([[0], np.cumsum(per_length)]).astype(np.int64)  # into `symbols`
    first_code = np.zeros(max_len + 2, np.int64)
    code = 0
    for length in range(1, max_len + 1):
        code = (code + per_length[length - 1]) << 1 if length > 1 else 0
        first_code[length] = code
    from clipq.storage import kernels  # lazy: numba's import (0.4 s) stays out of `clipq --help`

    out, used = kernels.huffman_decode(np.frombuffer(data, np.uint8), count, first_code, first_index, symbols,
                                       max_len)
    if used < 0:
        raise ValueError("Huffman stream is truncated or corrupt")
    return out
