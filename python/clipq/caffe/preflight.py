"""Checks that run before Caffe sees an input, so that a bad input is one clear line, never a Caffe abort.

Caffe answers a malformed prototxt, a missing LMDB, an input its layers cannot take or another net's
weights with a glog `Check failed` and a stack dump (or, for an empty caffemodel, with nothing at all:
the net keeps its filler values). Here the same facts are read with protobuf, lmdb and arithmetic only:

- the prototxt parses and has layers (`net`);
- every LMDB its Data layers read opens and holds Datums (`data_sources`);
- blob shapes, inferred layer by layer as Caffe's `Reshape` computes them, are all non-empty (`blob_shapes`);
- a caffemodel parses as a NetParameter with weights, and its layers' blob shapes are the net's
  (`weights_fit`), which is what Caffe's `CopyTrainedLayersFrom` checks (by layer name).

Shapes are inferred for the layer types clipq's nets use; a blob made by any other layer is "unknown" and
nothing downstream of it is checked (a check that is unsure stays silent rather than refuse a good net).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
from google.protobuf import json_format

from clipq.caffe import caffe_io, caffemodel
from clipq.caffe.convert import METHOD_CLASS_TYPE
from clipq.caffe.param_str import WRAPPED, WrappedParam
from clipq.storage.sparse_codec import MAX_BLOB_COUNT
from clipq.util.errors import ClipqError

Shape = tuple[int, ...]
SAME_SHAPE = {"ReLU", "Sigmoid", "TanH", "Dropout", "LRN", "BatchNorm", "Scale", "Bias", "Power", "AbsVal", "BNLL",
              "ELU", "PReLU", "Exp", "Log", "Softmax", "MVN", "Eltwise", "Threshold"}
SCALAR_OUTPUT = {"SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss", "HingeLoss", "InfogainLoss",
                 "MultinomialLogisticLoss", "ContrastiveLoss"}


@dataclass(frozen=True)
class NetCheck:
    """What the checks of one net found: its NetParameter and its blob shapes."""

    param: object
    shapes: dict[str, Shape | None]


def net(prototxt: str | os.PathLike, what: str = "--model"):
    """The NetParameter of a prototxt; an error naming the file (and line) if it is missing, malformed or empty."""
    path = Path(prototxt)
    if not path.is_file():
        raise ClipqError(f"{path}: {'is a directory' if path.is_dir() else 'file not found'} ({what})")
    param = caffe_io.read_net_param(path)
    if not len(param.layer) and not len(param.layers):
        raise ClipqError(f"{path}: no layers: empty, or not a Caffe net prototxt ({what})")
    return param


def in_phase(layer, phase: str) -> bool:
    """Whether Caffe's FilterNet keeps `layer` in `phase` (default NetState: level 0, no stages)."""
    value = caffe_io.caffe_pb2().Phase.Value(phase)

    def meets(rule) -> bool:
        return ((not rule.HasField("phase") or rule.phase == value)
                and (not rule.HasField("min_level") or rule.min_level <= 0)
                and (not rule.HasField("max_level") or rule.max_level >= 0) and not len(rule.stage))

    if len(layer.include):
        return any(meets(rule) for rule in layer.include)
    return not any(meets(rule) for rule in layer.exclude)


def data_sources(net_param, prototxt: str | os.PathLike, phase: str) -> dict[str, Shape | None]:
    """{top: shape} of the net's Data layers in `phase`; each layer's LMDB must open and hold Datums."""
    shapes: dict[str, Shape | None] = {}
    for layer in net_param.layer:
        if layer.type == "Data" and in_phase(layer, phase):
            shapes.update(zip(layer.top, _data_layer_shapes(layer, prototxt)))
    return shapes


def _data_layer_shapes(layer, prototxt) -> list[Shape | None]:
    source, batch = layer.data_param.source, layer.data_param.batch_size
    where = f"{prototxt}: layer '{layer.name}'"
    if not source:
        raise ClipqError(f"{where}: data_param.source is empty")
    if batch <= 0:
        raise ClipqError(f"{where}: data_param.batch_size must be positive")
    if layer.data_param.backend != caffe_io.caffe_pb2().DataParameter.LMDB:
        return [None] * len(layer.top)  # LevelDB: not read here
    datum = first_datum(source, f"{where}: data_param.source")
    crop = layer.transform_param.crop_size
    if datum is None:
        image = None
    elif crop and (crop > datum[1] or crop > datum[2]):
        raise ClipqError(f"{where}: transform_param.crop_size {crop} is larger than the images of {source} "
                         f"({datum[1]}x{datum[2]})")
    else:
        image = (batch, datum[0]) + ((crop, crop) if crop else datum[1:])
    return [image, (batch,)][:len(layer.top)]


