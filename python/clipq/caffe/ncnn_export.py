"""A Caffe deploy net and its weights -> an ncnn model (`.param` text + `.bin` weights), by clipq's own
converter (issue 25, item 2).

The layer mapping follows ncnn's `tools/caffe/caffe2ncnn.cpp`; the weights follow `src/modelbin.cpp`
(Tencent/ncnn a4d2ea1). A weight blob that ncnn loads with `ModelBin::load(w, 0)` (Convolution and InnerProduct
weights) starts with a flag word:
- 0: `w` float32 values (the dense weights);
- any other word whose four bytes do not sum to 0, except the three tags modelbin.cpp treats specially
  (0x01306B47 float16, 0x000D4B38 int8 without a table, 0x0002C056 float32 with scales): a table of 256
  float32 values, then one uint8 index per weight, padded to a multiple of 4 bytes; ncnn decodes it at load
  (`ptr[i] = quantization_value[index[i]]`). clipq writes the word 1, as caffe2ncnn did when it still
  quantized (before ncnn f9e42d4). A compressed layer of a `.clipq` file is exactly such a table: entry 0
  is the zero weight, entries 1..2^b - 1 the codebook, the rest 0; its codes are the indices. The weights
  ncnn decodes are those `clipq decode` writes, bit for bit.
Every other blob (biases, BatchNorm / Scale / Bias parameters) is raw float32, as ncnn loads it.

Value names are those of `net_walk` (Caffe's blob names; the earlier writes of an in-place blob are
`<blob>/<layer>`), so every Caffe blob can be extracted under its own name. ncnn lets each blob have one
reader: a blob read by several layers goes through a `Split` (tops `<blob>_splitncnn_<j>`), as caffe2ncnn
writes it. ncnn runs one sample (no batch axis): a Caffe blob (N, C, H, W) is ncnn's (C, H, W), and an axis
parameter is Caffe's less one.

Caffe semantics ncnn spells differently:
- Pooling: Caffe rounds the output size up and drops a last window that would start in the padding. ncnn's
  `pad_mode` 0 rounds up without that drop, so clipq writes `pad_mode` 1 (explicit pads) with the bottom /
  right pads extended to give Caffe's size. Caffe's AVE divides by the window clipped to the padded input:
  with no pad that is ncnn's `avgpool_count_include_pad` 0; with a pad and no window past the padded input,
  1; otherwise the pad becomes a `Padding` layer of zeros in front of an unpadded pooling (then 0 is exact).
- LRN: ncnn's `bias` is Caffe's `k` across channels; within a channel Caffe uses 1.
- BatchNorm: mean and variance are divided by the stored factor (third blob), eps added to the variance, as
  caffe2ncnn does.
A Caffe type or option with no ncnn counterpart here is refused with one line naming the layer.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from clipq.caffe import net_walk, preflight
from clipq.caffe.net_walk import Shape
from clipq.storage.sparse_codec import Layer
from clipq.util.errors import ClipqError

MAGIC = 7767517        # the first line of a .param file
DENSE_FLAG = 0
TABLE_FLAG = 1         # any word modelbin.cpp reads as "256-entry table + uint8 indices" (see above)
TABLE_SIZE = 256


@dataclass
class NcnnLayer:
    """One line of the .param file and the bytes of its weights in the .bin file."""

    kind: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, object] = field(default_factory=dict)   # id -> int, float or list of floats
    weights: bytes = b""


@dataclass
class NcnnExported:
    """An ncnn model: the text of its `.param`, the bytes of its `.bin`, the layers stored as a table +
    indices (layer -> b), the net's outputs and inputs (blob names)."""

    param: str
    bin: bytes
    compressed: dict[str, int]
    outputs: list[str]
    inputs: list[str]


