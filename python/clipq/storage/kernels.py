"""numba kernels of the `.clipq` codec: bit packing, the sparse index/code streams, Huffman decoding, and the
codes of an already-quantized layer. Each is the loop its numpy equivalent would hide in temporaries (measured: the
two-pass stream construction and the 64-bit packing accumulator make `clipq encode` of AlexNet 0.6 -> 0.4 s).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from clipq.util.parallel import chunk_bounds


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
    bounds = chunk_bounds(flat.size)
    codes = np.empty(flat.size, np.uint8)
    ok = np.zeros(bounds.size - 1, np.bool_)
    _codes_for_levels(flat, np.ascontiguousarray(levels, np.float32), bounds, codes, ok)
    return codes.reshape(w.shape) if ok.all() else None


@njit(cache=True)
def pack_bits(values, width):
    """Unsigned `width`-bit integers (width <= 32) packed MSB first, padded to a byte (uint8 array).
    Bits gather in a 64-bit accumulator and leave it a byte at a time."""
    out = np.zeros((values.size * width + 7) // 8, np.uint8)
    mask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
    acc = np.uint64(0)
    held = 0
    pos = 0
    for i in range(values.size):
        acc = (acc << np.uint64(width)) | (np.uint64(values[i]) & mask)
        held += width
        while held >= 8:
            held -= 8
            out[pos] = np.uint8((acc >> np.uint64(held)) & np.uint64(0xFF))
            pos += 1
    if held:
        out[pos] = np.uint8((acc << np.uint64(8 - held)) & np.uint64(0xFF))
    return out


@njit(cache=True)
def _add_fillers(gap, fillers):
    """fillers[k] += gap >> k for k in 1..: the extra entries a gap needs at index width k."""
    for k in range(1, fillers.size):
        shifted = gap >> k
        if shifted == 0:
            break
        fillers[k] += shifted


@njit(cache=True)
def gap_stats(codes, max_bits):
    """(non-zero codes, fillers) of a flat code array in one pass: fillers[k] = sum(gap >> k) over the gaps
    of zeros before each non-zero code, the extra entries an index width k needs."""
    fillers = np.zeros(max_bits + 1, np.int64)
    last = -1
    count = 0
    for i in range(codes.size):
        if codes[i]:
            _add_fillers(i - last - 1, fillers)
            last = i
            count += 1
    return count, fillers


@njit(cache=True)
def sparse_entries(codes, k, entries):
    """The index and code streams of a flat code array with index width k (`entries` long): a gap of g
    zeros before a stored code is g >> k filler entries (index 2^k - 1, code 0), then g mod 2^k."""
    filler = (1 << k) - 1
    index = np.full(entries, filler, np.int64)
    code_entries = np.zeros(entries, np.int64)
    last = -1
    n = 0
    for i in range(codes.size):
        if codes[i]:
            gap = i - last - 1
            n += gap >> k  # the fillers are already in place
            index[n] = gap & filler
            code_entries[n] = codes[i]
            n += 1
            last = i
    return index, code_entries


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


@njit(cache=True)
def huffman_decode(data, count, first_code, first_index, symbols, max_len):
    """`count` symbols of a canonical Huffman stream (`huffman.decode` builds the tables); (symbols, bits
    read), or bits read -1 if the stream is truncated or corrupt."""
    out = np.empty(count, np.int64)
    bit = 0
    total_bits = data.size * 8
    for i in range(count):
        code = 0
        for length in range(1, max_len + 1):
            if bit >= total_bits:
                return out, -1
            code = (code << 1) | ((data[bit >> 3] >> (7 - (bit & 7))) & 1)
            bit += 1
            offset = code - first_code[length]
            if 0 <= offset < first_index[length + 1] - first_index[length]:
                out[i] = symbols[first_index[length] + offset]
                break
        else:
            return out, -1
    return out, bit
