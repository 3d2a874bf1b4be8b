"""A Caffe deploy net and its weights -> an ONNX model, by clipq's own converter (issue 25).

The converter reads the parsed NetParameter layer by layer, in TEST phase, and writes ONNX nodes with the
`onnx` package (opset 13 by default). Caffe's blob names are the ONNX value names: a blob that several layers
write (an in-place ReLU writes the blob it reads) gets the plain name at its last write, so every Caffe blob's
final value, and every output of the net, is found under its Caffe name; earlier writes are named
`<blob>/<layer>`.

A layer stored compressed (a `.clipq` layer: b-bit codes, code 0 = a zero weight, code j = codebook[j - 1])
keeps its codes: a uint8 initializer of the weights' shape (UINT4, two codes a byte, for b <= 4 from opset
21) -> `Cast` to int32 (`Gather` refuses uint8 indices) -> `Gather` from the codebook with a 0 put in front
-> the weight input of `Conv` / `Gemm`. The values are those `clipq decode` writes, bit for bit. Every other
blob is a dense float32 initializer.

Caffe semantics that ONNX spells differently (each checked against Caffe by tests/caffe/test_onnx_export.py):
- Pooling rounds its output size up and drops a last window that would start in the padding. ONNX's
  `ceil_mode=1` rounds up but its shape inference does not drop that window, so where Caffe drops it (its size
  is then the rounded-down one) `ceil_mode=0` is written. Caffe's AVE divides by the window clipped to the
  padded input, which is onnxruntime's `count_include_pad=1` with `ceil_mode=1`.
- InnerProduct flattens from its axis: `Flatten` + `Gemm` (transB=1; transB=0 for `transpose: true`), the
  leading axes restored by a `Reshape` when the axis is not 1.
- BatchNorm stores mean and variance times a factor (its third blob): they are divided by it here, as Caffe
  does; a BatchNorm that would use the batch's statistics in TEST is refused.
- LRN ACROSS_CHANNELS is ONNX's `LRN` (same alpha / size); WITHIN_CHANNEL is built from an average pooling
  of the squares, as Caffe builds it.

A layer type not listed in CONVERTERS is refused with its name: nothing is skipped silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clipq.caffe import net_walk, preflight
from clipq.caffe.net_walk import Shape
from clipq.storage.sparse_codec import Layer
from clipq.util.errors import ClipqError
DEFAULT_OPSET = 13
UINT4_OPSET = 21     # the first opset with 4-bit integer tensors
OPSETS = range(13, 22)
PRODUCER = "clipq"


@dataclass
class Exported:
    """An ONNX model and what the converter did: the layers kept as codes + codebook, the net's outputs."""

    model: object                  # onnx.ModelProto
    compressed: dict[str, str]     # layer -> its codes' element type ("UINT8" / "UINT4")
    outputs: list[str]


class _Graph:
    """The ONNX graph being built: nodes, initializers, unique value names, Caffe blob -> current value."""

    def __init__(self, opset: int, weights: net_walk.Weights, shapes: dict[str, Shape | None], source: str):
        import onnx  # lazy: only export-onnx needs it

        self.onnx = onnx
        self.helper, self.numpy_helper, self.T = onnx.helper, onnx.numpy_helper, onnx.TensorProto
        self.opset, self.weights, self.shapes, self.source = opset, weights, shapes, source
        self.nodes, self.initializers, self.inputs, self.used = [], [], [], set()
        self.current: dict[str, str] = {}   # Caffe blob -> ONNX value holding it now
        self.compressed: dict[str, str] = {}

    def name(self, wanted: str) -> str:
        """`wanted`, or `wanted_2`, `_3`, ... if it is taken: every value is defined once."""
        name, i = wanted, 1
        while name in self.used:
            i += 1
            name = f"{wanted}_{i}"
        self.used.add(name)
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, layer: str = "", **attrs) -> str:
        """Add one node; return its output's name (`output`, or a fresh one named after the layer and op)."""
        out = output or self.name(f"{layer}/{op}")
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=self.name(f"{layer}/{op}#node"), **attrs))
        return out

    def constant(self, array: np.ndarray, wanted: str) -> str:
        """A float32 / int64 initializer."""
        name = self.name(wanted)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def blob(self, layer, index: int, shape: Shape | None = None) -> np.ndarray:
        """Dense float32 blob `index` of the layer's weights (reshaped to `shape` if given)."""
        return self.weights.blob(layer, index, shape)

    def weight(self, layer, shape: Shape) -> str:
        """The value of the layer's weights (blob 0) of `shape`: codes -> Cast -> Gather for a compressed
        layer, else a float32 initializer."""
        stored = self.weights.codes(layer, shape)
        if stored is None:
            return self.constant(self.blob(layer, 0, shape), f"{layer.name}/weights")
        codes, codebook = stored.codes, stored.table
        name = self.name(f"{layer.name}/codes")
        if self.opset >= UINT4_OPSET and stored.bits <= 4:
            packed = _pack_uint4(codes.reshape(-1))
            tensor = self.helper.make_tensor(name, self.T.UINT4, codes.shape, packed, raw=True)
            self.compressed[layer.name] = "UINT4"
        else:
            tensor = self.numpy_helper.from_array(codes, name)
            self.compressed[layer.name] = "UINT8"
        self.initializers.append(tensor)
        book = self.constant(codebook, f"{layer.name}/codebook")
        index = self.node("Cast", [name], layer=layer.name, to=self.T.INT32)
        return self.node("Gather", [book, index], self.name(f"{layer.name}/weights"), layer=layer.name, axis=0)

    def shape(self, layer, blob: str) -> Shape:
        """The Caffe shape of a blob the layer reads; an error if preflight could not infer it."""
        shape = self.shapes.get(blob)
        if shape is None:
            raise ClipqError(f"{self.source}: layer '{layer.name}' ({layer.type}): the shape of its input "
                             f"'{blob}' is unknown here (it follows a layer whose output shape is not inferred, "
                             "e.g. a Reshape); this layer needs it")
        return shape

    def axis(self, layer, blob: str, axis: int) -> int:
        """A Caffe axis made non-negative (the input's rank is looked up only for a negative one)."""
        return axis if axis >= 0 else axis + len(self.shape(layer, blob))


