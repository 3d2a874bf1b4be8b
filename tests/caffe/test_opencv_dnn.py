"""OpenCV's DNN module (opencv-python-headless 4.14) runs what clipq exports as Caffe runs it: the dense ONNX of
`clipq export-onnx`, and the original deploy + caffemodel (OpenCV 4 reads Caffe; OpenCV 5 no longer does).
OpenCV 4.14 does not read the ONNX with codes + codebook (a parse error in Gather; UINT4 is an unsupported
type): a test pins that, so that a version that reads it is noticed.

Each net gets random weights and inputs; every output of the net must equal Caffe's blob within 1e-4 of its
largest magnitude. The nets are the LeNets and the hand-written nets of test_onnx_export, less what OpenCV
4.14 computes differently from Caffe (measured; docs/onnx.md): through ONNX, an AveragePool with pads (it
ignores count_include_pad=1), hence padded AVE pooling and WITHIN_CHANNEL LRN; through Caffe, the Bias type
(unknown to it), InnerProduct's `transpose`, a Scale with a second bottom along axis 0 and LRN's `k` (it
uses 1)."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest

from clipq.caffe import caffe_io
from clipq.workflows import compressed_model
from conftest import REPO
# compressed_lenet5: the ONNX tests' module fixture (one .clipq of PLAN per module), shared by import
from test_onnx_export import (CONV, LENET5, MERGE, NORM, POOL, RTOL, SHAPES, compressed_lenet5, export_dense,
                              random_weights)


def without(text: str, *names: str) -> str:
    """A hand-written net less the layers named (one line each)."""
    return "".join(line + "\n" for line in text.splitlines() if not any(f'name: "{n}"' in line for n in names))


POOL_UNPADDED_AVE = "\n".join(line for line in POOL.splitlines()
                              if "pool: AVE" not in line or "pad: 0" in line or "global" in line) + "\n"
ONNX_NETS = {"conv": CONV, "pool": POOL_UNPADDED_AVE, "merge": MERGE, "shapes": SHAPES,
             "norm": NORM.replace(" norm_region: WITHIN_CHANNEL", "")}
CAFFE_NETS = {"conv": CONV, "pool": POOL, "merge": without(MERGE, "gated"),
              "shapes": without(SHAPES, "ip_transposed"), "norm": without(NORM, "bn2_bias").replace(" k: 2", "")}


def caffe_outputs(caffe_net, seed: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random inputs, and the net's outputs (blobs no layer reads) after pycaffe's forward pass."""
    rng = np.random.default_rng(seed)
    feeds = {name: rng.standard_normal(caffe_net.blobs[name].data.shape).astype(np.float32)
             for name in caffe_net.inputs}
    for name, value in feeds.items():
        caffe_net.blobs[name].data[...] = value
    caffe_net.forward()
    return feeds, {name: caffe_net.blobs[name].data.copy() for name in caffe_net.outputs}


def assert_opencv_agrees(cv_net, feeds, want: dict[str, np.ndarray], layer_tops: dict[str, str] | None = None):
    """Run an OpenCV net on `feeds`; each of its outputs (an output layer, named by its top in
    `layer_tops` if given) must equal Caffe's."""
    for name, value in feeds.items():
        cv_net.setInput(value, name)
    names = list(cv_net.getUnconnectedOutLayersNames())
    got = dict(zip(names, cv_net.forward(names)))
    blobs = {(layer_tops or {}).get(name, name): value for name, value in got.items()}
    assert set(blobs) == set(want)
    for name, value in blobs.items():
        expected = want[name]
        assert value.size == expected.size, (name, value.shape, expected.shape)
        scale = max(float(np.abs(expected).max()), 1e-30)
        error = np.abs(value.reshape(expected.shape) - expected).max()
        assert error <= RTOL * scale, (name, error / scale)


def read_onnx(model, path):
    onnx.save(model, str(path))
    return cv2.dnn.readNetFromONNX(str(path))


def read_caffe(deploy, weights):
    tops = {}
    for layer in caffe_io.read_net_param(deploy).layer:
        tops.update({layer.name: layer.top[0]} if layer.top else {})
    return cv2.dnn.readNetFromCaffe(str(deploy), str(weights)), tops


@pytest.mark.parametrize("name", sorted(ONNX_NETS))
def test_hand_written_nets_through_onnx_agree_with_caffe(name, tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(f'name: "{name}"\n' + ONNX_NETS[name])
    net = random_weights(deploy, tmp_path / "w.caffemodel")
    feeds, want = caffe_outputs(net)
    assert_opencv_agrees(read_onnx(export_dense(deploy, tmp_path / "w.caffemodel").model, tmp_path / "m.onnx"),
                         feeds, want)


@pytest.mark.parametrize("name", sorted(CAFFE_NETS))
def test_hand_written_caffe_nets_agree_with_caffe(name, tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(f'name: "{name}"\n' + CAFFE_NETS[name])
    net = random_weights(deploy, tmp_path / "w.caffemodel")
    feeds, want = caffe_outputs(net)
    cv_net, tops = read_caffe(deploy, tmp_path / "w.caffemodel")
    assert_opencv_agrees(cv_net, feeds, want, tops)


@pytest.mark.parametrize("net", ["lenet5", "lenet300_100"])
def test_lenets_agree_with_caffe_through_onnx_and_caffe(net, tmp_path):
    deploy = REPO / "prototxt" / net / "deploy.prototxt"
    caffe_net = random_weights(deploy, tmp_path / "w.caffemodel")
    feeds, want = caffe_outputs(caffe_net)
    assert_opencv_agrees(read_onnx(export_dense(deploy, tmp_path / "w.caffemodel").model, tmp_path / "m.onnx"),
                         feeds, want)
    cv_net, tops = read_caffe(deploy, tmp_path / "w.caffemodel")
    assert_opencv_agrees(cv_net, feeds, want, tops)


def test_compressed_lenet5_decoded_agrees_with_caffe_through_caffe_and_dense_onnx(compressed_lenet5, tmp_path):
    d = compressed_lenet5
    cf = caffe_io.caffe()
    feeds, want = caffe_outputs(cf.Net(str(LENET5), str(d / "decoded.caffemodel"), cf.TEST))
    cv_net, tops = read_caffe(LENET5, d / "decoded.caffemodel")
    assert_opencv_agrees(cv_net, feeds, want, tops)
    compressed_model.export_onnx(LENET5, tmp_path / "dense.onnx", weights=d / "decoded.caffemodel")
    assert_opencv_agrees(cv2.dnn.readNetFromONNX(str(tmp_path / "dense.onnx")), feeds, want)


@pytest.mark.parametrize("opset", [13, 21])
def test_opencv_4_does_not_read_the_codes_and_codebook_onnx(compressed_lenet5, tmp_path, opset):
    compressed_model.export_onnx(LENET5, tmp_path / "m.onnx", clipq=compressed_lenet5 / "m.clipq", opset=opset)
    with pytest.raises(cv2.error, match="Gather" if opset == 13 else "Unsupported data type"):
        cv2.dnn.readNetFromONNX(str(tmp_path / "m.onnx"))
