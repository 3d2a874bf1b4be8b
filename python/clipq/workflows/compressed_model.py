"""Caffe models <-> `.clipq` files: `clipq encode` and `clipq decode`.

encode: a caffemodel and the layers to compress with their (p, b) (a CLIP-Q prototxt, or a plain one and
a plan). A compressed layer whose weights already take at most 2^b - 1 distinct non-zero values (an
exported CLIP-Q model) is stored exactly as it is; otherwise the CLIP-Q operator prunes and quantizes it
first (a trained CLIP-Q caffemodel with its full-precision weights). Every other layer is stored raw.

decode: a `.clipq` file -> a plain caffemodel (layer names and types kept). The file is checked against
itself first (`sparse_codec.decode` refuses damage and inconsistent edits); only with the deploy prototxt
it is meant for (`--model`) are its layer names and blob shapes checked against a net, the way Caffe will
match them when it loads the caffemodel.

export-onnx: a deploy prototxt + a `.clipq` file (its compressed layers kept as codes + codebook) or a
caffemodel (dense) -> an `.onnx` file (`caffe.onnx_export`), checked by onnx.checker before it is written.

export-ncnn: the same inputs -> ncnn's `.param` + `.bin` (`caffe.ncnn_export`; compressed layers as ncnn's
256-entry weight tables + uint8 indices), both files or neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipq.caffe import caffe_io, caffemodel, ncnn_export, onnx_export, preflight
from clipq.caffe.convert import check_plan, clipq_configs
from clipq.plan import LayerPlan
from clipq.quant import prune_quant
from clipq.storage import sparse_codec
from clipq.storage.sparse_codec import Layer
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError


def quantized_layer(name: str, layer_type: str, blobs: list[np.ndarray], lp: LayerPlan) -> Layer:
    """A compressed Layer: stored exactly if the weights already look pruned-quantized at (p, b) (an exported
    model), else pruned-quantized now."""
    weights = np.asarray(blobs[0], np.float32)
    exact = sparse_codec.exact_codes(weights, lp.p, lp.bits)
    if exact is not None:
        codes, codebook = exact
    else:
        q = prune_quant.clip_quantize(weights, lp.p, lp.bits)
        codes, codebook, weights = q.codes, q.codebook, q.weights
    return Layer(name, layer_type, [weights] + [np.asarray(b, np.float32) for b in blobs[1:]],
                 codes, codebook, lp.bits, lp.p)


class SizeModel:
    """Bytes of the `.clipq` file a plan would give on the baseline weights (the codec itself)."""

    def __init__(self, weights: Path, layers: list[str]):
        self.raw = [w for w in caffemodel.read(weights) if w.blobs]
        self.blobs = {w.name: w.blobs for w in self.raw}
        self.layers = layers
        self.original = sum(4 * sum(np.size(b) for b in w.blobs) for w in self.raw)
        self._cache: dict[tuple, int] = {}

    def bytes(self, plan: dict[str, LayerPlan]) -> int:
        key = tuple(sorted((n, round(lp.p, 6), lp.bits) for n, lp in plan.items()))
        if key not in self._cache:
            layers = [quantized_layer(w.name, w.type, w.blobs, plan[w.name]) if w.name in plan
                      else sparse_codec.Layer(w.name, w.type, w.blobs) for w in self.raw]
            self._cache[key] = len(sparse_codec.encode(layers))
        return self._cache[key]

    def rate(self, plan: dict[str, LayerPlan]) -> float:
        return self.original / self.bytes(plan)


def model_layers(weights: str | os.PathLike, plan: dict[str, LayerPlan], types: dict[str, str]) -> list[Layer]:
    """The caffemodel's layers with blobs, the planned ones compressed (types: name -> type to record)."""
    layers, seen = [], set()
    for layer in caffemodel.read(weights):
        if not layer.blobs or layer.name in seen:
            continue
        seen.add(layer.name)
        layer_type = types.get(layer.name, layer.type)
        if layer.name in plan:
            layers.append(quantized_layer(layer.name, layer_type, layer.blobs, plan[layer.name]))
        else:
            layers.append(Layer(layer.name, layer_type, layer.blobs))
    missing = sorted(set(plan) - seen)
    if missing:
        raise ClipqError(f"{weights}: no weights for layer(s) {', '.join(missing)} named in the plan")
    return layers


