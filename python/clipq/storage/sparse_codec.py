"""The `.clipq` compressed-model format: sparse layers (relative indices + b-bit codes + codebook).

As section 3.1 of the paper says (after Deep Compression): "the structure of the sparse weight matrix is
encoded using index differences, and each non-pruned weight stores the b-bit identifier of its
quantization level". Per compressed layer, with the weights flattened in Caffe's blob order:

- *index stream*: one k-bit entry per stored weight = the number of zeros skipped since the previous
  stored position. A gap that does not fit in k bits gets filler entries (k-bit 2^k - 1, code 0: a
  stored zero), as in Deep Compression. k (1..24) is chosen per layer to minimise the layer's size.
- *code stream*: one b-bit code per entry: 0 for a filler, j in 1..2^b - 1 for codebook[j - 1]. So b
  bits name the 2^b - 1 levels plus zero, exactly the paper's bit budget.
- *codebook*: the float32 levels the codes use (2^b - 1 when all are used; with fewer, the codes are
  renumbered 1..L over the L levels in use and the entry says `levels`: L, so that a method that stores few
  distinct weights at 8 bits pays for those, not for 255); then the layer's other blobs (bias) as float32.
Layers that are not compressed (BatchNorm, Scale, aux branches, ...) are stored as raw float32 blobs.
A layer whose weights equal an earlier layer's (Caffe's shared weights, `param { name: ... }`: the caffemodel
holds one copy per layer) stores them once: its entry is `shared` with the earlier layer's name (`of`), and
its payload holds only its other blobs. Format version 3 has `shared` entries and `levels`; a file that needs
neither is written as version 2, which older clipq reads.
Optionally (`huffman=True`) both streams are Huffman-coded (Table 4's bracketed sizes).

File: magic (8 bytes) | format version (u32 LE) | header length (u32) | header CRC32 (u32) | header
(zlib-compressed JSON) | payload. The header lists each layer (name, type, blob shapes, p, b, k, counts, stream
lengths, byte offset and length, CRC32). Pure numpy: no Caffe import.

The reader trusts nothing: the header is checked in full before any payload is touched (every field's type
and range, shapes against entry counts and stream lengths, unique names, layers contiguous and covering the
payload exactly), so a damaged or edited file is a one-line ClipqError naming the file and the layer or
field. From version 2 a layer's CRC32 covers its header entry as well as its payload: an entry edited with
the header CRC recomputed (a renamed layer, a changed type or shape) fails it like corrupt data does.
Version 1 files (CRC of the payload only) are still read. Whether the names fit a net is checked only
against one (`clipq decode --model`).
"""

from __future__ import annotations

import hashlib
import json
import math
import reprlib
import struct
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np

from clipq.storage import huffman
from clipq.util.errors import ClipqError

MAGIC = b"\x89CLIPQ\r\n"
FORMAT_VERSION = 3       # 3: shared layers, used levels; 2: a layer's CRC32 covers its header entry; 1: payload only
SHARED_VERSION = 3       # the first version with `shared` entries and `levels` (a file with neither: version 2)
HEADER_FIELDS = {"format", "version", "huffman", "meta", "layers"}
ENTRY_FIELDS = {"raw": {"name", "type", "shapes", "encoding", "offset", "length", "crc32"}}
ENTRY_FIELDS["shared"] = ENTRY_FIELDS["raw"] | {"of"}
ENTRY_FIELDS["sparse"] = ENTRY_FIELDS["raw"] | {"bits", "p", "k", "entries", "nonzero", "index", "codes",
                                                "stream_bytes", "levels"}
