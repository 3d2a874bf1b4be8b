"""The thin adapter between clipq and pycaffe: prototxt/caffemodel/Datum in and out, running nets.

pycaffe is imported through `caffe()` (lazily: it is slow to import and `clipq --help` does not need it);
only the `clipq.caffe` package and `layers/` import it.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import lmdb
import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from clipq.caffe.caffemodel import encode_blob
from clipq.util.atomic import atomic_dir, atomic_write
from clipq.util.errors import ClipqError


def caffe():
    """pycaffe, imported on first use."""
    import caffe as _caffe  # lazy: pycaffe (its C++ extension) takes a second to import

    return _caffe


def set_mode() -> str:
    """Caffe's device for clipq's own runs: CPU, or the GPU named by CLIPQ_DEVICE=gpu:N (GPU builds only)."""
    cf = caffe()
    device = os.environ.get("CLIPQ_DEVICE", "cpu")
    if device.startswith("gpu"):
        cf.set_mode_gpu()
        cf.set_device(int(device.partition(":")[2] or 0))
    else:
        cf.set_mode_cpu()
    return device


def caffe_pb2():
    """Caffe's protobuf messages (NetParameter, SolverParameter, Datum, ...)."""
    from caffe.proto import caffe_pb2 as _pb2  # lazy: the caffe package imports pycaffe with it

    return _pb2


def image_to_datum(image: np.ndarray, label: int) -> bytes:
    """Serialize a (channels, height, width) uint8 image as a Caffe Datum."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) uint8 image, got {image.dtype} {image.shape}")
    datum = caffe_pb2().Datum(channels=image.shape[0], height=image.shape[1], width=image.shape[2],
                              data=image.tobytes(), label=label)
    return datum.SerializeToString()


def datum_to_image(raw: bytes) -> tuple[np.ndarray, int]:
    """Parse a serialized Datum back into its (C, H, W) uint8 image and label."""
    datum = caffe_pb2().Datum()
    datum.ParseFromString(raw)
    shape = (datum.channels, datum.height, datum.width)
    return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape), datum.label


def read_text_proto(path: str | os.PathLike, message_name: str, kind: str):
    """Parse a text-format Caffe message (NetParameter, SolverParameter); errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ClipqError(f"{path}: cannot read {kind} ({e.strerror})") from None
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:  # protobuf would quote the bytes into the message
        raise ClipqError(f"{path}: not a valid Caffe {kind}: binary data, not text (a caffemodel?)")
    message = getattr(caffe_pb2(), message_name)()
    try:
        text_format.Merge(text, message)
    except text_format.ParseError as e:
        reason = str(e).split(" : ", 1)[-1]  # "line:column : reason" -> the location goes first
        raise ClipqError(f"{path}:{e.GetLine()}:{e.GetColumn()}: not a valid Caffe {kind}: {reason}") from None
    return message


def read_net_param(prototxt: str | os.PathLike):
    """Parse a (train_val or deploy) net prototxt into a NetParameter."""
    return read_text_proto(prototxt, "NetParameter", "net prototxt")


def require_files(*paths: str | os.PathLike) -> None:
    """A clear error for the first of `paths` that is not a file."""
    for path in paths:
        if not Path(path).is_file():
            raise ClipqError(f"{path}: file not found")


