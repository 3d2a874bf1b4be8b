"""The .clipq format: bit packing, relative indices with fillers, bit-exact round trips, corruption."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from clipq.quant.prune_quant import clip_quantize
from clipq.storage import sparse_codec
from clipq.storage.sparse_codec import Layer
from clipq.util.errors import ClipqError


def quantized(shape=(64, 300), p=0.9, bits=3, seed=0, name="fc"):
    w = np.random.default_rng(seed).normal(0, 0.01, shape).astype(np.float32)
    q = clip_quantize(w, p, bits)
    bias = np.random.default_rng(seed + 1).normal(0, 1, shape[0]).astype(np.float32)
    return Layer(name, "InnerProduct", [q.weights, bias], q.codes, q.codebook, bits, p)


def raw(name="bn"):
    return Layer(name, "BatchNorm", [np.arange(5, dtype=np.float32), np.ones((2, 3), np.float32)])


def header_of(data: bytes) -> dict:
    """The JSON header of a valid .clipq file."""
    return sparse_codec.read_header(data)[0]


def with_header(data: bytes, header: dict, version: int | None = None) -> bytes:
    """`data` with `header` in place of its own and the header CRC recomputed: a careful hand edit."""
    return sparse_codec.replace_header(data, header, version)


@pytest.mark.parametrize("width", [1, 3, 8, 13, 24])
def test_pack_unpack_round_trip(width):
    values = np.random.default_rng(width).integers(0, 1 << width, 1001)
    data = sparse_codec.pack_bits(values, width)
    assert len(data) == (1001 * width + 7) // 8
    expected_bits = "".join(format(v, f"0{width}b") for v in values)
    assert np.array_equal(np.unpackbits(np.frombuffer(data, np.uint8))[:1001 * width],
                          np.array(list(expected_bits), dtype=np.uint8))
    assert np.array_equal(sparse_codec.unpack_bits(data, width, 1001), values)


def test_long_gaps_get_filler_entries_with_code_zero():
    codes = np.zeros(100, np.uint8)
    codes[[0, 1, 40, 99]] = [3, 1, 2, 7]
    k, index, entries = sparse_codec.sparse_streams(codes, bits=3)
    fillers = sum(g >> k for g in (0, 0, 38, 58))
    assert index.size == 4 + fillers
    assert np.count_nonzero(entries) == 4
    positions = np.cumsum(index + 1) - 1
    assert np.array_equal(positions[entries != 0], [0, 1, 40, 99])


def codes_after_gaps(gaps: np.ndarray) -> np.ndarray:
    """A flat code array whose non-zero codes follow runs of `gaps` zeros."""
    codes = np.zeros(int(np.sum(gaps + 1)), np.uint8)
    codes[np.cumsum(gaps + 1) - 1] = 5
    return codes


def test_index_width_minimises_the_layer_size():
    gaps = np.random.default_rng(0).geometric(0.05, 10_000) - 1
    k, index, _ = sparse_codec.sparse_streams(codes_after_gaps(gaps), bits=4)
    sizes = {j: (gaps.size + np.sum(gaps >> j)) * (j + 4) for j in range(1, 25)}
    assert sizes[k] == min(sizes.values()) and index.size == gaps.size + np.sum(gaps >> k)


@pytest.mark.parametrize("use_huffman", [False, True])
def test_file_round_trip_is_bit_exact(use_huffman):
    layers = [quantized(), raw(), quantized((20, 1, 5, 5), p=0.2, bits=8, name="conv")]
    data = sparse_codec.encode(layers, {"prototxt": "x"}, use_huffman)
    header, decoded = sparse_codec.decode(data)
    assert header["meta"] == {"prototxt": "x"} and header["huffman"] == use_huffman
    for a, b in zip(layers, decoded):
        assert (a.name, a.type) == (b.name, b.type)
        for x, y in zip(a.blobs, b.blobs):
            assert x.shape == y.shape and np.array_equal(x, y)
    assert np.array_equal(decoded[0].codes, layers[0].codes)


def test_compressed_size_is_the_streams_plus_codebook_plus_bias():
    layer = quantized(p=0.95, bits=3)
    sparse_codec.encode([layer])
    f = layer.facts
    assert f["stream_bytes"][0] == (f["entries"] * f["k"] + 7) // 8
    assert f["stream_bytes"][1] == (f["entries"] * 3 + 7) // 8
    assert f["stream_bytes"][2:] == [7 * 4, 64 * 4]
    assert f["length"] == sum(f["stream_bytes"])


@pytest.mark.parametrize("use_huffman", [False, True])
def test_all_pruned_and_dense_layers_round_trip(use_huffman):
    empty = Layer("e", "InnerProduct", [np.zeros((3, 4), np.float32)], np.zeros((3, 4), np.uint8),
                  np.zeros(3, np.float32), 2, 0.5)
    dense = quantized(p=0.0, bits=8, name="d")
    _, (e, d) = sparse_codec.decode(sparse_codec.encode([empty, dense], use_huffman=use_huffman))
    assert not e.blobs[0].any() and np.array_equal(d.blobs[0], dense.blobs[0])


def test_truncated_file_names_the_layer():
    data = sparse_codec.encode([quantized(name="fc6"), quantized(name="fc7", seed=3)])
    with pytest.raises(ClipqError, match="truncated in layer 'fc7'"):
        sparse_codec.decode(data[:-10], "m.clipq")


def test_flipped_payload_byte_is_a_crc_error_naming_the_layer():
    data = bytearray(sparse_codec.encode([quantized(name="fc6"), quantized(name="fc7", seed=3)]))
    data[-100] ^= 0x10
    with pytest.raises(ClipqError, match="layer 'fc7': CRC mismatch"):
        sparse_codec.decode(bytes(data), "m.clipq")


def test_bad_magic_newer_version_and_corrupt_header_are_refused():
    data = sparse_codec.encode([quantized()])
    with pytest.raises(ClipqError, match="not a .clipq file"):
        sparse_codec.decode(b"PK" + data[2:])
    newer = data[:8] + struct.pack("<I", sparse_codec.FORMAT_VERSION + 1) + data[12:]
    with pytest.raises(ClipqError, match=f"format version {sparse_codec.FORMAT_VERSION + 1} was written by a newer"):
        sparse_codec.decode(newer)
    corrupt = bytearray(data)
    corrupt[30] ^= 1
    with pytest.raises(ClipqError, match="header CRC mismatch"):
        sparse_codec.decode(bytes(corrupt))


def test_a_file_cut_inside_the_fixed_part_is_called_truncated():
    data = sparse_codec.encode([quantized()])
    with pytest.raises(ClipqError, match=r"m.clipq: truncated \(15 bytes"):
        sparse_codec.decode(data[:15], "m.clipq")


def test_bytes_after_the_last_layer_are_refused():
    data = sparse_codec.encode([quantized(), raw()])
    with pytest.raises(ClipqError, match="m.clipq: 3 bytes after the last layer"):
        sparse_codec.decode(data + b"abc", "m.clipq")


def test_an_edited_entry_fails_its_layers_crc():
    data = sparse_codec.encode([quantized(name="fc6"), raw()])
    header = header_of(data)
    header["layers"][0]["shapes"][0] = [64, 301]  # still fits the streams: only the bound CRC tells
    with pytest.raises(ClipqError, match="layer 'fc6': CRC mismatch"):
        sparse_codec.decode(with_header(data, header), "m.clipq")


def test_a_version_1_file_still_decodes():
    layers = [quantized(), raw()]
    data = sparse_codec.encode(layers)
    header, start = sparse_codec.read_header(data)
    header["version"] = 1
    for entry in header["layers"]:  # version 1: a layer's CRC covers its payload only
        entry["crc32"] = zlib.crc32(data[start + entry["offset"]:start + entry["offset"] + entry["length"]])
    _, decoded = sparse_codec.decode(with_header(data, header, version=1))
    assert all(np.array_equal(x, y) for a, b in zip(layers, decoded) for x, y in zip(a.blobs, b.blobs))


def shared_pair() -> list[Layer]:
    """Two layers with one weight blob (Caffe's `param { name: ... }`) and biases of their own."""
    first, second = quantized(name="a"), quantized(name="b")
    second.blobs[1] = second.blobs[1] + 1
    return [first, second]


def test_shared_weights_are_stored_once_and_decode_into_both_layers():
    layers = shared_pair()
    data = sparse_codec.encode(layers)
    header = header_of(data)
    assert header["version"] == 3
    assert (header["layers"][1]["encoding"], header["layers"][1]["of"]) == ("shared", "a")
    assert header["layers"][1]["length"] == 4 * 64  # its bias only
    assert len(data) - len(sparse_codec.encode(layers[:1])) < 4 * 64 + 100  # its bias and its header entry
    _, decoded = sparse_codec.decode(data)
    assert all(np.array_equal(x, y) for a, b in zip(layers, decoded) for x, y in zip(a.blobs, b.blobs))


def test_a_file_without_shared_layers_stays_version_2():
    assert header_of(sparse_codec.encode([quantized(), raw()]))["version"] == 2


def test_a_shared_entry_must_name_an_earlier_layer_of_its_shape():
    data = sparse_codec.encode(shared_pair())
    header = header_of(data)
    header["layers"][1]["of"] = "b"
    with pytest.raises(ClipqError, match="layer 'b': field 'of' is 'b', not an earlier layer with weights of shape"):
        sparse_codec.decode(with_header(data, header), "m.clipq")
    with pytest.raises(ClipqError, match="field 'encoding' is 'shared', not 'raw' or 'sparse'"):
        sparse_codec.decode(with_header(data, header_of(data) | {"version": 2}, version=2), "m.clipq")


def test_only_the_levels_the_codes_use_are_stored():
    layer = quantized(bits=8)  # 64 x 300 weights at p 0.9: ~1,900 kept, far fewer levels than 255 in use
    in_use = np.unique(layer.codes[layer.codes > 0])
    data = sparse_codec.encode([layer])
    entry = header_of(data)["layers"][0]
    assert (entry["levels"], entry["stream_bytes"][2]) == (in_use.size, 4 * in_use.size)
    assert header_of(data)["version"] == 3
    _, (decoded,) = sparse_codec.decode(data)
    assert np.array_equal(decoded.blobs[0], layer.blobs[0])
    again = sparse_codec.encode([decoded])  # a decoded layer (codes renumbered) stores the same levels
    assert header_of(again)["layers"][0]["levels"] == in_use.size and len(again) == len(data)


def test_encode_refuses_a_layer_the_reader_would_refuse():
    layer = raw()
    layer.type = "Normalize"
    with pytest.raises(ClipqError, match="layer 'bn': field 'type' is 'Normalize', not a Caffe layer type"):
        sparse_codec.encode([layer])


def test_streams_from_codes_pick_the_width_the_gaps_give():
    codes = (np.random.default_rng(1).random(50_000) < 0.03).astype(np.uint8) * 5
    k, index, entries = sparse_codec.sparse_streams(codes, bits=3)
    gaps = np.diff(np.flatnonzero(codes), prepend=-1) - 1
    sizes = {j: (gaps.size + np.sum(gaps >> j)) * (j + 3) for j in range(1, 25)}
    assert sizes[k] == min(sizes.values()) and index.size == gaps.size + np.sum(gaps >> k)
    assert np.array_equal((np.cumsum(index + 1) - 1)[entries != 0], np.flatnonzero(codes))
