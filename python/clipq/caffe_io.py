"""The thin adapter between clipq and pycaffe: prototxt/caffemodel/Datum in and out, running nets.

Only this module (and `layers/`) imports `caffe`; everything else in clipq is plain numpy.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from clipq.errors import ClipqError

os.environ.setdefault("GLOG_minloglevel", "2")  # keep Caffe's per-layer setup log out of clipq's output


def caffe():
    """Import pycaffe lazily (it is slow to import and not needed by the pure-numpy modules)."""
    import caffe as _caffe

    return _caffe


def caffe_pb2():
    """Caffe's protobuf messages (imports only the generated module, not the C++ extension)."""
    from caffe.proto import caffe_pb2 as _pb2

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
    from google.protobuf import text_format

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ClipqError(f"{path}: cannot read {kind} ({e.strerror})") from None
    message = getattr(caffe_pb2(), message_name)()
    try:
        text_format.Merge(text, message)
    except text_format.ParseError as e:
        raise ClipqError(f"{path}: not a valid Caffe {kind}: {e}") from None
    return message


def read_net_param(prototxt: str | os.PathLike):
    """Parse a (train_val or deploy) net prototxt into a NetParameter."""
    return read_text_proto(prototxt, "NetParameter", "net prototxt")


def test_iterations(net_param, phase_name: str = "TEST") -> int:
    """Iterations that cover a TEST-phase Data layer's LMDB once (entries / batch_size, rounded up)."""
    import lmdb

    pb2 = caffe_pb2()
    phase = pb2.Phase.Value(phase_name)
    for layer in net_param.layer:
        if layer.type != "Data" or not all(rule.phase == phase for rule in layer.include):
            continue
        source, batch = layer.data_param.source, layer.data_param.batch_size
        try:
            env = lmdb.open(source, readonly=True, lock=False, subdir=True)
        except lmdb.Error as e:
            raise ClipqError(f"layer '{layer.name}': cannot open data_param.source {source!r} ({e})") from None
        entries = env.stat()["entries"]
        env.close()
        return -(-entries // batch)
    raise ClipqError(f"net '{net_param.name}' has no {phase_name}-phase Data layer to evaluate on")


def evaluate(prototxt: str | os.PathLike, weights: str | os.PathLike, iterations: int | None = None) -> dict:
    """Run a train_val net in TEST phase over its test set; return the mean of each scalar output."""
    for f in (prototxt, weights):
        if not Path(f).is_file():
            raise ClipqError(f"{f}: file not found")
    if iterations is None:
        iterations = test_iterations(read_net_param(prototxt))
    cf = caffe()
    cf.set_mode_cpu()
    net = cf.Net(str(prototxt), str(weights), cf.TEST)
    totals: dict[str, float] = {}
    for _ in range(iterations):
        outputs = net.forward()
        for name, value in outputs.items():
            if value.size == 1:
                totals[name] = totals.get(name, 0.0) + float(value.flat[0])
    return {name: total / iterations for name, total in totals.items()}
