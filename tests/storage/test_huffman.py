"""Canonical Huffman coding of the index and code streams."""

from __future__ import annotations

import numpy as np
import pytest

from clipq.storage import huffman


@pytest.mark.parametrize("alphabet", [2, 8, 256])
def test_round_trip_and_fewer_bits_than_fixed_width_on_skewed_data(alphabet):
    values = np.minimum(np.random.default_rng(0).geometric(0.4, 50_000) - 1, alphabet - 1)
    lengths = huffman.code_lengths(values, alphabet)
    data = huffman.encode(values, lengths)
    assert np.array_equal(huffman.decode(data, values.size, lengths), values)
    if alphabet > 2:
        assert len(data) * 8 < values.size * np.log2(alphabet)


def test_codes_are_prefix_free_and_canonical():
    lengths = np.array([2, 2, 3, 3, 3, 0, 3])
    codes = huffman.canonical_codes(lengths)
    words = [format(codes[s], f"0{lengths[s]}b") for s in np.flatnonzero(lengths)]
    assert words == ["00", "01", "100", "101", "110", "111"]


def test_a_single_symbol_stream_round_trips():
    values = np.full(17, 3)
    lengths = huffman.code_lengths(values, 4)
    assert np.array_equal(huffman.decode(huffman.encode(values, lengths), 17, lengths), values)


def test_truncated_stream_is_an_error():
    values = np.arange(100) % 5
    lengths = huffman.code_lengths(values, 5)
    data = huffman.encode(values, lengths)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        huffman.decode(data[:10], values.size, lengths)
