"""A train_val's deploy net, and the TEST images as its Data layer feeds them to Caffe.

`clipq compress` is given a train_val only (LMDB Data layers, losses, Accuracy); the ONNX file it writes
(`onnx_export`) is made from a deploy net. `from_train_val` derives it: the TEST-phase layers, with an Input
layer of the Data layer's shape (batch, channels, height, width; the crop size if any) in place of the Data
layer, and without the label and every layer that reads it or what is made from it (the losses, the
Accuracy). The scores the top-1 Accuracy reads stay in the net.

`batches` reads the Datums of the TEST Data layer's LMDB in Caffe's order (its keys') and transforms them as
Caffe's DataTransformer does in TEST: the centre crop, then (pixel - mean) * scale with the mean file's value
at the pixel or the channel's mean_value, in float32 as Caffe computes it, so a deploy gets the values Caffe's
Data layer gives, bit for bit. Each image is read once (Caffe wraps around at the end of the LMDB).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import lmdb
import numpy as np

from clipq.caffe import caffe_io, preflight
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError


@dataclass(frozen=True)
class Deploy:
    """The deploy net of a train_val: its NetParameter, its input blob, the scores the top-1 Accuracy reads
    (None without one) and the train_val's TEST Data layer (what `batches` reads)."""

    param: object
    input: str
    scores: str | None
    data: object


def from_train_val(net_param, source: str) -> Deploy:
    """The deploy of a train_val (`source` names it in errors): Input instead of the TEST Data layer, no label,
    no layer that depends on the label."""
    data = caffe_io.test_data_layer(net_param, source)
    if len(data.top) < 1:
        raise ClipqError(f"{source}: the TEST Data layer '{data.name}' has no top")
    image = preflight.data_sources(_only(net_param, data), source, "TEST").get(data.top[0])
    if image is None:
        raise ClipqError(f"{source}: the images of the TEST Data layer '{data.name}' ({data.data_param.source}) "
                         "are encoded (JPEG/PNG) or not in an LMDB, so the deploy's input shape is not known here")
    deploy = caffe_io.caffe_pb2().NetParameter(name=net_param.name)
    source_layer = deploy.layer.add(name=data.name, type="Input", top=[data.top[0]])
    source_layer.input_param.shape.add(dim=list(image))
    label_made = set(data.top[1:])
    for layer in net_param.layer:
        if layer is data or not preflight.in_phase(layer, "TEST"):
            continue
        if any(bottom in label_made for bottom in layer.bottom):
            label_made.update(layer.top)
            continue
        kept = deploy.layer.add()
        kept.CopyFrom(layer)
        kept.ClearField("include")
        kept.ClearField("exclude")
    try:
        scores = caffe_io.top1_blobs(net_param, source)[0]
    except ClipqError:
        scores = None
    if scores in label_made:
        scores = None
    return Deploy(deploy, data.top[0], scores, data)


def _only(net_param, layer):
    """A NetParameter with `layer` alone (to read the shape of its images without the rest of the net)."""
    net = caffe_io.caffe_pb2().NetParameter()
    net.layer.add().CopyFrom(layer)
    return net


def transform(data_layer, source: str):
    """f(datum) -> the float32 (C, H, W) image Caffe's DataTransformer makes of it in TEST (a ClipqError for
    what it would do at random, or what is not read here)."""
    param = data_layer.transform_param
    where = f"{source}: layer '{data_layer.name}'"
    if param.mirror:
        raise ClipqError(f"{where} mirrors its images at random (transform_param.mirror), even in TEST")
    if param.HasField("mean_file") and len(param.mean_value):
        raise ClipqError(f"{where}: transform_param has both mean_file and mean_value (Caffe refuses it)")
    scale = np.float32(param.scale)
    crop = param.crop_size
    mean_file = caffe_io.read_mean(param.mean_file) if param.HasField("mean_file") else None
    mean_values = np.asarray(param.mean_value, np.float32)

    def apply(datum) -> np.ndarray:
        if datum.encoded:
            raise ClipqError(f"{where}: the LMDB holds encoded (JPEG/PNG) images, which are not decoded here")
        shape = (datum.channels, datum.height, datum.width)
        if len(datum.data):
            pixels = np.frombuffer(datum.data, np.uint8).astype(np.float32).reshape(shape)
        else:
            pixels = np.asarray(datum.float_data, np.float32).reshape(shape)
        if mean_file is not None:
            if mean_file.size != pixels.size:
                raise ClipqError(f"{where}: the mean file has {mean_file.size} values, the images "
                                 f"{'x'.join(map(str, shape))}")
            pixels = pixels - mean_file.reshape(shape)
        elif mean_values.size:
            if mean_values.size not in (1, shape[0]):
                raise ClipqError(f"{where}: {mean_values.size} mean_value(s) for {shape[0]} channels")
            pixels = pixels - mean_values.reshape(-1, 1, 1)
        if crop:  # Caffe crops after indexing the mean at the uncropped pixel: the same as crop last
            top, left = (shape[1] - crop) // 2, (shape[2] - crop) // 2
            pixels = pixels[:, top:top + crop, left:left + crop]
        return pixels * scale

    return apply


def batches(data_layer, source: str, batch: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of the TEST Data layer's LMDB, `batch` (default: the layer's batch_size) at a time, in
    LMDB key order, every image once (the last batch may be shorter)."""
    apply = transform(data_layer, source)
    batch = batch or data_layer.data_param.batch_size
    path = data_layer.data_param.source
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    except lmdb.Error as e:
        raise ClipqError(f"{path}: cannot open the test LMDB ({e})") from None
    datum = caffe_io.caffe_pb2().Datum()
    try:
        with env.begin() as txn:
            images, labels = [], []
            for raw in txn.cursor().iternext(keys=False):
                datum.ParseFromString(raw)
                images.append(apply(datum))
                labels.append(datum.label)
                if len(images) == batch:
                    yield np.stack(images), np.asarray(labels)
                    images, labels = [], []
            if images:
                yield np.stack(images), np.asarray(labels)
    finally:
        env.close()


def write(deploy: Deploy, path: str | os.PathLike, title: str) -> None:
    """The deploy as a prototxt with a comment line saying what it is."""
    with atomic_write(path) as f:
        f.write(f"# {title}\n{deploy.param}")