FIXED_BYTES = len(MAGIC) + 12
MAX_INDEX_BITS = 24
MAX_BITS = 8
MAX_BLOB_AXES = 32       # Caffe's kMaxBlobAxes
MAX_BLOB_COUNT = 2 ** 31 - 1  # Caffe's Blob::Reshape limit (INT_MAX)
# A file decodes to float32 blobs of at most MAX_RATE times its own size (or DECODE_FLOOR bytes, for tiny files):
# a few hundred bytes that declare billions of pruned weights are refused before anything is allocated. The
# paper's rates are 10-51x, clipq's LeNets 40-120x.
MAX_RATE = 400
DECODE_FLOOR = 64 << 20
EXACT_SAMPLE = 1 << 16  # weights looked at to tell an exported (quantized) layer from a full-precision one
# The BVLC Caffe layer types that hold weights; only layers with weights are stored.
WEIGHTED_TYPES = frozenset({"BatchNorm", "Bias", "Convolution", "Deconvolution", "Embed", "InnerProduct", "LSTM",
                            "Parameter", "PReLU", "Python", "RNN", "Scale"})


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
    from clipq.storage import kernels  # lazy: numba's import (0.4 s) stays out of `clipq --help`

    return kernels.pack_bits(np.ascontiguousarray(values, np.int64), width).tobytes()


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: `count` integers (int64)."""
    from clipq.storage import kernels  # lazy: numba's import (0.4 s) stays out of `clipq --help`

    needed = (count * width + 7) // 8
    if len(data) < needed:
        raise ValueError(f"stream has {len(data)} bytes, {needed} needed")
    return kernels.unpack_bits(np.frombuffer(data, np.uint8), width, count)


def exact_codes(weights: np.ndarray, p: float, bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes, codebook) that store `weights` exactly at `bits`, if they already look pruned-quantized at
    (p, bits) (an exported CLIP-Q layer: at most 2^b - 1 distinct non-zero values and about round(p * n)
    zeros, 2 more for the per-sign rounding; a small full-precision layer can have few distinct values but
    has no zeros); None otherwise."""
    from clipq.storage import kernels  # lazy: numba's import (0.4 s) stays out of `clipq --help`

    levels = 2 ** bits - 1
    sample = weights.reshape(-1)[:EXACT_SAMPLE]
    candidates = np.unique(sample[sample != 0])
    if candidates.size > levels or np.count_nonzero(weights == 0) < p * weights.size - 2:
        return None
    codes = kernels.codes_for_levels(weights, candidates)  # every weight one of the sample's levels?
    if codes is None and weights.size > EXACT_SAMPLE:
        candidates = np.unique(weights[weights != 0])
        codes = kernels.codes_for_levels(weights, candidates) if candidates.size <= levels else None
    if codes is None:
        return None
    codebook = np.zeros(levels, np.float32)
    codebook[:candidates.size] = candidates
    return codes, codebook


# --- one layer ---------------------------------------------------------------------------------

def _best_index_bits(stored: int, fillers: np.ndarray, bits: int) -> tuple[int, int]:
    """(k, entries) minimising entries * (k + bits), where entries = stored + fillers[k]."""
    best = None
    for k in range(1, MAX_INDEX_BITS + 1):
        entries = stored + int(fillers[k])
        size = entries * (k + bits)
        if best is None or size < best[0]:
            best = (size, k, entries)
    return best[1], best[2]