def random_layers(model: str | os.PathLike, plan: dict[str, LayerPlan], types: dict[str, str],
                  seed: int = 0) -> list[Layer]:
    """The net's learnable layers with random Gaussian weights of their shapes (biases 0), the planned
    ones pruned-quantized: how `clipq size` reproduces storage numbers without the trained model."""
    cf = caffe_io.caffe()
    cf.set_mode_cpu()
    try:
        net = cf.Net(str(model), cf.TEST)
    except Exception as e:  # noqa: BLE001 - Caffe reports its own parse/shape errors
        raise ClipqError(f"{model}: Caffe cannot build this net ({e}); use its deploy prototxt") from None
    rng = np.random.default_rng(seed)
    layer_types = {layer.name: layer.type for layer in caffe_io.read_net_param(model).layer}
    layers = []
    for name, params in net.params.items():
        blobs = [rng.standard_normal(params[0].data.shape, np.float32) * np.float32(0.01)]
        blobs += [np.zeros(b.data.shape, np.float32) for b in params[1:]]
        layer_type = types.get(name, layer_types.get(name, "?"))
        layers.append(quantized_layer(name, layer_type, blobs, plan[name]) if name in plan
                      else Layer(name, layer_type, blobs))
    return layers


def plan_from_model(model: str | os.PathLike, plan: dict[str, LayerPlan] | None) -> tuple[dict, dict]:
    """(plan, wrapped types): the CLIP-Q layers of `model`, or `plan` for a plain prototxt."""
    net = caffe_io.read_net_param(model)
    configs = clipq_configs(net, str(model))
    if configs and plan:
        raise ClipqError(f"{model}: is a CLIP-Q prototxt (it holds p and b); do not also give a plan")
    if configs:
        return ({name: LayerPlan(c.p, c.bits) for name, c in configs.items()},
                {name: c.type for name, c in configs.items()})
    if not plan:
        raise ClipqError(f"{model}: has no CLIP-Q layers; give a plan with the layers to compress")
    check_plan(net, plan, str(model))
    return plan, {}


def encode_model(model, weights=None, plan: dict[str, LayerPlan] | None = None, use_huffman: bool = False,
                 seed: int = 0) -> tuple[bytes, list[Layer]]:
    """(.clipq bytes, layers with their encoded facts) of a caffemodel, or of random weights of the
    model's shapes when `weights` is None."""
    plan, types = plan_from_model(model, plan)
    layers = model_layers(weights, plan, types) if weights else random_layers(model, plan, types, seed)
    meta = {"prototxt": Path(model).name, "caffemodel": Path(weights).name if weights else f"random (seed {seed})"}
    return sparse_codec.encode(layers, meta, use_huffman), layers


def encode_file(model, weights, output, plan: dict[str, LayerPlan] | None = None,
                use_huffman: bool = False) -> list[Layer]:
    """`clipq encode`: write the `.clipq` file; return its layers (with their encoded facts)."""
    data, layers = encode_model(model, weights, plan, use_huffman)
    with atomic_write(output, "wb") as f:
        f.write(data)
    return layers


def read_file(path: str | os.PathLike) -> tuple[dict, list[Layer]]:
    """Header and layers of a `.clipq` file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ClipqError(f"{path}: cannot read ({e.strerror})") from None
    return sparse_codec.decode(data, str(path))


def check_against(layers: list[Layer], deploy: str | os.PathLike, source: str) -> None:
    """Every learnable layer of the deploy net must be in the file with the same blob shapes."""
    cf = caffe_io.caffe()
    cf.set_mode_cpu()
    net = cf.Net(str(deploy), cf.TEST)
    by_name = {layer.name: layer for layer in layers}
    for name, blobs in net.params.items():
        if name not in by_name:
            raise ClipqError(f"{source}: has no layer '{name}', which {deploy} needs")
        shapes = [tuple(b.data.shape) for b in blobs]
        mine = [tuple(b.shape) for b in by_name[name].blobs]
        if shapes != mine:
            raise ClipqError(f"{source}: layer '{name}' has blob shapes {mine}; {deploy} expects {shapes}")


def decode_file(path, output, deploy=None) -> list[Layer]:
    """`clipq decode`: write the plain caffemodel of a `.clipq` file (checked against `deploy` if given)."""
    _, layers = read_file(path)
    if deploy is not None:
        check_against(layers, deploy, str(path))
    caffemodel.write([caffemodel.LayerWeights(layer.name, layer.type, layer.blobs) for layer in layers], output)
    return layers


@dataclass(frozen=True)
class OnnxFile:
    """What `clipq export-onnx` wrote: its size, the dense float32 export's size, the layers kept as codes."""

    path: Path
    bytes: int
    dense_bytes: int
    compressed: dict[str, str]   # layer -> its codes' element type (UINT8 / UINT4)
    outputs: list[str]


