"""Damaged and edited `.clipq` files: every one is refused with one line naming the file (and the layer or
field), or decodes bit-identical to the original layers. Seeded bit flips, every truncation, appended
bytes, and hand edits of the header with its CRC recomputed."""

from __future__ import annotations

import numpy as np
import pytest
from test_sparse_codec import header_of, quantized, raw, with_header

from clipq.storage import sparse_codec
from clipq.util.errors import ClipqError

SOURCE = "m.clipq"


def small_model() -> list[sparse_codec.Layer]:
    return [quantized((16, 30), p=0.8, bits=3, name="fc6"), raw("bn"),
            quantized((8, 1, 3, 3), p=0.5, bits=2, seed=4, name="conv")]


def refused_or_identical(data: bytes, original: list[sparse_codec.Layer]) -> str | None:
    """The one-line message if `data` is refused (None if it decodes); fails unless it decodes to `original`."""
    try:
        _, layers = sparse_codec.decode(data, SOURCE)
    except ClipqError as e:
        message = str(e)
        assert message.startswith(f"{SOURCE}: ") and "\n" not in message, message
        return message
    assert [(a.name, a.type) for a in layers] == [(b.name, b.type) for b in original]
    for a, b in zip(layers, original):
        assert all(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a.blobs, b.blobs))
    return None


@pytest.mark.parametrize("use_huffman", [False, True])
def test_single_bit_flips_are_refused_or_harmless(use_huffman):
    layers = small_model()
    data = sparse_codec.encode(layers, {"prototxt": "x"}, use_huffman)
    rng = np.random.default_rng(12)
    for bit in rng.choice(len(data) * 8, 100, replace=False):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        refused_or_identical(bytes(flipped), layers)


@pytest.mark.parametrize("use_huffman", [False, True])
def test_every_truncation_is_refused(use_huffman):
    layers = small_model()
    data = sparse_codec.encode(layers, use_huffman=use_huffman)
    for length in range(len(data)):
        assert refused_or_identical(data[:length], layers) is not None, length


@pytest.mark.parametrize("extra", [b"\0", b"\x89CLIPQ\r\n", bytes(1000)], ids=["one byte", "magic", "1000 zeros"])
def test_appended_bytes_are_refused(extra):
    layers = small_model()
    assert "after the last layer" in refused_or_identical(sparse_codec.encode(layers) + extra, layers)


def _layer(name):
    return lambda header: next(entry for entry in header["layers"] if entry["name"] == name)


FC6, BN, CONV = _layer("fc6"), _layer("bn"), _layer("conv")