def sparse_streams(codes: np.ndarray, bits: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(k, index entries, code entries) for a flat uint8 code array (0 = zero weight)."""
    from clipq.storage import kernels  # lazy: numba's import (0.4 s) stays out of `clipq --help`

    codes = np.ascontiguousarray(codes, np.uint8)
    stored, fillers = kernels.gap_stats(codes, MAX_INDEX_BITS)
    k, entries = _best_index_bits(stored, fillers, bits)
    index, code_entries = kernels.sparse_entries(codes, k, entries)
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
    codes, levels = used_levels(layer.codes.reshape(-1), np.asarray(layer.codebook, np.float32), layer.bits)
    k, index, code_entries = sparse_streams(codes, layer.bits)
    index_bytes, index_meta = _stream_bytes(index, k, use_huffman)
    code_bytes, code_meta = _stream_bytes(code_entries, layer.bits, use_huffman)
    codebook = np.ascontiguousarray(levels, "<f4").tobytes()
    others = _float_bytes(layer.blobs[1:])
    entry.update(encoding="sparse", bits=layer.bits, p=layer.p, k=k, entries=int(index.size),
                 nonzero=int(np.count_nonzero(codes)), index=index_meta, codes=code_meta,
                 stream_bytes=[len(index_bytes), len(code_bytes), len(codebook), len(others)])
    if levels.size < (1 << layer.bits) - 1:
        entry["levels"] = int(levels.size)
    return entry, index_bytes + code_bytes + codebook + others


def used_levels(codes: np.ndarray, codebook: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, levels): the codebook's levels that some code uses, in order, and the codes renumbered 1..L
    over them (0 stays a zero); the inputs themselves when every level is used."""
    full = (1 << bits) - 1
    used = np.flatnonzero(np.bincount(codes, minlength=full + 1)[1:]) + 1
    if used.size == full:
        return codes, codebook[:full]
    renumber = np.zeros(full + 1, np.uint8)
    renumber[used] = np.arange(1, used.size + 1)
    return renumber[codes], codebook[used - 1]


def encode_shared(layer: Layer, owner: str) -> tuple[dict, bytes]:
    """(header entry, payload) of a layer whose weights are those of the earlier layer `owner`: its other blobs."""
    entry = {"name": layer.name, "type": layer.type, "shapes": [list(b.shape) for b in layer.blobs],
             "encoding": "shared", "of": owner}
    return entry, _float_bytes(layer.blobs[1:])


def _weights_key(layer: Layer) -> tuple:
    """What two layers with the same weights (and the same codes and codebook, if compressed) share."""
    weights = np.ascontiguousarray(layer.blobs[0])
    digest = hashlib.blake2b(weights.data, digest_size=16).digest()
    return (layer.type, weights.shape, weights.dtype.str, digest, layer.bits,
            None if layer.codebook is None else np.ascontiguousarray(layer.codebook, "<f4").tobytes())


def _same_weights(layer: Layer, other: Layer) -> bool:
    same_codes = (layer.codes is None) == (other.codes is None) and (
        layer.codes is None or np.array_equal(layer.codes, other.codes))
    return same_codes and np.array_equal(layer.blobs[0], other.blobs[0])


def decode_layer(entry: dict, payload: bytes, owner: Layer | None = None) -> Layer:
    """Inverse of `encode_layer` / `encode_shared` (for an entry `check_header` accepted; `owner`: the decoded
    layer a shared entry names); ValueError if the streams do not fit it."""
    from clipq.storage import kernels  # lazy: numba's import (0.4 s) stays out of `clipq --help`

    shapes = [tuple(s) for s in entry["shapes"]]
    if entry["encoding"] == "raw":
        return Layer(entry["name"], entry["type"], _float_blobs(payload, shapes))
    if entry["encoding"] == "shared":
        return Layer(entry["name"], entry["type"], [owner.blobs[0].copy()] + _float_blobs(payload, shapes[1:]))
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
    if code_entries.size and code_entries.max() > codebook.size:
        raise ValueError(f"code {code_entries.max()} names no level of the {codebook.size} stored")
    lut = np.concatenate([np.zeros(1, np.float32), codebook, np.zeros((1 << bits) - 1 - codebook.size, np.float32)])
    size = int(np.prod(shapes[0], dtype=np.int64))
    weights, codes, status = kernels.scatter_entries(index, code_entries, lut, size)
    if status < 0:
        raise ValueError(f"indices run past the {size} weights")
    blobs = [weights.reshape(shapes[0])] + _float_blobs(other_bytes, shapes[1:])
    return Layer(entry["name"], entry["type"], blobs, codes.reshape(shapes[0]), codebook, bits, entry.get("p"))


# --- the header: checked in full before any payload is read ---------------------------------

_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def _described(value) -> str:
    """A JSON value for a one-line message: its kind, and a short repr."""
    return "null" if value is None else f"{_JSON_NAMES.get(type(value), 'a value')} ({reprlib.repr(value)})"


def _bytes(n: int) -> str:
    return "1 byte" if n == 1 else f"{n} bytes"


def _field(obj: dict, key: str, kind: type, where: str):
    """obj[key], which must be a `kind` (a boolean is not an integer here); else a ClipqError naming it."""
    if key not in obj:
        raise ClipqError(f"{where}: field '{key}' is missing")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ClipqError(f"{where}: field '{key}' is {_described(value)}, not {_JSON_NAMES[kind]}")
    return value


def _int_field(obj: dict, key: str, low: int, high: int, where: str) -> int:
    value = _field(obj, key, int, where)
    if not low <= value <= high:
        raise ClipqError(f"{where}: field '{key}' is {value}, outside {low}..{high}")
    return value


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _blob_counts(entry: dict, where: str) -> list[int]:
    """The number of values of each blob, from the entry's shapes (Caffe's limits on axes and counts)."""
    shapes = _field(entry, "shapes", list, where)
    if not shapes:
        raise ClipqError(f"{where}: field 'shapes' is empty (a stored layer has weights)")
    counts = []
    for shape in shapes:
        if not isinstance(shape, list) or len(shape) > MAX_BLOB_AXES or not all(map(_is_count, shape)):
            raise ClipqError(f"{where}: field 'shapes' holds {reprlib.repr(shape)}, not a blob shape "
                             f"(a list of up to {MAX_BLOB_AXES} non-negative integers)")
        count = math.prod(shape)
        if count > MAX_BLOB_COUNT:
            raise ClipqError(f"{where}: blob shape {shape} has {count} values, more than Caffe's 2^31 - 1")
        counts.append(count)
    return counts


def _check_stream(entry: dict, key: str, width: int, huffman_file: bool, stream_bytes: int, where: str) -> None:
    """A stream's description: its width, Huffman table if the file has them, and byte count for its entries."""
    meta = _field(entry, key, dict, where)
    if type(meta.get("width")) is not int or meta["width"] != width:
        raise ClipqError(f"{where}: field '{key}' has width {reprlib.repr(meta.get('width'))}, the layer says {width}")
    if ("huffman" in meta) != huffman_file:
        raise ClipqError(f"{where}: field '{key}' {'has' if 'huffman' in meta else 'lacks'} a Huffman table, "
                         f"but the header says huffman={str(huffman_file).lower()}")
    entries = entry["entries"]
    least = most = (entries * width + 7) // 8
    if huffman_file:
        lengths = meta["huffman"]
        if not isinstance(lengths, list) or len(lengths) != 1 << width or not all(map(_is_count, lengths)) \
                or max(lengths) > huffman.MAX_CODE_LENGTH or (entries and not max(lengths)):
            raise ClipqError(f"{where}: field '{key}' has a Huffman table that is not {1 << width} code lengths "
                             f"in 0..{huffman.MAX_CODE_LENGTH}")
        used = [n for n in lengths if n]
        least, most = (entries * min(used, default=0) + 7) // 8, (entries * max(lengths) + 7) // 8
    if not least <= stream_bytes <= most:
        need = most if least == most else f"{least}..{most}"
        raise ClipqError(f"{where}: the {key} stream has {_bytes(stream_bytes)}; {entries} entries take {need}")


def _check_sparse(entry: dict, counts: list[int], huffman_file: bool, where: str, version: int) -> None:
    """A compressed layer's fields: ranges, and stream lengths that fit its entries, codebook and blobs."""
    bits = _int_field(entry, "bits", 1, MAX_BITS, where)
    levels = (1 << bits) - 1
    if "levels" in entry:
        if version < SHARED_VERSION:
            raise ClipqError(f"{where}: field 'levels' is not part of format version {version}")
        levels = _int_field(entry, "levels", 0, (1 << bits) - 2, where)
    k = _int_field(entry, "k", 1, MAX_INDEX_BITS, where)
    if "p" not in entry:
        raise ClipqError(f"{where}: field 'p' is missing")
    p = entry["p"]
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
        raise ClipqError(f"{where}: field 'p' is {reprlib.repr(p)}, not a pruning rate in [0, 1) or null")
    entries = _int_field(entry, "entries", 0, counts[0], where)  # each entry moves at least one weight on
    _int_field(entry, "nonzero", 0, entries, where)
    lengths = _field(entry, "stream_bytes", list, where)
    if len(lengths) != 4 or not all(map(_is_count, lengths)):
        raise ClipqError(f"{where}: field 'stream_bytes' is {reprlib.repr(lengths)}, not 4 byte counts")
    if sum(lengths) != entry["length"]:
        raise ClipqError(f"{where}: field 'stream_bytes' sums to {sum(lengths)}, field 'length' is {entry['length']}")
    _check_stream(entry, "index", k, huffman_file, lengths[0], where)
    _check_stream(entry, "codes", bits, huffman_file, lengths[1], where)
    if lengths[2] != 4 * levels:
        raise ClipqError(f"{where}: the codebook has {lengths[2]} bytes, not {levels} float32 levels")
    if lengths[3] != 4 * sum(counts[1:]):
        raise ClipqError(f"{where}: the other blobs have {lengths[3]} bytes; shapes {entry['shapes'][1:]} "
                         f"take {4 * sum(counts[1:])}")


def _check_entry(entry, number: int, huffman_file: bool, source: str, version: int) -> str:
    """One layer's header entry, checked against itself; its name."""
    where = f"{source}: layer #{number}"
    if not isinstance(entry, dict):
        raise ClipqError(f"{where} is {_described(entry)}, not an object")
    name = _field(entry, "name", str, where)
    if not name or not name.isprintable():
        raise ClipqError(f"{where}: field 'name' is {reprlib.repr(name)}, not a layer name")
    where = f"{source}: layer '{name}'"
    if _field(entry, "type", str, where) not in WEIGHTED_TYPES:
        raise ClipqError(f"{where}: field 'type' is {reprlib.repr(entry['type'])}, not a Caffe layer type with "
                         f"weights ({', '.join(sorted(WEIGHTED_TYPES))})")
    counts = _blob_counts(entry, where)
    for key in ("offset", "length"):
        _int_field(entry, key, 0, sys.maxsize, where)
    _int_field(entry, "crc32", 0, 0xFFFFFFFF, where)
    encoding = _field(entry, "encoding", str, where)
    unknown = sorted(set(entry) - ENTRY_FIELDS.get(encoding, set(entry)))
    if unknown:
        raise ClipqError(f"{where}: field '{unknown[0]}' is not one of a {encoding} layer's")
    if encoding == "sparse":
        _check_sparse(entry, counts, huffman_file, where, version)
    elif encoding == "shared" and version >= SHARED_VERSION:
        _field(entry, "of", str, where)
        if entry["length"] != 4 * sum(counts[1:]):
            raise ClipqError(f"{where}: field 'length' is {entry['length']}; its own float32 blobs of shapes "
                             f"{entry['shapes'][1:]} take {4 * sum(counts[1:])} bytes")
    elif encoding != "raw":
        kinds = "'raw', 'sparse' or 'shared'" if version >= SHARED_VERSION else "'raw' or 'sparse'"
        raise ClipqError(f"{where}: field 'encoding' is {reprlib.repr(encoding)}, not {kinds}")
    elif entry["length"] != 4 * sum(counts):
        raise ClipqError(f"{where}: field 'length' is {entry['length']}; float32 blobs of shapes "
                         f"{entry['shapes']} take {4 * sum(counts)} bytes")
    return name


def check_header(header, version: int, payload_bytes: int, source: str = "file") -> None:
    """Refuse a header that does not describe exactly `payload_bytes` bytes of layers: every field's type
    and range, shapes against counts and stream lengths, unique names, contiguous layers, nothing after
    them. Header-sized work: no payload is read."""
    where = f"{source}: header"
    if not isinstance(header, dict):
        raise ClipqError(f"{where} is {_described(header)}, not an object")
    if _field(header, "format", str, where) != "clipq":
        raise ClipqError(f"{where}: field 'format' is {reprlib.repr(header['format'])}, not 'clipq'")
    if _field(header, "version", int, where) != version:
        raise ClipqError(f"{where}: field 'version' is {header['version']}, the file's fixed part says {version}")
    unknown = sorted(set(header) - HEADER_FIELDS)
    if unknown:
        raise ClipqError(f"{where}: field '{unknown[0]}' is not a header field ({', '.join(sorted(HEADER_FIELDS))})")
    huffman_file = _field(header, "huffman", bool, where)
    meta = _field(header, "meta", dict, where)
    if not all(isinstance(value, (str, int, float, bool, type(None))) for value in meta.values()):
        raise ClipqError(f"{where}: field 'meta' holds a value that is not a string, number, boolean or null")
    entries = _field(header, "layers", list, where)
    if not entries:
        raise ClipqError(f"{where}: field 'layers' is empty")
    shapes, end = {}, 0
    for number, entry in enumerate(entries, 1):
        name = _check_entry(entry, number, huffman_file, source, version)
        if name in shapes:
            raise ClipqError(f"{source}: layer '{name}' appears twice")
        if entry["encoding"] == "shared" and shapes.get(entry["of"]) != entry["shapes"][0]:
            raise ClipqError(f"{source}: layer '{name}': field 'of' is {reprlib.repr(entry['of'])}, not an earlier "
                             f"layer with weights of shape {entry['shapes'][0]}")
        shapes[name] = entry["shapes"][0]
        if entry["offset"] != end:
            raise ClipqError(f"{source}: layer '{name}': field 'offset' is {entry['offset']}, "
                             f"but the layers before it end at {end}")
        end += entry["length"]
        if end > payload_bytes:
            raise ClipqError(f"{source}: truncated in layer '{name}' ({_bytes(end - payload_bytes)} of it missing)")
    if end < payload_bytes:
        raise ClipqError(f"{source}: {_bytes(payload_bytes - end)} after the last layer "
                         f"(appended data, or a layer missing from the header)")
    decoded = 4 * sum(math.prod(shape) for entry in entries for shape in entry["shapes"])
    limit = max(DECODE_FLOOR, MAX_RATE * (FIXED_BYTES + payload_bytes))
    if decoded > limit:
        raise ClipqError(f"{where}: its layers decode to {decoded / 1e6:,.0f} MB of float32 weights, more than "
                         f"{MAX_RATE} times the file ({limit / 1e6:,.0f} MB at most; the limit of the format)")


def _layer_crc(entry: dict, payload: bytes, version: int = FORMAT_VERSION) -> int:
    """A layer's CRC32: from version 2 over its header entry (all but the CRC, as canonical JSON) and then its
    payload, so that an edited entry fails it; in version 1 over the payload only."""
    if version < 2:
        return zlib.crc32(payload)
    described = json.dumps({key: value for key, value in entry.items() if key != "crc32"},
                           sort_keys=True, separators=(",", ":"))
    return zlib.crc32(payload, zlib.crc32(described.encode()))


# --- the file ----------------------------------------------------------------------------------

def encode(layers: list[Layer], meta: dict | None = None, use_huffman: bool = False) -> bytes:
    """A whole `.clipq` file; fills each layer's `facts` (its entry in the header). ClipqError if a layer
    could not be read back (a name or type the reader refuses)."""
    entries, payloads, offset, stored = [], [], 0, {}
    for layer in layers:
        key = _weights_key(layer)
        owner = stored.get(key)
        if owner is not None and _same_weights(layer, owner):
            entry, payload = encode_shared(layer, owner.name)
        else:
            stored.setdefault(key, layer)
            entry, payload = encode_layer(layer, use_huffman)
        entry.update(offset=offset, length=len(payload))
        entry["crc32"] = _layer_crc(entry, payload)
        layer.facts = entry
        entries.append(entry)
        payloads.append(payload)
        offset += len(payload)
    # version 2 unless a layer is shared, so that a clipq that predates shared layers reads every other file
    version = SHARED_VERSION if any(e["encoding"] == "shared" or "levels" in e for e in entries) else 2
    header = {"format": "clipq", "version": version, "huffman": use_huffman, "meta": meta or {},
              "layers": entries}
    check_header(header, version, offset, "cannot write a .clipq")  # what is written can be read
    return frame(header, version) + b"".join(payloads)


def frame(header: dict, version: int = FORMAT_VERSION) -> bytes:
    """Everything before the payload: magic, version, the header's length and CRC, the zlib-compressed JSON."""
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<III", version, len(packed), zlib.crc32(packed)) + packed


def replace_header(data: bytes, header: dict, version: int | None = None, source: str = "file") -> bytes:
    """The file `data` with `header` (and `version`, if given) in place of its own, the payload kept and the
    header CRC recomputed. Nothing is checked: this is how the fault tests make careful hand edits."""
    old_version, header_len, _ = _fixed_part(data, source)
    return frame(header, old_version if version is None else version) + data[FIXED_BYTES + header_len:]


def _fixed_part(data: bytes, source: str) -> tuple[int, int, int]:
    """(version, header length, header CRC) from the first FIXED_BYTES bytes."""
    if not data:
        raise ClipqError(f"{source}: empty file, not a .clipq file")
    if data[:len(MAGIC)] != MAGIC[:len(data)]:
        raise ClipqError(f"{source}: not a .clipq file (bad magic)")
    if len(data) < FIXED_BYTES:
        raise ClipqError(f"{source}: truncated ({len(data)} bytes; the fixed part alone has {FIXED_BYTES})")
    version, header_len, header_crc = struct.unpack("<III", data[len(MAGIC):FIXED_BYTES])
    if version > FORMAT_VERSION:
        raise ClipqError(f"{source}: format version {version} was written by a newer clipq; "
                         f"this clipq reads versions 1..{FORMAT_VERSION}")
    if version < 1:
        raise ClipqError(f"{source}: format version {version} does not exist (corrupt file)")
    return version, header_len, header_crc


def read_header(data: bytes, source: str = "file") -> tuple[dict, int]:
    """(header, payload start) after checking magic, version, the header's CRC and the whole header
    (`check_header`)."""
    version, header_len, header_crc = _fixed_part(data, source)
    packed = data[FIXED_BYTES:FIXED_BYTES + header_len]
    if len(packed) != header_len:
        raise ClipqError(f"{source}: truncated in the header")
    if zlib.crc32(packed) != header_crc:
        raise ClipqError(f"{source}: header CRC mismatch (corrupt file)")
    try:
        header = json.loads(zlib.decompress(packed))
    except (zlib.error, ValueError, RecursionError):
        raise ClipqError(f"{source}: the header is not zlib-compressed JSON (corrupt file)") from None
    start = FIXED_BYTES + header_len
    check_header(header, version, len(data) - start, source)
    return header, start


def decode(data: bytes, source: str = "file") -> tuple[dict, list[Layer]]:
    """(header, layers) of a `.clipq` file; a one-line ClipqError naming the file and the layer or field on
    any damage or inconsistent edit."""
    header, start = read_header(data, source)
    layers: dict[str, Layer] = {}  # check_header: names unique, a shared entry's owner decoded before it
    for entry in header["layers"]:
        payload = data[start + entry["offset"]:start + entry["offset"] + entry["length"]]
        if _layer_crc(entry, payload, header["version"]) != entry["crc32"]:
            raise ClipqError(f"{source}: layer '{entry['name']}': CRC mismatch (corrupt data or an edited header)")
        try:
            layer = decode_layer(entry, payload, layers.get(entry.get("of")))
        except ValueError as e:
            raise ClipqError(f"{source}: layer '{entry['name']}': {e}") from None
        layer.facts = entry
        layers[layer.name] = layer
    return header, list(layers.values())
