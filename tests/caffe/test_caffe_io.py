"""clipq.caffe.caffe_io: Datum conversion, prototxt parsing errors, and TEST-phase evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from clipq.caffe import caffe_io, nets
from clipq.data import datasets
from clipq.util.errors import ClipqError
from conftest import random_caffemodel


@pytest.fixture
def small_test_set(tmp_path):
    """The first 100 Fashion-MNIST test images as an LMDB, and a LeNet-5 train_val reading it (batch 50)."""
    split = datasets.load_split(datasets.DEBIAN_SOURCE, "test")
    split = datasets.Split(split.images[:100], split.labels[:100])
    datasets.write_lmdb(split, tmp_path / "test_lmdb")
    data = nets.DataSpec(str(tmp_path / "test_lmdb"), str(tmp_path / "test_lmdb"), train_batch=50, test_batch=50,
                         input_shape=(100, 1, 28, 28), scale=1 / 256)
    (tmp_path / "train_val.prototxt").write_text(str(nets.train_val("t", nets.lenet5_body, data)))
    (tmp_path / "deploy.prototxt").write_text(str(nets.deploy("t", nets.lenet5_body, data)))
    return split, tmp_path


def test_datum_round_trip_keeps_image_and_label():
    image = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    decoded, label = caffe_io.datum_to_image(caffe_io.image_to_datum(image, 7))
    assert np.array_equal(decoded, image) and label == 7


def test_evaluate_equals_accuracy_computed_from_the_deploy_net(small_test_set):
    split, d = small_test_set
    deploy_net = random_caffemodel(d / "deploy.prototxt", d / "w.caffemodel", std=0.1, seed=1)
    deploy_net.blobs["data"].data[...] = split.images[:, None] / 256.0
    predicted = deploy_net.forward()["prob"].argmax(axis=1)
    scores = caffe_io.evaluate(d / "train_val.prototxt", d / "w.caffemodel")
    assert scores["accuracy"] == pytest.approx(np.mean(predicted == split.labels), abs=1e-6)
    assert scores["loss"] > 0


def test_test_iterations_cover_the_lmdb_once(small_test_set):
    _, d = small_test_set
    assert caffe_io.test_iterations(caffe_io.read_net_param(d / "train_val.prototxt")) == 2


def test_evaluate_names_a_missing_weights_file(small_test_set):
    _, d = small_test_set
    with pytest.raises(ClipqError, match="nope.caffemodel: file not found"):
        caffe_io.evaluate(d / "train_val.prototxt", d / "nope.caffemodel")


def test_bad_prototxt_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer { name: "a" typo: 3 }\n')
    with pytest.raises(ClipqError, match=r"bad.prototxt:2:\d+: not a valid Caffe net prototxt: .*\"typo\""):
        caffe_io.read_net_param(bad)


def test_binary_prototxt_is_refused_without_quoting_its_bytes(tmp_path):
    binary = tmp_path / "weights.prototxt"
    binary.write_bytes(b"\x08\x96\x01\xff\x00")
    with pytest.raises(ClipqError, match="weights.prototxt: not a valid Caffe net prototxt: binary data"):
        caffe_io.read_net_param(binary)


def test_the_pycaffe_patch_shares_blob_memory_and_refuses_a_size_mismatch():
    inner = caffe_io.SingleLayerNet("InnerProduct", "inner_product_param",
                                    _ip_param(3), (2, 4), caffe_io.caffe().TRAIN)
    other = caffe_io.SingleLayerNet("InnerProduct", "inner_product_param",
                                    _ip_param(3), (2, 4), caffe_io.caffe().TRAIN)
    mine, theirs = inner.params[0], other.params[0]
    mine.share_data(theirs)
    mine.share_diff(theirs)
    theirs.data[...] = 7
    theirs.diff[...] = 5
    assert (mine.data == 7).all() and (mine.diff == 5).all()
    with pytest.raises(ValueError, match="12 elements with one of 3"):
        mine.share_data(inner.params[1])


def _ip_param(outputs: int):
    param = caffe_io.caffe_pb2().LayerParameter().inner_product_param
    param.num_output = outputs
    return param
