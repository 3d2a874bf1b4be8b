"""caffe.deploy_net: the deploy of a train_val, and the TEST images as Caffe's Data layer feeds them."""

from __future__ import annotations

import numpy as np
import pytest

from clipq.caffe import caffe_io, deploy_net, nets
from clipq.util.errors import ClipqError


def train_val(slices, **transform):
    data = nets.DataSpec(str(slices["train"]), str(slices["test"]), 64, 100, (100, 1, 28, 28), **transform)
    return nets.train_val("mlp", nets.lenet300_100_body, data)


def test_the_deploy_has_an_input_for_the_data_and_no_layer_that_reads_the_label(fashion_mnist_slices):
    deploy = deploy_net.from_train_val(train_val(fashion_mnist_slices, crop_size=24), "mlp.prototxt")
    assert [layer.type for layer in deploy.param.layer] == ["Input"] + ["InnerProduct", "ReLU"] * 2 + ["InnerProduct"]
    assert list(deploy.param.layer[0].input_param.shape[0].dim) == [100, 1, 24, 24]
    assert (deploy.input, deploy.scores) == ("data", "ip3")
    assert not any(len(layer.include) or len(layer.exclude) for layer in deploy.param.layer)


@pytest.mark.parametrize("transform", [{"scale": 1 / 256}, {"crop_size": 20, "mean_value": (33.5,), "scale": 0.0125},
                                       {"mean_file": True, "crop_size": 25, "scale": 0.5}])
def test_the_images_are_the_values_caffes_data_layer_gives(fashion_mnist_slices, tmp_path, transform):
    if transform.pop("mean_file", False):  # a mean per pixel, indexed by Caffe at the uncropped pixel
        blob = caffe_io.caffe_pb2().BlobProto()
        caffe_io.set_blob(blob, np.random.default_rng(0).uniform(0, 255, (1, 1, 28, 28)).astype(np.float32))
        (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
        net = train_val(fashion_mnist_slices, **transform)
        caffe_io.test_data_layer(net, "net").transform_param.mean_file = str(tmp_path / "mean.binaryproto")
    else:
        net = train_val(fashion_mnist_slices, **transform)
    data = caffe_io.test_data_layer(net, "net")
    only_data = caffe_io.caffe_pb2().NetParameter()
    only_data.layer.add().CopyFrom(data)
    (tmp_path / "data.prototxt").write_text(str(only_data))
    cf = caffe_io.caffe()
    cf.set_mode_cpu()
    caffe_net = cf.Net(str(tmp_path / "data.prototxt"), cf.TEST)
    ours = deploy_net.batches(data, "net")
    for _ in range(3):
        caffe_net.forward()
        images, labels = next(ours)
        assert np.array_equal(images, caffe_net.blobs["data"].data)  # bit for bit
        assert np.array_equal(labels, caffe_net.blobs["label"].data.astype(int))


def test_every_image_is_read_once_the_last_batch_short(fashion_mnist_slices):
    data = caffe_io.test_data_layer(train_val(fashion_mnist_slices), "net")
    sizes = [len(images) for images, _ in deploy_net.batches(data, "net", batch=300)]
    assert sizes == [300, 300, 300, 100]


def test_random_mirroring_in_test_is_refused(fashion_mnist_slices):
    net = train_val(fashion_mnist_slices)
    data = caffe_io.test_data_layer(net, "net")
    data.transform_param.mirror = True
    with pytest.raises(ClipqError, match="mirrors its images at random"):
        next(deploy_net.batches(data, "net"))