class _Net:
    """The ncnn layers being built."""

    def __init__(self, weights: net_walk.Weights, shapes: dict[str, Shape | None], source: str):
        self.weights, self.shapes, self.source = weights, shapes, source
        self.layers: list[NcnnLayer] = []
        self.compressed: dict[str, int] = {}

    def add(self, kind: str, layer, bottoms, tops, params=None, weights: bytes = b"", name: str = "") -> None:
        self.layers.append(NcnnLayer(kind, name or layer.name, list(bottoms), list(tops), params or {}, weights))

    def refuse(self, layer, why: str) -> ClipqError:
        return ClipqError(f"{self.source}: layer '{layer.name}' ({layer.type}): {why}, which export-ncnn does "
                          "not convert")

    def shape(self, layer, blob: str) -> Shape:
        shape = self.shapes.get(blob)
        if shape is None:
            raise ClipqError(f"{self.source}: layer '{layer.name}' ({layer.type}): the shape of its input "
                             f"'{blob}' is unknown here; this layer needs it")
        return shape

    def axis(self, layer, blob: str, axis: int) -> int:
        """A Caffe axis as ncnn's (Caffe's less the batch axis); the batch axis itself is refused."""
        axis = axis if axis >= 0 else axis + len(self.shape(layer, blob))
        if axis < 1:
            raise self.refuse(layer, "an operation along the batch axis")
        return axis - 1

    def weight(self, layer, shape: Shape) -> bytes:
        """Blob 0 as ModelBin::load(w, 0) reads it: a table + uint8 indices for a compressed layer, else flag
        0 + float32."""
        stored = self.weights.codes(layer, shape)
        if stored is None:
            return _dense(self.weights.blob(layer, 0, shape))
        self.compressed[layer.name] = stored.bits
        return _table(stored.table, stored.codes)

    def raw(self, array: np.ndarray) -> bytes:
        return np.ascontiguousarray(array, "<f4").tobytes()


def _dense(array: np.ndarray) -> bytes:
    return struct.pack("<I", DENSE_FLAG) + np.ascontiguousarray(array, "<f4").tobytes()


def _table(table: np.ndarray, codes: np.ndarray) -> bytes:
    """The flag word, 256 float32 values (the table, zeros after it), one uint8 index per weight, padded to 4."""
    if table.size > TABLE_SIZE:
        raise ClipqError(f"a table of {table.size} values does not fit ncnn's {TABLE_SIZE}")
    values = np.zeros(TABLE_SIZE, "<f4")
    values[:table.size] = table
    indices = np.ascontiguousarray(codes, np.uint8).reshape(-1).tobytes()
    return struct.pack("<I", TABLE_FLAG) + values.tobytes() + indices + b"\0" * (-len(indices) % 4)


# --- one converter per Caffe layer type: (net, layer, its parameter, input names, output names) -------------