def test_iterations(net_param, phase_name: str = "TEST") -> int:
    """Iterations that cover a TEST-phase Data layer's LMDB once (entries / batch_size, rounded up)."""
    phase = caffe_pb2().Phase.Value(phase_name)
    for layer in net_param.layer:
        if layer.type != "Data" or not all(rule.phase == phase for rule in layer.include):
            continue
        entries = lmdb_entries(layer.data_param.source, f"LMDB of layer '{layer.name}' (data_param.source)")
        return -(-entries // layer.data_param.batch_size)
    raise ClipqError(f"net '{net_param.name}' has no {phase_name}-phase Data layer to evaluate on")


def evaluate(prototxt: str | os.PathLike, weights: str | os.PathLike, iterations: int | None = None) -> dict:
    """Run a train_val net in TEST phase over its test set; return the mean of each scalar output."""
    require_files(prototxt, weights)
    if iterations is None:
        iterations = test_iterations(read_net_param(prototxt))
    cf = caffe()
    set_mode()
    net = cf.Net(str(prototxt), str(weights), cf.TEST)
    totals: dict[str, float] = {}
    for _ in range(iterations):
        outputs = net.forward()
        for name, value in outputs.items():
            if value.size == 1:
                totals[name] = totals.get(name, 0.0) + float(value.flat[0])
    return {name: total / iterations for name, total in totals.items()}


def test_data_layer(net_param, source: str, phase: str = "TEST"):
    """The net's one `phase` Data layer (an error naming `source` if there is none)."""
    value = caffe_pb2().Phase.Value(phase)
    layers = [layer for layer in net_param.layer
              if layer.type == "Data" and any(rule.phase == value for rule in layer.include)]
    if len(layers) != 1:
        raise ClipqError(f"{source}: expected one {phase}-phase Data layer (include {{ phase: {phase} }}), "
                         f"found {len(layers)}")
    return layers[0]


def lmdb_entries(path: str | os.PathLike, role: str = "LMDB") -> int:
    """Number of entries of an LMDB; a clear error if it cannot be opened."""
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    except lmdb.Error as e:
        raise ClipqError(f"{path}: cannot open the {role} ({e})") from None
    entries = env.stat()["entries"]
    env.close()
    if not entries:
        raise ClipqError(f"{path}: the {role} is empty")
    return entries


LABEL_SCAN_BYTES = 4 << 30  # an LMDB up to this size has its labels read (Fashion-MNIST's 55,000: ~0.2 s)


def labels(path: str | os.PathLike, role: str = "LMDB") -> frozenset[int] | None:
    """The distinct labels of an LMDB's Datums (what Caffe's losses index with), read once per version of the
    file; None for an LMDB larger than LABEL_SCAN_BYTES (ImageNet's: reading it would take minutes)."""
    data = Path(path) / "data.mdb"
    try:
        stat = data.stat()
    except OSError as e:
        raise ClipqError(f"{path}: cannot open the {role} ({e.strerror or e})") from None
    if stat.st_size > LABEL_SCAN_BYTES:
        return None
    return _labels(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, role)


@functools.lru_cache(maxsize=16)
def _labels(path: str, mtime_ns: int, size: int, role: str) -> frozenset[int]:
    try:
        env = lmdb.open(path, readonly=True, lock=False, subdir=True)
    except lmdb.Error as e:
        raise ClipqError(f"{path}: cannot open the {role} ({e})") from None
    datum, found = caffe_pb2().Datum(), set()
    with env.begin() as txn:
        for key, value in txn.cursor():
            try:
                datum.ParseFromString(value)
            except DecodeError:
                raise ClipqError(f"{path}: entry {key!r} of the {role} is not a Caffe Datum") from None
            found.add(datum.label)
    env.close()
    if not found:
        raise ClipqError(f"{path}: the {role} is empty")
    return frozenset(found)


def read_mean(path: str | os.PathLike) -> np.ndarray:
    """A mean.binaryproto (ours or compute_image_mean's) as a (C, H, W) float32 array."""
    blob = caffe_pb2().BlobProto()
    try:
        blob.ParseFromString(Path(path).read_bytes())
    except OSError as e:
        raise ClipqError(f"{path}: cannot read the mean file ({e.strerror or e})") from None
    except Exception:  # noqa: BLE001 - protobuf's DecodeError differs between implementations
        raise ClipqError(f"{path}: not a Caffe BlobProto (mean.binaryproto)") from None
    shape = tuple(blob.shape.dim) or (blob.num, blob.channels, blob.height, blob.width)
    if len(shape) < 3 or math.prod(shape) != len(blob.data) or math.prod(shape[:-3]) != 1:
        raise ClipqError(f"{path}: a BlobProto of shape {shape} with {len(blob.data)} values, not one C x H x W mean")
    return np.asarray(blob.data, dtype=np.float32).reshape(shape[-3:])


def with_test_source(net_param, lmdb_path: str | os.PathLike, source: str, phase: str = "TEST"):
    """A copy of a train_val NetParameter whose `phase` Data layer reads `lmdb_path` (e.g. validation data
    in TEST, a shuffled copy of the training data in TRAIN)."""
    net = caffe_pb2().NetParameter()
    net.CopyFrom(net_param)
    test_data_layer(net, source, phase).data_param.source = str(Path(lmdb_path).resolve())
    return net


def copy_lmdb(source: str | os.PathLike, out: Path, order: Callable[[int], np.ndarray], role: str = "LMDB") -> None:
    """Write the entries of the LMDB `source` at positions `order(entries)`, in that order, as a new LMDB
    (keys 00000000, 00000001, ...: Caffe's Data layer reads them so), atomically."""
    try:
        env = lmdb.open(str(source), readonly=True, lock=False, subdir=True)
    except lmdb.Error as e:
        raise ClipqError(f"{source}: cannot open the {role} ({e})") from None
    with env.begin() as txn:
        keys = [key for key, _ in txn.cursor()]
        with atomic_dir(out) as tmp:
            copy = lmdb.open(str(tmp), map_size=1 << 40, subdir=True)
            with copy.begin(write=True) as wtxn:
                for i, index in enumerate(order(len(keys))):
                    wtxn.put(b"%08d" % i, txn.get(keys[index]))
            copy.close()
    env.close()


def top1_blobs(net_param, source: str) -> tuple[str, str]:
    """(scores, labels): the bottoms of the net's top-1 Accuracy layer."""
    for layer in net_param.layer:
        if layer.type == "Accuracy" and layer.accuracy_param.top_k == 1 and len(layer.bottom) >= 2:
            return layer.bottom[0], layer.bottom[1]
    raise ClipqError(f"{source}: no top-1 Accuracy layer (bottoms: scores, labels)")


def correct_per_image(prototxt: str | os.PathLike, weights: str | os.PathLike) -> np.ndarray:
    """Whether each image of the TEST Data layer's LMDB is classified right (top-1), in LMDB order.

    Every image counts once (the last batch's wrap-around is cut off), so two models compared on the
    same LMDB are compared image by image.
    """
    require_files(prototxt, weights)
    net_param = read_net_param(prototxt)
    data = test_data_layer(net_param, str(prototxt))
    entries = lmdb_entries(data.data_param.source, f"LMDB of layer '{data.name}'")
    scores, labels = top1_blobs(net_param, str(prototxt))
    cf = caffe()
    set_mode()
    net = cf.Net(str(prototxt), str(weights), cf.TEST)
    correct = []
    for _ in range(-(-entries // data.data_param.batch_size)):
        net.forward()
        predicted = net.blobs[scores].data.reshape(net.blobs[scores].data.shape[0], -1).argmax(axis=1)
        correct.append(predicted == net.blobs[labels].data.reshape(-1).astype(int))
    return np.concatenate(correct)[:entries]


class SingleLayerNet:
    """One Caffe layer (Convolution, InnerProduct, ...) run through its own pycaffe Net (Input -> layer).

    The CLIP-Q Python layers use it so that Caffe's own code does the convolution or product, forward
    and backward; they only swap in the quantized weights.
    """

    def __init__(self, layer_type: str, param_field: str, param, input_shape: tuple[int, ...], phase: int,
                 input_grad: bool = True):
        """`input_grad=False` skips the input gradient (e.g. for a first layer, whose input is data)."""
        cf = caffe()
        self.input_grad = input_grad
        # Caffe runs a layer's backward only if it leads to a loss (or force_backward, which also computes
        # the input gradient): without input_grad, the output is declared a loss (its diff is set anyway).
        net_param = caffe_pb2().NetParameter(name=f"clipq_{layer_type}", force_backward=input_grad)
        source = net_param.layer.add(name="input", type="Input", top=["x"])
        source.input_param.shape.add(dim=list(input_shape))
        layer = net_param.layer.add(name="layer", type=layer_type, bottom=["x"], top=["y"],
                                    loss_weight=[] if input_grad else [1.0])
        getattr(layer, param_field).CopyFrom(param)
        with tempfile.NamedTemporaryFile("w", suffix=".prototxt") as f:
            f.write(str(net_param))
            f.flush()
            self.net = cf.Net(f.name, cf.TRAIN if phase == cf.TRAIN else cf.TEST)
        self.x, self.y = self.net.blobs["x"], self.net.blobs["y"]
        self.params = self.net.params["layer"]

    def reshape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Reshape the input (and the net) if needed; return the output shape."""
        if tuple(self.x.shape) != tuple(shape):
            self.x.reshape(*shape)
            self.net.reshape()
        return tuple(self.y.shape)

    def attach(self, bottom, top) -> None:
        """Make the inner net's input and output the outer layer's own bottom and top blobs (data and
        diff, through the pycaffe patch's Blob.share_*): Caffe's layer reads and writes them in place.
        Call after every reshape (a growing blob gets new memory)."""
        for inner, outer in ((self.x, bottom), (self.y, top)):
            inner.share_data(outer)
            inner.share_diff(outer)

    def forward(self) -> None:
        """The layer's forward, from the attached bottom into the attached top."""
        self.net._forward(1, 1)

    def backward(self) -> None:
        """The layer's backward from the attached top's diff: the input gradient (with input_grad) into
        the bottom's diff; parameter gradients accumulate into self.params diffs."""
        self.net._backward(1, 1)


def draw_net(net_param, rankdir: str = "LR") -> bytes:
    """The net's TEST-phase graph as PNG, drawn by Caffe's own caffe.draw (pydot + graphviz)."""
    from caffe import draw  # lazy: pycaffe, and pydot with it

    return draw.draw_net(net_param, rankdir, "png", caffe().TEST)


def read_caffemodel(path: str | os.PathLike):
    """Parse a binary caffemodel into a NetParameter; a clear error if it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ClipqError(f"{path}: cannot read caffemodel ({e.strerror})") from None
    net = caffe_pb2().NetParameter()
    try:
        net.ParseFromString(data)
    except DecodeError as e:
        raise ClipqError(f"{path}: not a binary caffemodel ({e})") from None
    if len(net.layers) and not len(net.layer):
        raise ClipqError(f"{path}: uses Caffe's deprecated V1 'layers' format; upgrade it first "
                         "(Caffe's tools/upgrade_net_proto_binary)")
    return net


def write_caffemodel(net_param, path: str | os.PathLike) -> None:
    """Serialize a NetParameter as a binary caffemodel, atomically."""
    with atomic_write(path, "wb") as f:
        f.write(net_param.SerializeToString())


def blob_shape(blob) -> tuple[int, ...]:
    """A BlobProto's shape (new `shape` field, or the legacy num/channels/height/width)."""
    if blob.HasField("shape"):
        return tuple(blob.shape.dim)
    return tuple(d for d in (blob.num, blob.channels, blob.height, blob.width))


def blob_to_array(blob) -> np.ndarray:
    """A BlobProto's float data as a float32 array of its shape."""
    values = blob.data if len(blob.data) else blob.double_data
    return np.asarray(values, dtype=np.float32).reshape(blob_shape(blob))


def set_blob(blob, array: np.ndarray) -> None:
    """Replace a BlobProto's content with `array` (shape + float data).

    Parses bytes encoded directly (`caffemodel.encode_blob`): filling a repeated float field element
    by element takes seconds for a 37M-weight layer, parsing the encoded bytes takes milliseconds.
    """
    blob.Clear()
    blob.MergeFromString(encode_blob(array))
