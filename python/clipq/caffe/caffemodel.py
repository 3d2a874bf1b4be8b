"""Fast caffemodel weights I/O: the protobuf wire format read and written directly with numpy.

A caffemodel is a binary `NetParameter`; its weights are packed float32 fields inside
`layer[i].blobs[j].data`. Through the protobuf runtime, a 244 MB AlexNet costs a parse plus copies
into numpy (and seconds to fill a repeated field); here the float data is viewed in place
(`np.frombuffer` on a memory map) and written from the arrays' own buffers. Only what loading weights
needs is read or written: each layer's name, type and blobs (Caffe's `CopyTrainedLayersFrom` matches
layers by name and checks blob shapes). Pure numpy: no Caffe or protobuf import.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError

# Field numbers (caffe.proto)
NET_LAYER, NET_LAYERS_V1 = 100, 2
LAYER_NAME, LAYER_TYPE, LAYER_BLOBS = 1, 2, 7
BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH = 1, 2, 3, 4
BLOB_DATA, BLOB_SHAPE, BLOB_DOUBLE_DATA = 5, 7, 8
SHAPE_DIM = 1
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


@dataclass
class LayerWeights:
    name: str
    type: str
    blobs: list[np.ndarray]


def _read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (begin, end) of a LEN field) of a message's fields."""
    pos = start
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == LEN:
            length, pos = _read_varint(buf, pos)
            value, pos = (pos, pos + length), pos + length
        elif wire == FIXED32:
            value, pos = (pos, pos + 4), pos + 4
        elif wire == FIXED64:
            value, pos = (pos, pos + 8), pos + 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("field runs past the end of its message")
        yield number, wire, value


def _read_blob(buf, start: int, end: int) -> np.ndarray:
    dims, legacy, chunks, dtype = [], {}, [], "<f4"
    for number, wire, value in _fields(buf, start, end):
        if number == BLOB_SHAPE:
            for dim_number, dim_wire, dim in _fields(buf, *value):
                if dim_number == SHAPE_DIM and dim_wire == LEN:  # packed
                    pos, stop = dim
                    while pos < stop:
                        d, pos = _read_varint(buf, pos)
                        dims.append(d)
                elif dim_number == SHAPE_DIM:
                    dims.append(dim)
        elif number in (BLOB_DATA, BLOB_DOUBLE_DATA):
            dtype = "<f4" if number == BLOB_DATA else "<f8"
            chunks.append(value)  # packed (LEN) or one FIXED32/64 value: (begin, end) either way
        elif number in (BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH):
            legacy[number] = value
    shape = tuple(dims) if dims else tuple(legacy.get(n, 0) for n in (BLOB_NUM, BLOB_CHANNELS, BLOB_HEIGHT, BLOB_WIDTH))
    size = int(np.prod(shape, dtype=np.int64))
    if len(chunks) == 1:
        begin, stop = chunks[0]
        data = np.frombuffer(buf, dtype, (stop - begin) // np.dtype(dtype).itemsize, begin)
    else:
        data = np.concatenate([np.frombuffer(buf, dtype, (e - b) // np.dtype(dtype).itemsize, b) for b, e in chunks]) \
            if chunks else np.zeros(0, dtype)
    if data.size != size:
        raise ValueError(f"blob of shape {shape} holds {data.size} values")
    return data.astype(np.float32, copy=False).reshape(shape)


def _read_layer(buf, start: int, end: int) -> LayerWeights:
    name = layer_type = ""
    blobs = []
    for number, _, value in _fields(buf, start, end):
        if number == LAYER_NAME:
            name = bytes(buf[value[0]:value[1]]).decode()
        elif number == LAYER_TYPE:
            layer_type = bytes(buf[value[0]:value[1]]).decode()
        elif number == LAYER_BLOBS:
            blobs.append(_read_blob(buf, *value))
    return LayerWeights(name, layer_type, blobs)


def read(path: str | os.PathLike) -> list[LayerWeights]:
    """The layers of a caffemodel (name, type, float32 blobs; arrays are read-only views of the file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
    except OSError as e:
        raise ClipqError(f"{path}: cannot read caffemodel ({e.strerror})") from None
    layers = []
    try:
        for number, wire, value in _fields(buf, 0, len(buf)):
            if number == NET_LAYERS_V1:
                raise ClipqError(f"{path}: uses Caffe's deprecated V1 'layers' format; upgrade it first "
                                 "(Caffe's tools/upgrade_net_proto_binary)")
            if number == NET_LAYER and wire == LEN:
                layers.append(_read_layer(buf, *value))
    except (ValueError, IndexError) as e:
        raise ClipqError(f"{path}: not a valid caffemodel ({e or 'truncated'})") from None
    return layers


def is_v1(path: str | os.PathLike) -> bool:
    """Whether a caffemodel holds Caffe's deprecated V0/V1 `layers` (field 2; top-level fields only)."""
    try:
        with open(path, "rb") as f:
            if not os.fstat(f.fileno()).st_size:
                return False
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ClipqError(f"{path}: cannot read caffemodel ({e.strerror})") from None
    try:
        return any(number == NET_LAYERS_V1 for number, _, _ in _fields(buf, 0, len(buf)))
    except (ValueError, IndexError) as e:
        raise ClipqError(f"{path}: not a valid caffemodel ({e or 'truncated'})") from None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _len_field(number: int, length: int) -> bytes:
    return _varint(number << 3 | LEN) + _varint(length)


def blob_header(array: np.ndarray) -> bytes:
    """A BlobProto's bytes up to its float data: shape (field 7) and the data field's tag and length."""
    dims = b"".join(_varint(int(d)) for d in array.shape)
    shape = _len_field(SHAPE_DIM, len(dims)) + dims
    return _len_field(BLOB_SHAPE, len(shape)) + shape + _len_field(BLOB_DATA, 4 * array.size)


def encode_blob(array: np.ndarray) -> bytes:
    """A whole BlobProto (shape + packed float32 data)."""
    return blob_header(array) + np.ascontiguousarray(array, "<f4").tobytes()


def _write_layer(f: BinaryIO, layer: LayerWeights) -> None:
    name, layer_type = layer.name.encode(), layer.type.encode()
    head = _len_field(LAYER_NAME, len(name)) + name + _len_field(LAYER_TYPE, len(layer_type)) + layer_type
    blobs = [(blob_header(b), np.ascontiguousarray(b, "<f4")) for b in layer.blobs]
    blob_fields = [(_len_field(LAYER_BLOBS, len(h) + a.nbytes), h, a) for h, a in blobs]
    length = len(head) + sum(len(t) + len(h) + a.nbytes for t, h, a in blob_fields)
    f.write(_len_field(NET_LAYER, length) + head)
    for tag, header, array in blob_fields:
        f.write(tag + header)
        f.write(memoryview(array).cast("B"))


def write(layers: list[LayerWeights], path: str | os.PathLike) -> None:
    """Write a caffemodel (a NetParameter with each layer's name, type and blobs), atomically."""
    with atomic_write(path, "wb") as f:
        for layer in layers:
            _write_layer(f, layer)
