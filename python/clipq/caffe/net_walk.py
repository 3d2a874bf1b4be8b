"""What the exporters (`onnx_export`, `ncnn_export`) share: the walk over a deploy net, its value names, its
weights (Caffe's geometry of a convolution or a pooling is preflight's, which infers the shapes).

- `walk`: the layers of the deploy net in TEST phase, each with the names of its tops, the graph's inputs and
  the blob shapes preflight infers; a layer type the exporter does not know is refused by name.
- `value_names`: Caffe's blob names as value names. A blob written by several layers (an in-place ReLU
  writes the blob it reads) gets the plain name at its last write, `<blob>/<layer>` before, so every Caffe
  blob's final value (what pycaffe's `net.blobs[name]` holds) is found under its Caffe name.
- `Weights`: a layer's dense float32 blobs, or its codes + codebook (code 0 = a zero weight, code j =
  codebook[j - 1]) if the `.clipq` file stores it compressed, each checked against the shape the deploy says.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass

import numpy as np

from clipq.caffe import preflight
from clipq.storage.sparse_codec import Layer
from clipq.util.errors import ClipqError

Shape = tuple[int, ...]


@dataclass
class Walk:
    """A deploy net ready to export: its inputs (blob names), the layers after the Input layers with the value
    names of their tops, the blob shapes preflight infers (None where it cannot) and the net's outputs (the
    value names of the blobs no layer reads)."""

    inputs: list[str]
    layers: list            # caffe_pb2.LayerParameter, Input layers left out
    tops: list[list[str]]   # per layer, the value names of its tops
    shapes: dict[str, Shape | None]
    outputs: list[str]
    output_blobs: list[str]  # the Caffe blob names of the outputs


def walk(net_param, source: str, known: Container[str], command: str) -> Walk:
    """The layers of `net_param` (TEST phase) for an exporter that converts the layer types in `known` (and
    Input); `command` names the exporter in the error for any other type."""
    if len(net_param.layers):
        raise ClipqError(f"{source}: uses Caffe's deprecated V1 'layers' format; upgrade it first "
                         "(Caffe's tools/upgrade_net_proto_text)")
    shapes = preflight.blob_shapes(net_param, source, "TEST", read_data=False, labels=False)
    layers = [layer for layer in net_param.layer if preflight.in_phase(layer, "TEST")]
    for layer in layers:
        kind, _ = preflight.wrapped(layer)
        if kind not in known and kind != "Input":
            raise ClipqError(f"{source}: layer '{layer.name}' has type {kind}, which {command} does not convert")
    inputs = list(preflight.input_shapes(net_param))
    for layer in layers:
        if layer.type == "Input":
            inputs += [top for top in layer.top if top not in inputs]
    for name in inputs:
        if not shapes.get(name):
            raise ClipqError(f"{source}: input '{name}' has no shape (input_param.shape or input_shape)")
    layers = [layer for layer in layers if layer.type != "Input"]
    tops = value_names(layers, inputs)
    available, current = list(inputs), {name: name for name in inputs}
    for layer, names in zip(layers, tops):
        for blob in layer.bottom:
            if blob in available:
                available.remove(blob)
        for blob, name in zip(layer.top, names):
            current[blob] = name
            available.append(blob)
    return Walk(inputs, layers, tops, shapes, [current[blob] for blob in available], available)


def value_names(layers, inputs: list[str]) -> list[list[str]]:
    """Per layer, the value names of its tops: the plain blob name at a blob's last write (a graph input keeps
    it), `<blob>/<layer>` before."""
    last = {}
    for i, layer in enumerate(layers):
        for top in layer.top:
            last[top] = i
    used = set(inputs)
    names = []
    for i, layer in enumerate(layers):
        row = []
        for top in layer.top:
            wanted = top if last[top] == i and top not in used else f"{top}/{layer.name}"
            name, k = wanted, 1
            while name in used:
                k += 1
                name = f"{wanted}_{k}"
            used.add(name)
            row.append(name)
        names.append(row)
    return names


@dataclass(frozen=True)
class Codes:
    """A compressed layer's weights: uint8 codes of the weights' shape and the table they index (entry 0 is
    the zero weight, then the codebook: 2^b entries at most)."""

    codes: np.ndarray
    table: np.ndarray
    bits: int


class Weights:
    """The weights of a net by layer name (dense blobs, or codes + codebook for a compressed layer); `source`
    and `weights_source` name the deploy and the weights file in errors."""

    def __init__(self, layers: dict[str, Layer], source: str, weights_source: str):
        self.layers, self.source, self.weights_source = layers, source, weights_source

    def blob(self, layer, index: int, shape: Shape | None = None) -> np.ndarray:
        """Dense float32 blob `index` of the layer (reshaped to `shape` if given)."""
        stored = self.layers.get(layer.name)
        if stored is None:
            raise ClipqError(f"{self.weights_source}: no weights for layer '{layer.name}' ({layer.type}) of "
                             f"{self.source}")
        if index >= len(stored.blobs):
            raise ClipqError(f"{self.weights_source}: layer '{layer.name}' has {len(stored.blobs)} blob(s); "
                             f"{self.source} needs blob {index} too ({layer.type})")
        array = np.asarray(stored.blobs[index], np.float32)
        return array if shape is None else self.fit(layer, index, array, shape)

    def fit(self, layer, index: int, array: np.ndarray, shape: Shape) -> np.ndarray:
        """`array` reshaped to `shape`, or an error naming the layer if its size differs."""
        if array.size != math.prod(shape):
            raise ClipqError(f"{self.weights_source}: layer '{layer.name}' ({layer.type}) blob {index} has shape "
                             f"{'x'.join(map(str, array.shape))}; {self.source} expects {'x'.join(map(str, shape))}")
        return array.reshape(shape)  # e.g. a legacy 4-D (1, 1, N, K) InnerProduct blob

    def codes(self, layer, shape: Shape) -> Codes | None:
        """The layer's weights (blob 0) as codes of `shape` + table if the file stores them compressed."""
        stored = self.layers.get(layer.name)
        if stored is None or not stored.compressed:
            return None
        codes = self.fit(layer, 0, np.asarray(stored.codes, np.uint8), shape)
        table = np.concatenate([np.zeros(1, np.float32), np.asarray(stored.codebook, np.float32)])
        return Codes(codes, table, stored.bits)