def _export_inputs(model, clipq, weights) -> tuple[object, dict[str, Layer], str]:
    """The deploy net, its weights by layer name (from a `.clipq` file or a caffemodel) and the weights' file
    name, for the exporters."""
    if (clipq is None) == (weights is None):
        raise ClipqError("give the weights as a .clipq file or as a caffemodel (one of them)")
    net = preflight.net(model)
    if clipq is not None:
        source, stored = str(clipq), read_file(clipq)[1]
    else:
        source = str(weights)
        stored = [Layer(w.name, w.type, w.blobs) for w in preflight.caffemodel_layers(weights) if w.blobs]
    return net, {layer.name: layer for layer in stored}, source


def export_onnx(model, output, clipq=None, weights=None, opset: int = onnx_export.DEFAULT_OPSET) -> OnnxFile:
    """`clipq export-onnx`: write the ONNX model of the deploy `model` with the weights of a `.clipq` file
    (compressed layers as codes + codebook) or of a caffemodel (dense), after onnx.checker's full check."""
    net, layers, source = _export_inputs(model, clipq, weights)
    exported = onnx_export.convert(net, layers, str(model), source, opset)
    onnx_export.check(exported.model)
    data = exported.model.SerializeToString()
    dense_bytes = len(data)
    if exported.compressed:  # the same net with every layer dense, for the comparison
        dense = {name: Layer(layer.name, layer.type, layer.blobs) for name, layer in layers.items()}
        dense_bytes = onnx_export.convert(net, dense, str(model), source, opset).model.ByteSize()
    with atomic_write(output, "wb") as f:
        f.write(data)
    return OnnxFile(Path(output), len(data), dense_bytes, exported.compressed, exported.outputs)


@dataclass(frozen=True)
class NcnnFiles:
    """What `clipq export-ncnn` wrote: the two files, their sizes, the dense export's .bin size, the layers
    stored as 256-entry tables (layer -> b)."""

    param: Path
    bin: Path
    param_bytes: int
    bin_bytes: int
    dense_bin_bytes: int
    compressed: dict[str, int]
    outputs: list[str]


def ncnn_paths(prefix) -> tuple[Path, Path]:
    """PREFIX.param and PREFIX.bin."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".param"), prefix.with_name(prefix.name + ".bin")


def export_ncnn(model, prefix, clipq=None, weights=None) -> NcnnFiles:
    """`clipq export-ncnn`: write PREFIX.param and PREFIX.bin, the ncnn model of the deploy `model` with the
    weights of a `.clipq` file (compressed layers as ncnn's weight tables) or of a caffemodel (dense). Both
    files are written, or neither (an old pair is then gone)."""
    net, layers, source = _export_inputs(model, clipq, weights)
    exported = ncnn_export.convert(net, layers, str(model), source)
    dense_bin = len(exported.bin)
    if exported.compressed:  # the same net with every layer dense, for the comparison
        dense = {name: Layer(layer.name, layer.type, layer.blobs) for name, layer in layers.items()}
        dense_bin = len(ncnn_export.convert(net, dense, str(model), source).bin)
    param, binary = ncnn_paths(prefix)
    try:
        with atomic_write(binary, "wb") as f:
            f.write(exported.bin)
        with atomic_write(param, "w") as f:
            f.write(exported.param)
    except BaseException:
        binary.unlink(missing_ok=True)  # the .param failed: no .bin without it
        raise
    return NcnnFiles(param, binary, len(exported.param.encode()), len(exported.bin), dense_bin,
                     exported.compressed, exported.outputs)