def _pack_uint4(codes: np.ndarray) -> bytes:
    """ONNX's 4-bit layout: element 2i in the low nibble of byte i, element 2i + 1 in the high one."""
    padded = np.zeros(codes.size + codes.size % 2, np.uint8)
    padded[:codes.size] = codes
    return (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8).tobytes()


# --- one converter per Caffe layer type: (graph, layer, its parameter, input values, output names) ------------

def _convolution(g: _Graph, layer, param, x: list[str], y: list[str]) -> None:
    if param.axis != 1:
        raise ClipqError(f"{g.source}: layer '{layer.name}' (Convolution): axis {param.axis} is not converted "
                         "(only the channel axis 1)")
    shape = g.shapes.get(layer.bottom[0])
    if shape is not None:
        n, channels = len(shape) - 2, shape[1]
    else:  # after a Reshape: the weights' own shape says it
        w = g.blob(layer, 0)
        n, channels = w.ndim - 2, w.shape[1] * (param.group or 1)
    kernel, pad, stride, dilation = preflight.conv_geometry(param, n)
    group = param.group or 1
    inputs = [x[0], g.weight(layer, (param.num_output, channels // group, *kernel))]
    if param.bias_term:
        inputs.append(g.constant(g.blob(layer, 1, (param.num_output,)), f"{layer.name}/bias"))
    g.node("Conv", inputs, y[0], layer.name, kernel_shape=kernel, pads=pad + pad, strides=stride,
           dilations=dilation, group=group)


def _inner_product(g: _Graph, layer, param, x: list[str], y: list[str]) -> None:
    axis = g.axis(layer, layer.bottom[0], param.axis)
    shape = g.shapes.get(layer.bottom[0])
    if shape is not None:
        inputs = math.prod(shape[axis:])
    else:
        inputs = g.blob(layer, 0).size // param.num_output
    w_shape = (inputs, param.num_output) if param.transpose else (param.num_output, inputs)
    flat = g.node("Flatten", [x[0]], layer=layer.name, axis=axis)
    operands = [flat, g.weight(layer, w_shape)]
    if param.bias_term:
        operands.append(g.constant(g.blob(layer, 1, (param.num_output,)), f"{layer.name}/bias"))
    if axis == 1:
        g.node("Gemm", operands, y[0], layer.name, transB=0 if param.transpose else 1)
        return
    product = g.node("Gemm", operands, layer=layer.name, transB=0 if param.transpose else 1)
    leading = g.node("Slice", [g.node("Shape", [x[0]], layer=layer.name), g.constant(np.array([0]), "zero"),
                               g.constant(np.array([axis]), f"{layer.name}/axis")], layer=layer.name)
    target = g.node("Concat", [leading, g.constant(np.array([param.num_output]), f"{layer.name}/num_output")],
                    layer=layer.name, axis=0)
    g.node("Reshape", [product, target], y[0], layer.name)


def _pooling(g: _Graph, layer, param, x: list[str], y: list[str]) -> None:
    param = layer.pooling_param
    pb2 = type(param)
    if len(layer.top) > 1:
        raise ClipqError(f"{g.source}: layer '{layer.name}' (Pooling): a second top (the max mask) is not converted")
    if param.pool not in (pb2.MAX, pb2.AVE):
        raise ClipqError(f"{g.source}: layer '{layer.name}' (Pooling): pool {pb2.PoolMethod.Name(param.pool)} is "
                         "not converted (MAX and AVE are)")
    op = "Max" if param.pool == pb2.MAX else "Average"
    if param.global_pooling:
        g.node(f"Global{op}Pool", x, y[0], layer.name)
        return
    kernel, pad, stride = preflight.pool_geometry(param)
    floor = getattr(param, "round_mode", None) == getattr(pb2, "FLOOR", -1)
    shape = g.shapes.get(layer.bottom[0])
    if not floor and shape is not None:
        # where Caffe drops a last window starting in the padding, its size is the rounded-down one: say so
        floor = all(preflight.pooled_size(size, k, p, s) == (size + 2 * p - k) // s + 1
                    for size, k, p, s in zip(shape[2:], kernel, pad, stride))
    attrs = {"kernel_shape": kernel, "pads": pad + pad, "strides": stride, "ceil_mode": 0 if floor else 1}
    if op == "Average":
        attrs["count_include_pad"] = 1
    g.node(f"{op}Pool", x, y[0], layer.name, **attrs)


def _relu(g: _Graph, layer, param, x, y) -> None:
    slope = layer.relu_param.negative_slope
    if slope:
        g.node("LeakyRelu", x, y[0], layer.name, alpha=slope)
    else:
        g.node("Relu", x, y[0], layer.name)


def _lrn(g: _Graph, layer, param, x, y) -> None:
    p = layer.lrn_param
    if p.local_size % 2 == 0:
        raise ClipqError(f"{g.source}: layer '{layer.name}' (LRN): local_size {p.local_size} is even (Caffe "
                         "requires an odd size)")
    if p.norm_region == type(p).ACROSS_CHANNELS:
        g.node("LRN", x, y[0], layer.name, size=p.local_size, alpha=p.alpha, beta=p.beta, bias=p.k)
        return
    # WITHIN_CHANNEL, as Caffe's LRNLayer builds it: x * (1 + alpha * avgpool(x^2))^-beta (pad counted)
    half = (p.local_size - 1) // 2
    square = g.node("Mul", [x[0], x[0]], layer=layer.name)
    mean = g.node("AveragePool", [square], layer=layer.name, kernel_shape=[p.local_size] * 2, pads=[half] * 4,
                  strides=[1, 1], count_include_pad=1)
    scaled = g.node("Mul", [mean, g.constant(np.float32(p.alpha), f"{layer.name}/alpha")], layer=layer.name)
    base = g.node("Add", [scaled, g.constant(np.float32(1), f"{layer.name}/one")], layer=layer.name)
    scale = g.node("Pow", [base, g.constant(np.float32(-p.beta), f"{layer.name}/beta")], layer=layer.name)
    g.node("Mul", [x[0], scale], y[0], layer.name)


def _softmax(g: _Graph, layer, param, x, y) -> None:
    g.node("Softmax", x, y[0], layer.name, axis=layer.softmax_param.axis)


def _concat(g: _Graph, layer, param, x, y) -> None:
    p = layer.concat_param
    g.node("Concat", x, y[0], layer.name, axis=p.concat_dim if p.HasField("concat_dim") else p.axis)


def _eltwise(g: _Graph, layer, param, x, y) -> None:
    p = layer.eltwise_param
    kind = type(p).EltwiseOp.Name(p.operation)
    coeff = list(p.coeff)
    if coeff and (kind != "SUM" or len(coeff) != len(x)):
        raise ClipqError(f"{g.source}: layer '{layer.name}' (Eltwise): coeff needs operation SUM and one value per "
                         f"bottom ({len(x)})")
    if kind == "SUM":
        terms = [v if c == 1 else g.node("Mul", [v, g.constant(np.float32(c), f"{layer.name}/coeff{i}")],
                                          layer=layer.name)
                 for i, (v, c) in enumerate(zip(x, coeff or [1.0] * len(x)))]
        g.node("Sum", terms, y[0], layer.name)
    elif kind == "MAX":
        g.node("Max", x, y[0], layer.name)
    else:  # PROD
        product = x[0]
        for i, v in enumerate(x[1:]):
            product = g.node("Mul", [product, v], y[0] if i == len(x) - 2 else None, layer.name)
        if len(x) == 1:
            g.node("Identity", x, y[0], layer.name)


def _batch_norm(g: _Graph, layer, param, x, y) -> None:
    p = layer.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise ClipqError(f"{g.source}: layer '{layer.name}' (BatchNorm): use_global_stats is false, so Caffe "
                         "normalizes with each batch's own statistics; only the stored statistics are converted")
    mean, var = g.blob(layer, 0), g.blob(layer, 1)
    stored = g.blob(layer, 2).reshape(-1)
    factor = np.float32(0) if stored[0] == 0 else np.float32(1) / stored[0]  # BatchNormLayer::Forward_cpu
    channels = mean.size
    mean = (mean.reshape(-1) * factor).astype(np.float32)
    var = (var.reshape(-1) * factor).astype(np.float32)
    g.node("BatchNormalization",
           [x[0], g.constant(np.ones(channels, np.float32), f"{layer.name}/one"),
            g.constant(np.zeros(channels, np.float32), f"{layer.name}/zero"),
            g.constant(mean, f"{layer.name}/mean"), g.constant(var, f"{layer.name}/variance")],
           y[0], layer.name, epsilon=p.eps)


def _broadcast(g: _Graph, layer, values: np.ndarray | str, blob_shape: Shape, axis: int, rank: int):
    """A parameter of shape `blob_shape` that applies from `axis` of a rank-`rank` input, with trailing 1s added
    so that ONNX's numpy broadcasting lines it up as Caffe does."""
    target = tuple(blob_shape) + (1,) * (rank - axis - len(blob_shape))
    if isinstance(values, str):  # a second bottom
        return g.node("Reshape", [values, g.constant(np.array(target, np.int64), f"{layer.name}/shape")],
                      layer=layer.name)
    return values.reshape(target)


def _scale_or_bias(g: _Graph, layer, x, y, p, op: str, with_bias: bool) -> None:
    shape = g.shape(layer, layer.bottom[0])
    axis = g.axis(layer, layer.bottom[0], p.axis)
    if len(x) > 1:
        factor = _broadcast(g, layer, x[1], g.shape(layer, layer.bottom[1]), axis, len(shape))
        blob = 0
    else:
        end = len(shape) if p.num_axes == -1 else axis + p.num_axes
        values = g.blob(layer, 0, tuple(shape[axis:end]))
        factor = g.constant(_broadcast(g, layer, values, values.shape, axis, len(shape)), f"{layer.name}/{op}")
        blob = 1
    if not with_bias:
        g.node(op, [x[0], factor], y[0], layer.name)
        return
    scaled = g.node(op, [x[0], factor], layer=layer.name)
    axes = len(g.shape(layer, layer.bottom[1])) if len(x) > 1 else \
        (len(shape) - axis if p.num_axes == -1 else p.num_axes)
    bias = g.blob(layer, blob, tuple(shape[axis:axis + axes]))
    g.node("Add", [scaled, g.constant(_broadcast(g, layer, bias, bias.shape, axis, len(shape)),
                                      f"{layer.name}/bias")], y[0], layer.name)


def _scale(g: _Graph, layer, param, x, y) -> None:
    _scale_or_bias(g, layer, x, y, layer.scale_param, "Mul", layer.scale_param.bias_term)


def _bias(g: _Graph, layer, param, x, y) -> None:
    _scale_or_bias(g, layer, x, y, layer.bias_param, "Add", False)


def _identity(g: _Graph, layer, param, x, y) -> None:
    for top in y:
        g.node("Identity", x[:1], top, layer.name)


def _flatten(g: _Graph, layer, param, x, y) -> None:
    p = layer.flatten_param
    start = g.axis(layer, layer.bottom[0], p.axis)
    if p.end_axis == -1:
        target = [0] * start + [-1]
    else:
        shape = g.shape(layer, layer.bottom[0])
        end = p.end_axis % len(shape)
        target = [0] * start + [-1] + list(shape[end + 1:])
    g.node("Reshape", [x[0], g.constant(np.array(target, np.int64), f"{layer.name}/shape")], y[0], layer.name)


def _reshape(g: _Graph, layer, param, x, y) -> None:
    p = layer.reshape_param
    dims = list(p.shape.dim)
    if p.axis == 0 and p.num_axes == -1:
        target = dims  # Caffe's 0 (copy the input's axis) and -1 (infer) are ONNX's
    else:
        shape = g.shape(layer, layer.bottom[0])
        start = p.axis if p.axis >= 0 else len(shape) + p.axis + 1
        end = len(shape) if p.num_axes == -1 else start + p.num_axes
        target = [0] * start + dims + list(shape[end:])
    g.node("Reshape", [x[0], g.constant(np.array(target, np.int64), f"{layer.name}/shape")], y[0], layer.name)


def _power(g: _Graph, layer, param, x, y) -> None:
    p = layer.power_param
    value = x[0]
    steps = [("Mul", p.scale, p.scale != 1), ("Add", p.shift, p.shift != 0), ("Pow", p.power, p.power != 1)]
    steps = [(op, c) for op, c, needed in steps if needed]
    if not steps:
        g.node("Identity", x, y[0], layer.name)
    for i, (op, c) in enumerate(steps):
        value = g.node(op, [value, g.constant(np.float32(c), f"{layer.name}/{op.lower()}")],
                       y[0] if i == len(steps) - 1 else None, layer.name)


def _unary(op: str) -> Callable:
    def convert(g: _Graph, layer, param, x, y) -> None:
        g.node(op, x, y[0], layer.name)
    return convert


CONVERTERS: dict[str, Callable] = {
    "Convolution": _convolution, "InnerProduct": _inner_product, "Pooling": _pooling, "ReLU": _relu, "LRN": _lrn,
    "Softmax": _softmax, "Concat": _concat, "Eltwise": _eltwise, "BatchNorm": _batch_norm, "Scale": _scale,
    "Bias": _bias, "Dropout": _identity, "Split": _identity, "Flatten": _flatten, "Reshape": _reshape,
    "Power": _power, "Sigmoid": _unary("Sigmoid"), "TanH": _unary("Tanh"),
}


# --- the net ------------------------------------------------------------------------------------------------

def convert(net_param, weights: dict[str, Layer], source: str, weights_source: str = "the weights",
            opset: int = DEFAULT_OPSET) -> Exported:
    """The ONNX model of a deploy net (TEST phase) with `weights` (layer name -> Layer: dense blobs, or codes +
    codebook for a compressed layer); `source` and `weights_source` name the files in errors."""
    if opset not in OPSETS:
        raise ClipqError(f"opset {opset} is not supported (use {OPSETS.start}..{OPSETS.stop - 1})")
    net = net_walk.walk(net_param, source, CONVERTERS, "export-onnx")
    shapes = net.shapes
    g = _Graph(opset, net_walk.Weights(weights, source, weights_source), shapes, source)
    for name in net.inputs:
        g.inputs.append(g.helper.make_tensor_value_info(name, g.T.FLOAT, list(shapes[name])))
        g.used.add(name)
        g.current[name] = name
    g.used.update(name for row in net.tops for name in row)  # no helper value takes a top's name
    for layer, tops in zip(net.layers, net.tops):
        kind, param = preflight.wrapped(layer)
        x = [g.current[b] for b in layer.bottom]
        CONVERTERS[kind](g, layer, param, x, tops)
        for blob, name in zip(layer.top, tops):
            g.current[blob] = name
    model = g.helper.make_model(
        g.helper.make_graph(g.nodes, net_param.name or "net", g.inputs,
                            [g.helper.make_tensor_value_info(name, g.T.FLOAT,
                                                             list(shapes[blob]) if shapes.get(blob) else None)
                             for name, blob in zip(net.outputs, net.output_blobs)],
                            initializer=g.initializers),
        opset_imports=[g.helper.make_opsetid("", opset)], producer_name=PRODUCER)
    # the IR version of the opset, not the newest onnx knows: runtimes refuse an IR newer than theirs
    model.ir_version = g.helper.find_min_ir_version_for(list(model.opset_import))
    _declare_inferred_outputs(g.onnx, model)
    return Exported(model, g.compressed, net.outputs)


def _declare_inferred_outputs(onnx, model) -> None:
    """Give the outputs whose Caffe shape preflight does not infer (after a Reshape) onnx's inferred type:
    a graph output must declare its shape."""
    unknown = [out for out in model.graph.output if not out.type.tensor_type.HasField("shape")]
    if not unknown:
        return
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in unknown:
        if out.name in types and types[out.name].tensor_type.HasField("shape"):
            out.type.CopyFrom(types[out.name])


def check(model) -> None:
    """onnx.checker's full check (types and shapes inferred through the whole graph); a ClipqError if it fails."""
    import onnx  # lazy: only export-onnx needs it

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipqError(f"the ONNX model fails onnx.checker's full check: {first}") from None
