"""The `.clipq` compressed-model format: sparse layers (relative indices + b-bit codes + codebook).

As section 3.1 of the paper says (after Deep Compression): "the structure of the sparse weight matrix is
encoded using index differences, and each non-pruned weight stores the b-bit identifier of its
quantization level". Per compressed layer, with the weights flattened in Caffe's blob order:

- *index stream*: one k-bit entry per stored weight = the number of zeros skipped since the previous
  stored position. A gap that does not fit in k bits gets filler entries (k-bit 2^k - 1, code 0: a
  stored zero), as in Deep Compression. k (1..24) is chosen per layer to minimise the layer's size.
- *code stream*: one b-bit code per entry: 0 for a filler, j in 1..2^b - 1 for codebook[j - 1]. So b
  bits name the 2^b - 1 levels plus zero, exactly the paper's bit budget.
- *codebook*: 2^b - 1 float32 levels; then the layer's other blobs (bias) as float32.
Layers that are not compressed (BatchNorm, Scale, aux branches, ...) are stored as raw float32 blobs.
Optionally (`huffman=True`) both streams are Huffman-coded (Table 4's bracketed sizes).

File: magic (8 bytes) | format version (u32 LE) | header length (u32) | header CRC32 (u32) | header
(zlib-compressed JSON) | payload. The header lists each layer (name, type, blob shapes, p, b, k, counts, stream
lengths, byte offset and length, CRC32 of its payload). Pure numpy: no Caffe import.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from clipq import _kernels, huffman
from clipq.errors import ClipqError

MAGIC = b"\x89CLIPQ\r\n"
FORMAT_VERSION = 1
MAX_INDEX_BITS = 24


@dataclass
class Layer:
    """One layer of a model: its blobs, and for a compressed layer its codes and codebook."""

    name: str
    type: str
    blobs: list[np.ndarray]           # float32, Caffe shapes; blobs[0] = weights
    codes: np.ndarray | None = None   # uint8, weights' shape: 0 = zero, j = codebook[j - 1]
    codebook: np.ndarray | None = None  # float32 (2^bits - 1,)
    bits: int = 0
    p: float | None = None            # pruning rate it was compressed with (for reports)
    facts: dict = field(default_factory=dict)  # filled by encode: k, entries, stream bytes, ...

    @property
    def compressed(self) -> bool:
        return self.codes is not None


# --- bit packing -------------------------------------------------------------------------------

def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Concatenate unsigned `width`-bit integers (MSB first), padded to a byte."""
    return _kernels.pack_bits(np.ascontiguousarray(values, np.int64), width).tobytes()


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` integers (int64)."""
    needed = (count * width + 7) // 8
    if len(data) < needed:
        raise ValueError(f"stream has {len(data)} bytes, {needed} needed")
    return _kernels.unpack_bits(np.frombuffer(data, np.uint8), width, count)


# --- one layer ---------------------------------------------------------------------------------

def index_bits_and_entries(gaps: np.ndarray, bits: int) -> tuple[int, int]:
    """(k, entries) minimising entries * (k + bits), where a gap g needs g >> k filler entries."""
    best = None
    fillers = _kernels.filler_counts(np.ascontiguousarray(gaps, np.int64), MAX_INDEX_BITS)
    for k in range(1, MAX_INDEX_BITS + 1):
        entries = gaps.size + int(fillers[k])
        size = entries * (k + bits)
        if best is None or size < best[0]:
            best = (size, k, entries)
    return best[1], best[2]


def sparse_streams(codes: np.ndarray, bits: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(k, index entries, code entries) for a flat uint8 code array (0 = zero weight)."""
    positions = np.flatnonzero(codes)
    gaps = np.diff(positions, prepend=-1) - 1
    k, entries = index_bits_and_entries(gaps, bits)
    fillers = gaps >> k
    last = np.cumsum(fillers + 1) - 1          # where each stored weight's own entry goes
    index = np.full(entries, (1 << k) - 1, np.int64)
    index[last] = gaps - (fillers << k)
    code_entries = np.zeros(entries, np.int64)
    code_entries[last] = codes[positions]
    return k, index, code_entries


def _stream_bytes(values: np.ndarray, width: int, use_huffman: bool) -> tuple[bytes, dict]:
    if not use_huffman:
        return pack_bits(values, width), {"width": width}
    lengths = huffman.code_lengths(values, 1 << width)
    return huffman.encode(values, lengths), {"width": width, "huffman": lengths.tolist()}


def _read_stream(data: bytes, meta: dict, count: int) -> np.ndarray:
    if "huffman" in meta:
        return huffman.decode(data, count, np.array(meta["huffman"]))
    return unpack_bits(data, meta["width"], count)


def _float_bytes(blobs: list[np.ndarray]) -> bytes:
    """Blobs as concatenated little-endian float32."""
    return b"".join(np.ascontiguousarray(b, "<f4").tobytes() for b in blobs)


def _float_blobs(data: bytes, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Inverse of `_float_bytes`; ValueError if the byte count does not fit the shapes."""
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    if len(data) != 4 * sum(sizes):
        raise ValueError(f"{len(data)} bytes for {sum(sizes)} float32 values")
    flat = np.frombuffer(data, "<f4")
    ends = np.cumsum(sizes)
    return [flat[e - n:e].reshape(s).astype(np.float32) for e, n, s in zip(ends, sizes, shapes)]


def encode_layer(layer: Layer, use_huffman: bool = False) -> tuple[dict, bytes]:
    """(header entry, payload bytes) of one layer."""
    entry = {"name": layer.name, "type": layer.type, "shapes": [list(b.shape) for b in layer.blobs]}
    if not layer.compressed:
        entry["encoding"] = "raw"
        return entry, _float_bytes(layer.blobs)
    k, index, code_entries = sparse_streams(layer.codes.reshape(-1), layer.bits)
    index_bytes, index_meta = _stream_bytes(index, k, use_huffman)
    code_bytes, code_meta = _stream_bytes(code_entries, layer.bits, use_huffman)
    codebook = np.ascontiguousarray(layer.codebook, "<f4").tobytes()
    others = _float_bytes(layer.blobs[1:])
    entry.update(encoding="sparse", bits=layer.bits, p=layer.p, k=k, entries=int(index.size),
                 nonzero=int(np.count_nonzero(layer.codes)), index=index_meta, codes=code_meta,
                 stream_bytes=[len(index_bytes), len(code_bytes), len(codebook), len(others)])
    return entry, index_bytes + code_bytes + codebook + others


def decode_layer(entry: dict, payload: bytes) -> Layer:
    """Inverse of `encode_layer`; ValueError if the payload does not fit its description."""
    shapes = [tuple(s) for s in entry["shapes"]]
    if entry["encoding"] == "raw":
        return Layer(entry["name"], entry["type"], _float_blobs(payload, shapes))
    lengths = entry["stream_bytes"]
    if sum(lengths) != len(payload):
        raise ValueError(f"streams need {sum(lengths)} bytes, payload has {len(payload)}")
    cut = np.cumsum([0] + lengths)
    index_bytes, code_bytes, codebook_bytes, other_bytes = (payload[cut[i]:cut[i + 1]] for i in range(4))
    bits, entries = entry["bits"], entry["entries"]
    index = _read_stream(index_bytes, entry["index"], entries)
    code_entries = _read_stream(code_bytes, entry["codes"], entries)
    if code_entries.size and code_entries.max() >= 1 << bits:
        raise ValueError(f"code {code_entries.max()} does not fit {bits} bits")
    codebook = np.frombuffer(codebook_bytes, "<f4").astype(np.float32)
    lut = np.concatenate([np.zeros(1, np.float32), codebook, np.zeros((1 << bits) - 1 - codebook.size, np.float32)])
    size = int(np.prod(shapes[0], dtype=np.int64))
    weights, codes, status = _kernels.scatter_entries(index, code_entries, lut, size)
    if status < 0:
        raise ValueError(f"indices run past the {size} weights")
    blobs = [weights.reshape(shapes[0])] + _float_blobs(other_bytes, shapes[1:])
    return Layer(entry["name"], entry["type"], blobs, codes.reshape(shapes[0]), codebook, bits, entry.get("p"))


# --- the file ----------------------------------------------------------------------------------

def encode(layers: list[Layer], meta: dict | None = None, use_huffman: bool = False) -> bytes:
    """A whole `.clipq` file; fills each layer's `facts` (its entry in the header)."""
    entries, payloads, offset = [], [], 0
    for layer in layers:
        entry, payload = encode_layer(layer, use_huffman)
        entry.update(offset=offset, length=len(payload), crc32=zlib.crc32(payload))
        layer.facts = entry
        entries.append(entry)
        payloads.append(payload)
        offset += len(payload)
    header = zlib.compress(json.dumps({"format": "clipq", "version": FORMAT_VERSION, "huffman": use_huffman,
                                       "meta": meta or {}, "layers": entries}, separators=(",", ":")).encode(), 9)
    return (MAGIC + struct.pack("<III", FORMAT_VERSION, len(header), zlib.crc32(header)) + header
            + b"".join(payloads))


def read_header(data: bytes, source: str = "file") -> tuple[dict, int]:
    """(header, payload start) after checking magic, version and the header's CRC."""
    fixed = len(MAGIC) + 12
    if len(data) < fixed or data[:len(MAGIC)] != MAGIC:
        raise ClipqError(f"{source}: not a .clipq file (bad magic)")
    version, header_len, header_crc = struct.unpack("<III", data[len(MAGIC):fixed])
    if version > FORMAT_VERSION:
        raise ClipqError(f"{source}: format version {version} was written by a newer clipq; "
                         f"this clipq reads version {FORMAT_VERSION}")
    header = data[fixed:fixed + header_len]
    if len(header) != header_len:
        raise ClipqError(f"{source}: truncated in the header")
    if zlib.crc32(header) != header_crc:
        raise ClipqError(f"{source}: header CRC mismatch (corrupt file)")
    return json.loads(zlib.decompress(header)), fixed + header_len


def decode(data: bytes, source: str = "file") -> tuple[dict, list[Layer]]:
    """(header, layers) of a `.clipq` file; a clear error naming the layer on any corruption."""
    header, start = read_header(data, source)
    layers = []
    for entry in header["layers"]:
        begin, end = start + entry["offset"], start + entry["offset"] + entry["length"]
        if end > len(data):
            raise ClipqError(f"{source}: truncated in layer '{entry['name']}' "
                             f"(needs {end} bytes, file has {len(data)})")
        payload = data[begin:end]
        if zlib.crc32(payload) != entry["crc32"]:
            raise ClipqError(f"{source}: layer '{entry['name']}': CRC mismatch (corrupt data)")
        try:
            layer = decode_layer(entry, payload)
        except ValueError as e:
            raise ClipqError(f"{source}: layer '{entry['name']}': {e}") from None
        layer.facts = entry
        layers.append(layer)
    return header, layers