def _convolution(n: _Net, layer, param, x, y) -> None:
    shape = n.shape(layer, layer.bottom[0])
    if param.axis != 1 or len(shape) != 4:
        raise n.refuse(layer, f"a {len(shape) - 2}-D convolution or axis {param.axis}")
    kernel, pad, stride, dilation = preflight.conv_geometry(param, 2)
    group = param.group or 1
    w_shape = (param.num_output, shape[1] // group, *kernel)
    params = {0: param.num_output, 1: kernel[1], 11: kernel[0], 2: dilation[1], 12: dilation[0], 3: stride[1],
              13: stride[0], 4: pad[1], 14: pad[0], 5: int(param.bias_term), 6: math.prod(w_shape)}
    weights = n.weight(layer, w_shape)
    if param.bias_term:
        weights += n.raw(n.weights.blob(layer, 1, (param.num_output,)))
    if group != 1:
        params[7] = group
    n.add("Convolution" if group == 1 else "ConvolutionDepthWise", layer, x, y, params, weights)


def _inner_product(n: _Net, layer, param, x, y) -> None:
    shape = n.shape(layer, layer.bottom[0])
    if n.axis(layer, layer.bottom[0], param.axis) != 0:
        raise n.refuse(layer, f"an InnerProduct along axis {param.axis} (ncnn's flattens all but the batch)")
    inputs = math.prod(shape[1:])
    if param.transpose:  # Caffe keeps (K, N): ncnn wants (N, K)
        stored = n.weights.codes(layer, (inputs, param.num_output))
        if stored is None:
            weights = _dense(n.weights.blob(layer, 0, (inputs, param.num_output)).T)
        else:
            n.compressed[layer.name] = stored.bits
            weights = _table(stored.table, stored.codes.T)
    else:
        weights = n.weight(layer, (param.num_output, inputs))
    if param.bias_term:
        weights += n.raw(n.weights.blob(layer, 1, (param.num_output,)))
    n.add("InnerProduct", layer, x, y, {0: param.num_output, 1: int(param.bias_term), 2: inputs * param.num_output},
          weights)


def _pooling(n: _Net, layer, param, x, y) -> None:
    param = layer.pooling_param
    pb2 = type(param)
    if len(layer.top) > 1:
        raise n.refuse(layer, "a second top (the max mask)")
    if param.pool not in (pb2.MAX, pb2.AVE):
        raise n.refuse(layer, f"pool {pb2.PoolMethod.Name(param.pool)}")
    kind = 0 if param.pool == pb2.MAX else 1   # ncnn's PoolMethod_MAX / _AVE
    if param.global_pooling:
        n.add("Pooling", layer, x, y, {0: kind, 4: 1})
        return
    shape = n.shape(layer, layer.bottom[0])
    if len(shape) != 4:
        raise n.refuse(layer, f"a pooling of a {len(shape)}-D blob")
    kernel, pad, stride = preflight.pool_geometry(param)
    # the bottom / right pad that gives Caffe's output size with ncnn's rounded-down (valid) windows
    extra = [max(0, (preflight.pooled_size(size, k, p, s) - 1) * s + k - (size + 2 * p))
             for size, k, p, s in zip(shape[2:], kernel, pad, stride)]
    bottom = x[0]
    include_pad = 0
    if kind == 1 and any(pad) and any(extra):  # Caffe counts the pad, not what lies past it: pad with zeros
        bottom = f"{y[0]}/padded"
        n.add("Padding", layer, x, [bottom], {0: pad[0], 1: pad[0], 2: pad[1], 3: pad[1]},
              name=f"{layer.name}/padding")
        pad = [0, 0]
    elif kind == 1 and any(pad):
        include_pad = 1
    n.add("Pooling", layer, [bottom], y, {0: kind, 1: kernel[1], 11: kernel[0], 2: stride[1], 12: stride[0],
                                          3: pad[1], 14: pad[1] + extra[1], 13: pad[0], 15: pad[0] + extra[0],
                                          5: 1, 6: include_pad})


def _relu(n: _Net, layer, param, x, y) -> None:
    slope = layer.relu_param.negative_slope
    n.add("ReLU", layer, x, y, {0: float(slope)} if slope else {})


def _lrn(n: _Net, layer, param, x, y) -> None:
    p = layer.lrn_param
    if p.local_size % 2 == 0:
        raise ClipqError(f"{n.source}: layer '{layer.name}' (LRN): local_size {p.local_size} is even (Caffe "
                         "requires an odd size)")
    within = p.norm_region == type(p).WITHIN_CHANNEL
    n.add("LRN", layer, x, y, {0: int(within), 1: p.local_size, 2: float(p.alpha), 3: float(p.beta),
                               4: 1.0 if within else float(p.k)})


def _softmax(n: _Net, layer, param, x, y) -> None:
    n.add("Softmax", layer, x, y, {0: n.axis(layer, layer.bottom[0], layer.softmax_param.axis), 1: 1})


def _concat(n: _Net, layer, param, x, y) -> None:
    p = layer.concat_param
    n.add("Concat", layer, x, y, {0: n.axis(layer, layer.bottom[0], p.concat_dim if p.HasField("concat_dim")
                                               else p.axis)})


def _eltwise(n: _Net, layer, param, x, y) -> None:
    p = layer.eltwise_param
    coeff = [float(c) for c in p.coeff]
    if coeff and (p.operation != type(p).SUM or len(coeff) != len(x)):
        raise ClipqError(f"{n.source}: layer '{layer.name}' (Eltwise): coeff needs operation SUM and one value per "
                         f"bottom ({len(x)})")
    params = {0: int(p.operation)}  # Caffe's PROD 0 / SUM 1 / MAX 2 are ncnn's
    if coeff:
        params[-23301] = coeff
    n.add("Eltwise", layer, x, y, params)


def _batch_norm(n: _Net, layer, param, x, y) -> None:
    p = layer.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise n.refuse(layer, "use_global_stats false (each batch's own statistics)")
    mean, var = n.weights.blob(layer, 0).reshape(-1), n.weights.blob(layer, 1).reshape(-1)
    stored = n.weights.blob(layer, 2).reshape(-1)
    factor = np.float32(0) if stored[0] == 0 else np.float32(1) / stored[0]  # BatchNormLayer::Forward_cpu
    channels = mean.size
    weights = (n.raw(np.ones(channels, np.float32)) + n.raw(mean * factor)
               + n.raw(var * factor + np.float32(p.eps)) + n.raw(np.zeros(channels, np.float32)))
    n.add("BatchNorm", layer, x, y, {0: channels}, weights)


def _per_channel(n: _Net, layer, p, x) -> int:
    """The channel count of a Scale / Bias that ncnn can run: one bottom, parameters along axis 1 only."""
    shape = n.shape(layer, layer.bottom[0])
    axis = p.axis if p.axis >= 0 else p.axis + len(shape)
    axes = len(shape) - axis if p.num_axes == -1 else p.num_axes
    if len(x) > 1 or axis != 1 or axes != 1:
        raise n.refuse(layer, "a second bottom, or parameters along axes other than the channel axis 1")
    return shape[1]


def _scale(n: _Net, layer, param, x, y) -> None:
    p = layer.scale_param
    channels = _per_channel(n, layer, p, x)
    weights = n.raw(n.weights.blob(layer, 0, (channels,)))
    if p.bias_term:
        weights += n.raw(n.weights.blob(layer, 1, (channels,)))
    n.add("Scale", layer, x, y, {0: channels, 1: int(p.bias_term)}, weights)


def _bias(n: _Net, layer, param, x, y) -> None:
    channels = _per_channel(n, layer, layer.bias_param, x)
    n.add("Bias", layer, x, y, {0: channels}, n.raw(n.weights.blob(layer, 0, (channels,))))


def _flatten(n: _Net, layer, param, x, y) -> None:
    p = layer.flatten_param
    shape = n.shape(layer, layer.bottom[0])
    if n.axis(layer, layer.bottom[0], p.axis) != 0 or p.end_axis % len(shape) != len(shape) - 1:
        raise n.refuse(layer, f"a Flatten of axes {p.axis}..{p.end_axis} (ncnn's flattens all but the batch)")
    n.add("Flatten", layer, x, y)


def _power(n: _Net, layer, param, x, y) -> None:
    p = layer.power_param
    n.add("Power", layer, x, y, {0: float(p.power), 1: float(p.scale), 2: float(p.shift)})


def _same(kind: str) -> Callable:
    def convert(n: _Net, layer, param, x, y) -> None:
        n.add(kind, layer, x, y)
    return convert


CONVERTERS: dict[str, Callable] = {
    "Convolution": _convolution, "InnerProduct": _inner_product, "Pooling": _pooling, "ReLU": _relu, "LRN": _lrn,
    "Softmax": _softmax, "Concat": _concat, "Eltwise": _eltwise, "BatchNorm": _batch_norm, "Scale": _scale,
    "Bias": _bias, "Dropout": _same("Dropout"), "Split": _same("Split"), "Flatten": _flatten, "Power": _power,
    "Sigmoid": _same("Sigmoid"), "TanH": _same("TanH"),
}


# --- the net ------------------------------------------------------------------------------------------------

def convert(net_param, weights: dict[str, Layer], source: str, weights_source: str = "the weights") -> NcnnExported:
    """The ncnn model of a deploy net (TEST phase) with `weights` (layer name -> Layer: dense blobs, or codes +
    codebook for a compressed layer); `source` and `weights_source` name the files in errors."""
    net = net_walk.walk(net_param, source, CONVERTERS, "export-ncnn")
    n = _Net(net_walk.Weights(weights, source, weights_source), net.shapes, source)
    for name in net.inputs:
        shape = net.shapes[name]
        n.layers.append(NcnnLayer("Input", name, [], [name], dict(zip((0, 1, 2), reversed(shape[1:])))))
    current = {name: name for name in net.inputs}
    for layer, tops in zip(net.layers, net.tops):
        kind, param = preflight.wrapped(layer)
        CONVERTERS[kind](n, layer, param, [current[b] for b in layer.bottom], tops)
        current.update(zip(layer.top, tops))
    layers = _split_shared(n.layers)
    _check_names(layers, source)
    blobs = {top for ncnn_layer in layers for top in ncnn_layer.tops}
    lines = [str(MAGIC), f"{len(layers)} {len(blobs)}"] + [_line(ncnn_layer) for ncnn_layer in layers]
    return NcnnExported("\n".join(lines) + "\n", b"".join(ncnn_layer.weights for ncnn_layer in layers),
                        n.compressed, net.outputs, net.inputs)


def _split_shared(layers: list[NcnnLayer]) -> list[NcnnLayer]:
    """A `Split` after each blob that several layers read (ncnn lets a blob have one reader), its readers
    renamed to its tops in order."""
    readers: dict[str, int] = {}
    for ncnn_layer in layers:
        for blob in ncnn_layer.bottoms:
            readers[blob] = readers.get(blob, 0) + 1
    taken: dict[str, int] = {}
    out, count = [], 0
    for ncnn_layer in layers:
        ncnn_layer.bottoms = [_reader(blob, readers, taken) for blob in ncnn_layer.bottoms]
        out.append(ncnn_layer)
        for blob in ncnn_layer.tops:
            if readers.get(blob, 0) > 1:
                out.append(NcnnLayer("Split", f"splitncnn_{count}", [blob],
                                     [f"{blob}_splitncnn_{j}" for j in range(readers[blob])]))
                count += 1
    return out


def _reader(blob: str, readers: dict[str, int], taken: dict[str, int]) -> str:
    if readers[blob] == 1:
        return blob
    j = taken[blob] = taken.get(blob, -1) + 1
    return f"{blob}_splitncnn_{j}"


def _check_names(layers: list[NcnnLayer], source: str) -> None:
    """ncnn reads names as whitespace-free tokens of at most 255 characters; layer and blob names are unique."""
    seen: set[str] = set()
    for ncnn_layer in layers:
        for name in [ncnn_layer.name] + ncnn_layer.tops:
            if len(name) > 255 or not name or any(c.isspace() for c in name):
                raise ClipqError(f"{source}: the name '{name}' cannot be written to an ncnn .param file (it must "
                                 "be 1..255 characters without spaces)")
    names = [ncnn_layer.name for ncnn_layer in layers]
    for name in names:
        if name in seen:
            raise ClipqError(f"{source}: two ncnn layers would be named '{name}'")
        seen.add(name)


def _line(layer: NcnnLayer) -> str:
    fields = [f"{layer.kind:<16}", f"{layer.name:<16}", str(len(layer.bottoms)), str(len(layer.tops)),
              *layer.bottoms, *layer.tops]
    for key, value in layer.params.items():
        if isinstance(value, list):
            fields.append(f"{key}={len(value)}," + ",".join(_float(v) for v in value))
        else:
            fields.append(f"{key}={_float(value) if isinstance(value, float) else int(value)}")
    return " ".join(fields)


def _float(value: float) -> str:
    """A float as ncnn's ParamDict parses it: 9 significant digits (a float32's round trip), at most 15
    characters (its buffer holds 16), always with a '.' and an exponent so that it is read as a float."""
    return f"{np.float32(value):.8e}"