# (what is edited, the edit of the header dict, a phrase the refusal must contain; None: may decode identically)
EDITS = [
    ("no crc32", lambda h: FC6(h).pop("crc32"), "layer 'fc6': field 'crc32' is missing"),
    ("float offset", lambda h: BN(h).update(offset=float(BN(h)["offset"])), "layer 'bn': field 'offset' is a number"),
    ("float bits", lambda h: FC6(h).update(bits=3.0), "layer 'fc6': field 'bits' is a number"),
    ("boolean k", lambda h: FC6(h).update(k=True), "field 'k' is a boolean"),
    ("null layers", lambda h: h.update(layers=None), "header: field 'layers' is null"),
    ("empty layers", lambda h: h.update(layers=[]), "header: field 'layers' is empty"),
    ("layers an object", lambda h: h.update(layers={}), "field 'layers' is an object"),
    ("layer a string", lambda h: h["layers"].insert(0, "fc6"), "layer #1 is a string ('fc6'), not an object"),
    ("no format", lambda h: h.pop("format"), "field 'format' is missing"),
    ("other format", lambda h: h.update(format="zip"), "field 'format' is 'zip'"),
    ("json version 1", lambda h: h.update(version=1), "field 'version' is 1"),
    ("string version", lambda h: h.update(version="2"), "field 'version' is a string"),
    ("null meta", lambda h: h.update(meta=None), "field 'meta' is null"),
    ("list in meta", lambda h: h["meta"].update(prototxt=["a"]), "field 'meta' holds a value"),
    ("huffman flag", lambda h: h.update(huffman=True), "layer 'fc6': field 'index' lacks a Huffman table"),
    ("transposed shape", lambda h: FC6(h)["shapes"].__setitem__(0, [30, 16]), "layer 'fc6'"),
    ("resized shape", lambda h: FC6(h)["shapes"].__setitem__(0, [16, 31]), "layer 'fc6': CRC mismatch"),
    ("resized raw blob", lambda h: BN(h)["shapes"].__setitem__(0, [6]), "layer 'bn': field 'length' is 44"),
    ("resized bias", lambda h: FC6(h)["shapes"].__setitem__(1, [15]), "layer 'fc6': the other blobs have 64 bytes"),
    ("negative dimension", lambda h: FC6(h)["shapes"].__setitem__(0, [-16, -30]), "not a blob shape"),
    ("float dimension", lambda h: FC6(h)["shapes"].__setitem__(0, [16, 30.0]), "not a blob shape"),
    ("huge blob", lambda h: FC6(h)["shapes"].__setitem__(0, [2 ** 20, 2 ** 20]), "more than Caffe's 2^31 - 1"),
    ("no shapes", lambda h: BN(h).update(shapes=[]), "layer 'bn': field 'shapes' is empty"),
    ("renamed layer", lambda h: FC6(h).update(name="fc7"), "layer 'fc7': CRC mismatch"),
    ("empty name", lambda h: FC6(h).update(name=""), "layer #1: field 'name' is ''"),
    ("name with a newline", lambda h: FC6(h).update(name="fc\n6"), "layer #1: field 'name' is 'fc\\n6'"),
    ("changed type", lambda h: FC6(h).update(type="Convolution"), "layer 'fc6': CRC mismatch"),
    ("unknown type", lambda h: BN(h).update(type="Normalize"), "layer 'bn': field 'type' is 'Normalize'"),
    ("removed first layer", lambda h: h["layers"].pop(0), "layer 'bn': field 'offset' is"),
    ("removed last layer", lambda h: h["layers"].pop(), "bytes after the last layer"),
    ("duplicated layer", lambda h: h["layers"].insert(1, dict(FC6(h))), "layer 'fc6' appears twice"),
    ("swapped layers", lambda h: h["layers"].reverse(), "layer 'conv': field 'offset' is"),
    ("shifted offset", lambda h: BN(h).update(offset=BN(h)["offset"] + 4), "layer 'bn': field 'offset' is"),
    ("longer raw layer", lambda h: BN(h).update(length=BN(h)["length"] + 4), "layer 'bn': field 'length'"),
    ("unknown encoding", lambda h: BN(h).update(encoding="dense"), "field 'encoding' is 'dense'"),
    ("raw sparse layer", lambda h: FC6(h).update(encoding="raw"), "layer 'fc6': field 'bits' is not one of a raw"),
    ("unknown layer field", lambda h: BN(h).update(note="x"), "layer 'bn': field 'note' is not one of a raw"),
    ("unknown header field", lambda h: h.update(signed=True), "header: field 'signed' is not a header field"),
    ("levels in version 2", lambda h: FC6(h).update(levels=3), "field 'levels' is not part of format version 2"),
    ("bits 9", lambda h: FC6(h).update(bits=9), "field 'bits' is 9, outside 1..8"),
    ("bits 0", lambda h: FC6(h).update(bits=0), "field 'bits' is 0, outside 1..8"),
    ("more bits", lambda h: CONV(h).update(bits=3), "layer 'conv': field 'codes' has width 2"),
    ("k 25", lambda h: FC6(h).update(k=25), "field 'k' is 25, outside 1..24"),
    ("k 0", lambda h: FC6(h).update(k=0), "field 'k' is 0, outside 1..24"),
    ("more entries", lambda h: FC6(h).update(entries=FC6(h)["entries"] + 40), "layer 'fc6': the index stream"),
    ("entries past the weights", lambda h: FC6(h).update(entries=481), "field 'entries' is 481, outside 0..480"),
    ("nonzero past entries", lambda h: FC6(h).update(nonzero=FC6(h)["entries"] + 1), "field 'nonzero'"),
    ("p 1.5", lambda h: FC6(h).update(p=1.5), "field 'p' is 1.5"),
    ("p NaN", lambda h: FC6(h).update(p=float("nan")), "field 'p' is nan"),
    ("p a string", lambda h: FC6(h).update(p="0.8"), "field 'p' is '0.8'"),
    ("three streams", lambda h: FC6(h)["stream_bytes"].pop(), "field 'stream_bytes' is"),
    ("streams not summing", lambda h: FC6(h)["stream_bytes"].__setitem__(3, 0), "field 'stream_bytes' sums to"),
    ("short codebook", lambda h: CONV(h).update(stream_bytes=_moved(CONV(h)["stream_bytes"], 2, 3)),
     "layer 'conv': the codebook has 8 bytes"),
    ("crc32 negative", lambda h: FC6(h).update(crc32=-1), "field 'crc32' is -1"),
    ("crc32 too large", lambda h: FC6(h).update(crc32=2 ** 32), "field 'crc32' is 4294967296"),
    ("unknown header field", lambda h: h.update(comment="hand-edited"), None),
    ("other meta", lambda h: h["meta"].update(prototxt="y.prototxt"), None),
]


def _moved(lengths, source, target, amount=4):
    """Stream lengths with `amount` bytes moved from one stream to another (the total unchanged)."""
    lengths[source] -= amount
    lengths[target] += amount
    return lengths


@pytest.mark.parametrize("edit,phrase", [(e, p) for _, e, p in EDITS], ids=[name for name, _, _ in EDITS])
def test_an_edited_header_with_a_recomputed_crc_is_refused_or_harmless(edit, phrase):
    layers = small_model()
    data = sparse_codec.encode(layers, {"prototxt": "x"})
    header = header_of(data)
    edit(header)
    message = refused_or_identical(with_header(data, header), layers)
    if phrase is not None:
        assert message is not None and phrase in message, message


def test_a_header_downgraded_to_version_1_fails_the_payload_crcs():
    layers = small_model()
    data = sparse_codec.encode(layers)
    header = header_of(data)
    header["version"] = 1
    assert "layer 'fc6': CRC mismatch" in refused_or_identical(with_header(data, header, version=1), layers)


def test_a_tiny_file_declaring_billions_of_pruned_weights_is_refused_before_decoding():
    empty = sparse_codec.Layer("fc", "InnerProduct", [np.zeros((4, 8), np.float32)], np.zeros((4, 8), np.uint8),
                               np.zeros(1, np.float32), 1, 0.5)
    data = sparse_codec.encode([empty])
    header = header_of(data)
    entry = header["layers"][0]
    entry["shapes"] = [[2 ** 29, 2]]
    payload = data[len(data) - entry["length"]:]
    entry["crc32"] = sparse_codec._layer_crc({k: v for k, v in entry.items() if k != "crc32"}, payload)
    edited = with_header(data, header)
    assert len(edited) < 400
    message = refused_or_identical(edited, [empty])
    assert "decode to 4,295 MB of float32 weights, more than 400 times the file (67 MB at most" in message