def first_datum(source: str | os.PathLike, where: str) -> Shape | None:
    """(channels, height, width) of an LMDB's first Datum (None if encoded); errors name `where` (the
    layer's field or the option) and the path."""
    source = str(source)
    if not Path(source).is_dir():
        raise ClipqError(f"{where} {source!r}: no such LMDB directory "
                         f"(relative paths are relative to the current directory, {Path.cwd()})")
    try:
        env = lmdb.open(source, readonly=True, lock=False, subdir=True)
    except lmdb.Error as e:
        raise ClipqError(f"{where} {source!r}: cannot open the LMDB ({e})") from None
    try:
        with env.begin() as txn:
            raw = next(txn.cursor().iternext(keys=False), None)
    finally:
        env.close()
    if raw is None:
        raise ClipqError(f"{where} {source!r}: the LMDB is empty")
    datum = caffe_io.caffe_pb2().Datum()
    try:
        datum.ParseFromString(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError differs between implementations
        raise ClipqError(f"{where} {source!r}: the LMDB does not hold Caffe Datums") from None
    if datum.encoded:
        return None
    shape = (datum.channels, datum.height, datum.width)
    if min(shape) <= 0:
        raise ClipqError(f"{where} {source!r}: the LMDB holds images of shape {_fmt(shape)}")
    return shape


def input_shapes(net_param) -> dict[str, Shape]:
    """{top: shape} of the net's Input layers and legacy `input:` / `input_shape` / `input_dim` fields."""
    shapes = {}
    for layer in net_param.layer:
        if layer.type == "Input":
            dims = [tuple(s.dim) for s in layer.input_param.shape]
            for i, top in enumerate(layer.top):
                if dims:
                    shapes[top] = dims[i] if i < len(dims) else dims[0]
    legacy = [tuple(s.dim) for s in net_param.input_shape] or [
        tuple(net_param.input_dim[i:i + 4]) for i in range(0, len(net_param.input_dim), 4)]
    shapes.update(zip(net_param.input, legacy))
    return shapes


def blob_shapes(net_param, prototxt: str | os.PathLike, phase: str = "TEST", read_data: bool = True,
                labels: bool = True) -> dict[str, Shape | None]:
    """Every blob's shape in `phase` (None: unknown); an error naming the layer whose output would be
    empty and the net's input shapes (e.g. 8x8 images through LeNet-5). Without `read_data`, the Data
    layers' LMDBs are not opened (and what they feed is not checked); with it and `labels`, their labels
    are checked against the scores they index."""
    shapes: dict[str, Shape | None] = input_shapes(net_param)
    if read_data:
        shapes.update(data_sources(net_param, prototxt, phase))
    inputs = ", ".join(f"{name} {_fmt(s)}" for name, s in shapes.items() if s is not None) or "unknown"
    for name, shape in shapes.items():
        if shape is not None and min(shape, default=1) <= 0:
            raise ClipqError(f"{prototxt}: input '{name}' has shape {_fmt(shape)}")
    for layer in net_param.layer:
        if in_phase(layer, phase) and layer.type in ("Data", "Input"):
            for top in layer.top:
                shapes.setdefault(top, None)  # produced, shape unknown (LMDB not read)
    for layer in net_param.layer:
        if not in_phase(layer, phase) or layer.type in ("Data", "Input"):
            continue
        missing = [b for b in layer.bottom if b not in shapes]
        if missing:  # Caffe aborts on it (insert_splits.cpp: Unknown bottom blob)
            raise ClipqError(f"{prototxt}: layer '{layer.name}' reads blob '{missing[0]}', which no earlier layer "
                             f"produces in the {phase} phase")
        bottoms = [shapes.get(b) for b in layer.bottom]
        tops = None
        if bottoms and all(bottoms):  # known and not scalars (a scalar feeds only losses and the like)
            try:
                tops = _layer_outputs(layer, bottoms)
            except ZeroDivisionError:
                raise ClipqError(f"{prototxt}: layer '{layer.name}' ({layer.type}) has a stride of 0") from None
        for i, top in enumerate(layer.top):
            shape = tops[i] if tops is not None and i < len(tops) else None
            if shape is not None and min(shape, default=1) <= 0:
                raise ClipqError(f"{prototxt}: layer '{layer.name}' ({layer.type}) would output an empty blob "
                                 f"'{top}' of shape {_fmt(shape)} from input {inputs}; the net needs larger inputs")
            if shape is not None and math.prod(shape) > MAX_BLOB_COUNT:
                raise ClipqError(f"{prototxt}: layer '{layer.name}' ({layer.type}) would output blob '{top}' of "
                                 f"shape {_fmt(shape)}: {math.prod(shape):,} values, more than Caffe's limit of "
                                 f"{MAX_BLOB_COUNT:,} per blob")
            shapes[top] = shape
    if read_data and labels:
        _check_labels(net_param, prototxt, phase, shapes)
    return shapes


LABELED_SCORES = {"SoftmaxWithLoss": "softmax_param", "Accuracy": "accuracy_param"}


def _check_labels(net_param, prototxt, phase: str, shapes: dict[str, Shape | None]) -> None:
    """Every label a Data layer's LMDB feeds a SoftmaxWithLoss / Accuracy indexes its scores: Caffe's CPU code
    does not check (a label >= the classes corrupts the heap in training and reads out of bounds in testing)."""
    label_layers = {layer.top[1]: layer for layer in net_param.layer
                    if layer.type == "Data" and in_phase(layer, phase) and len(layer.top) > 1
                    and layer.data_param.backend == caffe_io.caffe_pb2().DataParameter.LMDB}
    for layer in net_param.layer:
        if layer.type not in LABELED_SCORES or not in_phase(layer, phase) or len(layer.bottom) < 2:
            continue
        data, scores = label_layers.get(layer.bottom[1]), shapes.get(layer.bottom[0])
        if data is None or not scores:
            continue
        classes = scores[getattr(layer, LABELED_SCORES[layer.type]).axis % len(scores)]
        found = caffe_io.labels(data.data_param.source, f"LMDB of layer '{data.name}'")
        ignored = {p.ignore_label for p in (layer.loss_param, layer.accuracy_param) if p.HasField("ignore_label")}
        bad = sorted(label for label in (found or ()) if not 0 <= label < classes and label not in ignored)
        if bad:
            label = bad[0] if bad[0] < 0 else bad[-1]
            raise ClipqError(f"{prototxt}: layer '{layer.name}' ({layer.type}) scores {classes} classes (blob "
                             f"'{layer.bottom[0]}'), but {data.data_param.source} has label {label}; Caffe would "
                             "index out of bounds. Labels must be 0..classes-1: give the net as many outputs as the "
                             "data has classes, or the LMDB of this net's data")


def _layer_outputs(layer, bottoms: list[Shape]) -> list[Shape] | None:
    """Output shapes of one layer from its input shapes, as Caffe's Reshape (None: type not modelled)."""
    kind, param = wrapped(layer)
    if kind == "Convolution":
        return [_conv_output(bottoms[0], param)]
    if kind == "InnerProduct":
        axis = param.axis % len(bottoms[0])
        return [bottoms[0][:axis] + (param.num_output,)]
    if kind == "Pooling":
        return [_pool_output(bottoms[0], layer.pooling_param)] * len(layer.top)  # (the mask has the same shape)
    if kind in SAME_SHAPE or kind == "Split":
        return [bottoms[0]] * len(layer.top)
    if kind in SCALAR_OUTPUT or kind == "Accuracy":
        return [()] * len(layer.top)
    if kind == "Concat":
        axis = (layer.concat_param.axis if not layer.concat_param.HasField("concat_dim")
                else layer.concat_param.concat_dim) % len(bottoms[0])
        size = sum(b[axis] for b in bottoms)
        return [bottoms[0][:axis] + (size,) + bottoms[0][axis + 1:]]
    if kind == "Flatten":
        shape = bottoms[0]
        start, end = layer.flatten_param.axis % len(shape), layer.flatten_param.end_axis % len(shape)
        return [shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:]]
    return None


def wrapped(layer):
    """(type, parameter message) of a layer; a CLIP-Q Python layer counts as the layer it wraps."""
    if layer.type == "Python" and layer.python_param.layer in METHOD_CLASS_TYPE:
        try:
            config = WrappedParam.from_param_str(layer.python_param.param_str,
                                                 METHOD_CLASS_TYPE[layer.python_param.layer])
            message = getattr(caffe_io.caffe_pb2().LayerParameter(), WRAPPED[config.type])
            return config.type, json_format.ParseDict(config.param, message)
        except (ValueError, json_format.ParseError) as e:
            raise ClipqError(f"layer '{layer.name}': {e}") from None
    if layer.type == "Convolution":
        return "Convolution", layer.convolution_param
    if layer.type == "InnerProduct":
        return "InnerProduct", layer.inner_product_param
    return layer.type, None


def spatial(values, count: int, default: int) -> list[int]:
    """A repeated Caffe field (kernel_size, pad, ...) as one value per spatial axis."""
    values = list(values)
    if not values:
        return [default] * count
    return values * count if len(values) == 1 else values[:count]


def conv_geometry(param, n: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Kernel, pad, stride and dilation of a ConvolutionParameter over `n` spatial axes (the _h / _w fields
    win, asked with HasField as Caffe does: the rc3 fallback's proto gives stride_h a default of 1)."""
    kernel = [param.kernel_h, param.kernel_w] if param.HasField("kernel_h") else spatial(param.kernel_size, n, 1)
    pad = [param.pad_h, param.pad_w] if param.HasField("pad_h") else spatial(param.pad, n, 0)
    stride = [param.stride_h, param.stride_w] if param.HasField("stride_h") else spatial(param.stride, n, 1)
    return kernel, pad, stride, spatial(param.dilation, n, 1)


def pool_geometry(param) -> tuple[list[int], list[int], list[int]]:
    """Kernel, pad and stride (height, width) of a PoolingParameter."""
    kernel = [param.kernel_h, param.kernel_w] if param.HasField("kernel_h") else [param.kernel_size] * 2
    pad = [param.pad_h, param.pad_w] if param.HasField("pad_h") else [param.pad] * 2
    stride = [param.stride_h, param.stride_w] if param.HasField("stride_h") else [param.stride] * 2
    return kernel, pad, stride


def pooled_size(size: int, k: int, p: int, s: int, floor: bool = False) -> int:
    """Caffe's pooled size (PoolingLayer::Reshape): rounded up (or down, round_mode FLOOR), less a last window
    that would start in the padding."""
    pooled = (size + 2 * p - k) // s + 1 if floor else -(-(size + 2 * p - k) // s) + 1
    if p and (pooled - 1) * s >= size + p:
        pooled -= 1
    return pooled


def _conv_output(shape: Shape, param) -> Shape:
    axis = param.axis % len(shape)
    sizes = shape[axis + 1:]
    kernel, pad, stride, dilation = conv_geometry(param, len(sizes))
    out = []
    for size, k, p, s, d in zip(sizes, kernel, pad, stride, dilation):
        span = size + 2 * p - (d * (k - 1) + 1)
        out.append(span // s + 1 if span >= 0 else 0)
    return shape[:axis] + (param.num_output,) + tuple(out)


def _pool_output(shape: Shape, param) -> Shape:
    if len(shape) != 4:
        return shape
    if param.global_pooling:
        return shape[:2] + (1, 1)
    # BVLC master has round_mode (CEIL by default); the rc3 fallback build has no such field and always rounds up
    floor = getattr(param, "round_mode", None) == getattr(caffe_io.caffe_pb2().PoolingParameter, "FLOOR", -1)
    return shape[:2] + tuple(pooled_size(size, k, p, s, floor) for size, k, p, s in zip(shape[2:], *pool_geometry(param)))


def param_shapes(net_param, shapes: dict[str, Shape | None], phase: str = "TEST") -> dict[str, list[Shape] | None]:
    """{layer: its blob shapes} for the learnable layers Caffe would build in `phase` (None: unknown)."""
    params: dict[str, list[Shape] | None] = {}
    for layer in net_param.layer:
        if not in_phase(layer, phase):
            continue
        kind, param = wrapped(layer)
        bottom = shapes.get(layer.bottom[0]) if len(layer.bottom) else None
        if kind in ("Convolution", "InnerProduct"):
            params[layer.name] = None if bottom is None else _weight_shapes(kind, param, bottom)
        elif kind in ("BatchNorm", "PReLU") or (kind == "Scale" and len(layer.bottom) == 1):
            params[layer.name] = None  # learnable, shapes not modelled: only its presence is checked
    return params


def _weight_shapes(kind: str, param, bottom: Shape) -> list[Shape]:
    axis = param.axis % len(bottom)
    if kind == "Convolution":
        kernel = conv_geometry(param, len(bottom) - axis - 1)[0]
        weights = (param.num_output, bottom[axis] // (param.group or 1), *kernel)
    else:
        inputs = math.prod(bottom[axis:])
        weights = (inputs, param.num_output) if param.transpose else (param.num_output, inputs)
    return [weights, (param.num_output,)] if param.bias_term else [weights]


def caffemodel_layers(path: str | os.PathLike, what: str = "--weights") -> list[caffemodel.LayerWeights]:
    """The layers of a caffemodel; an error if it is missing, not a caffemodel, or holds no weights."""
    path = Path(path)
    if not path.is_file():
        raise ClipqError(f"{path}: {'is a directory' if path.is_dir() else 'file not found'} ({what})")
    layers = caffemodel.read(path)
    if not layers:
        raise ClipqError(f"{path}: not a caffemodel: no layers (an empty file, or another kind of file) ({what})")
    if not any(layer.blobs for layer in layers):
        raise ClipqError(f"{path}: holds no weights (its layers have no blobs; a prototxt saved as binary?) ({what})")
    for layer in layers:
        bad = next((i for i, blob in enumerate(layer.blobs) if not np.isfinite(blob).all()), None)
        if bad is not None:
            raise ClipqError(f"{path}: layer '{layer.name}' blob {bad} holds NaN or infinite values ({what}; a "
                             "training that diverged?)")
    return layers


def _legacy_equal(found: Shape, expected: Shape) -> bool:
    """Caffe's Blob::ShapeEquals for a legacy 4-D (num, channels, height, width) blob."""
    return len(expected) <= 4 and found == (1,) * (4 - len(expected)) + expected


def weights_fit(net_param, prototxt, weights: str | os.PathLike, shapes: dict[str, Shape | None],
                phase: str = "TEST", require_all: bool = True) -> None:
    """The caffemodel's layers must have the net's blob shapes (matched by name, as Caffe loads them); with
    `require_all`, every learnable layer of the net must be in it (Caffe would keep filler values)."""
    layers = caffemodel_layers(weights)
    if len(net_param.layers):
        return  # a V1 net: Caffe upgrades it when loading, names and shapes are not modelled here
    expected = param_shapes(net_param, shapes, phase)
    matched = set()
    for layer in layers:
        if layer.name not in expected or not layer.blobs:
            continue
        matched.add(layer.name)
        want = expected[layer.name]
        if want is None:
            continue
        found = [tuple(b.shape) for b in layer.blobs]
        if len(found) != len(want):
            raise ClipqError(f"{weights}: layer '{layer.name}' has {len(found)} blob(s); {prototxt} expects "
                             f"{len(want)} ({', '.join(_fmt(s) for s in want)})")
        for i, (f, w) in enumerate(zip(found, want)):
            if f != w and not _legacy_equal(f, w):
                raise ClipqError(f"{weights}: layer '{layer.name}' {('weights', 'bias')[min(i, 1)]} have shape "
                                 f"{_fmt(f)}; {prototxt} expects {_fmt(w)} (weights of another net?)")
    missing = [name for name in expected if name not in matched]
    if not matched:
        raise ClipqError(f"{weights}: none of its layers is a learnable layer of {prototxt} "
                         f"(weights of another net?)")
    if require_all and missing:
        raise ClipqError(f"{weights}: no weights for layer(s) {', '.join(missing)} of {prototxt} "
                         "(Caffe would leave them at their initial values)")


def check_net(prototxt: str | os.PathLike, weights: str | os.PathLike | None = None, phase: str = "TEST",
              require_all: bool = True, what: str = "--model", read_data: bool = True) -> NetCheck:
    """Every check of a net (and its weights) before Caffe builds it in `phase` (see `blob_shapes`
    for `read_data`, `weights_fit` for `require_all`)."""
    param = net(prototxt, what)
    shapes = blob_shapes(param, prototxt, phase, read_data)
    for name, blobs in param_shapes(param, shapes, phase).items():
        for shape in blobs or ():
            if math.prod(shape) > MAX_BLOB_COUNT:
                raise ClipqError(f"{prototxt}: layer '{name}' has a weight blob of shape {_fmt(shape)}: "
                                 f"{math.prod(shape):,} values, more than Caffe's limit of {MAX_BLOB_COUNT:,} per blob")
    if weights is not None:
        weights_fit(param, prototxt, weights, shapes, phase, require_all)
    return NetCheck(param, shapes)


def _fmt(shape: Shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"
