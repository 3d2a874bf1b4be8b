"""clipq.preflight: prototxts, LMDBs, blob shapes and caffemodels checked before Caffe sees them."""

from __future__ import annotations

import numpy as np
import pytest

from clipq.caffe import caffe_io, caffemodel, convert, nets, preflight
from clipq.data import datasets
from clipq.plan import LayerPlan
from clipq.util.errors import ClipqError
from conftest import REPO, random_caffemodel


def lenet5_train_val(path, lmdb) -> str:
    data = nets.DataSpec(str(lmdb), str(lmdb), train_batch=8, test_batch=8, input_shape=(8, 1, 28, 28), scale=1 / 256)
    path.write_text(str(nets.train_val("t", nets.lenet5_body, data)))
    return path


@pytest.fixture(scope="module")
def lenet5(tmp_path_factory, fashion_mnist_slices):
    """A LeNet-5 train_val reading the 64 'tiny' images, its deploy, and random weights for it."""
    d = tmp_path_factory.mktemp("lenet5")
    lenet5_train_val(d / "train_val.prototxt", fashion_mnist_slices["tiny"])
    data = nets.DataSpec("unused", "unused", train_batch=8, test_batch=8, input_shape=(8, 1, 28, 28), scale=1 / 256)
    (d / "deploy.prototxt").write_text(str(nets.deploy("t", nets.lenet5_body, data)))
    random_caffemodel(d / "deploy.prototxt", d / "w.caffemodel", std=0.1)
    return d


@pytest.mark.parametrize("net", ["lenet5", "lenet300_100", "alexnet", "googlenet", "resnet50"])
def test_inferred_shapes_are_the_ones_caffe_builds(net):
    deploy = REPO / "prototxt" / net / "deploy.prototxt"
    checked = preflight.check_net(deploy)
    cf = caffe_io.caffe()
    built = cf.Net(str(deploy), cf.TEST)
    for name, blob in built.blobs.items():
        if "_split_" not in name:  # Caffe's own split blobs are not in the prototxt
            assert checked.shapes[name] == tuple(blob.data.shape), name
    params = preflight.param_shapes(checked.param, checked.shapes)
    for name, blobs in built.params.items():
        assert params[name] in (None, [tuple(b.data.shape) for b in blobs]), name


def test_images_too_small_for_the_net_name_the_layer_and_the_input(tmp_path):
    rng = np.random.default_rng(0)
    datasets.write_lmdb(datasets.Split(rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8), np.zeros(4, int)),
                        tmp_path / "lmdb")
    prototxt = lenet5_train_val(tmp_path / "tv.prototxt", tmp_path / "lmdb")
    with pytest.raises(ClipqError, match=r"layer 'conv2' \(Convolution\) would output an empty blob .* data 8x1x8x8"):
        preflight.check_net(prototxt)


def test_labels_beyond_the_nets_classes_are_refused_before_caffe_corrupts_its_heap(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 1, 28, 28), dtype=np.uint8)
    datasets.write_lmdb(datasets.Split(images, np.arange(12) % 10), tmp_path / "ten")
    preflight.check_net(lenet5_train_val(tmp_path / "ok.prototxt", tmp_path / "ten"), phase="TRAIN")
    datasets.write_lmdb(datasets.Split(images, np.arange(12)), tmp_path / "twelve")
    prototxt = lenet5_train_val(tmp_path / "tv.prototxt", tmp_path / "twelve")
    with pytest.raises(ClipqError, match=r"layer 'loss' \(SoftmaxWithLoss\) scores 10 classes .* has label 11"):
        preflight.check_net(prototxt, phase="TRAIN")


def test_blobs_over_caffes_int_max_limit_are_refused_naming_the_layer(tmp_path):
    prototxt = tmp_path / "big.prototxt"
    prototxt.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1000 } } }\n'
                        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                        'inner_product_param { num_output: 3000000 } }\n')
    with pytest.raises(ClipqError, match=r"layer 'ip' has a weight blob of shape 3000000x1000: 3,000,000,000 values"):
        preflight.check_net(prototxt)
    prototxt.write_text(prototxt.read_text().replace("dim: 1 dim: 1000", "dim: 3000 dim: 1000").replace("3000000", "1000000"))
    with pytest.raises(ClipqError, match=r"layer 'ip' \(InnerProduct\) would output blob 'ip' of shape 3000x1000000"):
        preflight.check_net(prototxt)


def test_a_blob_no_layer_produces_is_named_before_caffe_aborts_on_it(tmp_path):
    prototxt = tmp_path / "net.prototxt"
    prototxt.write_text('layer { name: "data" type: "Input" top: "data" '
                        'input_param { shape { dim: 1 dim: 1 dim: 28 dim: 28 } } }\n'
                        'layer { name: "conv2" type: "Convolution" bottom: "nothing" top: "c" '
                        'convolution_param { num_output: 2 kernel_size: 3 } }\n')
    with pytest.raises(ClipqError, match="layer 'conv2' reads blob 'nothing', which no earlier layer produces"):
        preflight.check_net(prototxt)


def test_pooling_rounds_up_as_caffe_does():
    param = caffe_io.caffe_pb2().PoolingParameter(kernel_size=3, stride=2)
    assert preflight._pool_output((1, 1, 8, 8), param) == (1, 1, 4, 4)  # ceil(5 / 2) + 1


def test_missing_lmdb_names_the_layer_and_the_path(tmp_path):
    prototxt = lenet5_train_val(tmp_path / "tv.prototxt", tmp_path / "nowhere_lmdb")
    with pytest.raises(ClipqError, match="layer 'data_test': data_param.source .*nowhere_lmdb'?: no such LMDB"):
        preflight.check_net(prototxt)


def test_train_phase_reads_the_train_data_layer(tmp_path, fashion_mnist_slices):
    prototxt = lenet5_train_val(tmp_path / "tv.prototxt", fashion_mnist_slices["tiny"])
    shapes = preflight.blob_shapes(caffe_io.read_net_param(prototxt), prototxt, "TRAIN")
    assert "accuracy" not in shapes and shapes["loss"] == ()


def test_empty_prototxt_has_no_layers(tmp_path):
    (tmp_path / "empty.prototxt").write_text("")
    with pytest.raises(ClipqError, match="empty.prototxt: no layers"):
        preflight.net(tmp_path / "empty.prototxt")


def test_empty_file_is_not_a_caffemodel(tmp_path):
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    with pytest.raises(ClipqError, match="empty.caffemodel: not a caffemodel"):
        preflight.caffemodel_layers(tmp_path / "empty.caffemodel")


def test_text_file_is_not_a_caffemodel(tmp_path):
    (tmp_path / "notes.caffemodel").write_text("trained for 10 epochs\n")
    with pytest.raises(ClipqError, match="notes.caffemodel: not a"):
        preflight.caffemodel_layers(tmp_path / "notes.caffemodel")


def test_weights_of_another_net_name_the_layer_and_both_shapes(lenet5, tmp_path):
    other = tmp_path / "lenet300.prototxt"
    data = nets.DataSpec("unused", "unused", train_batch=8, test_batch=8, input_shape=(8, 1, 28, 28), scale=1 / 256)
    other.write_text(str(nets.deploy("o", nets.lenet300_100_body, data)))
    random_caffemodel(other, tmp_path / "other.caffemodel", std=0.1)
    with pytest.raises(ClipqError, match="layer 'ip1' weights have shape 300x784; .* expects 500x800"):
        preflight.check_net(lenet5 / "deploy.prototxt", tmp_path / "other.caffemodel")


def test_layers_without_weights_are_named(lenet5, tmp_path):
    layers = [layer for layer in caffemodel.read(lenet5 / "w.caffemodel") if layer.name != "conv2"]
    caffemodel.write(layers, tmp_path / "partial.caffemodel")
    with pytest.raises(ClipqError, match=r"no weights for layer\(s\) conv2 of"):
        preflight.check_net(lenet5 / "deploy.prototxt", tmp_path / "partial.caffemodel")


def test_partial_weights_pass_when_not_all_are_required(lenet5, tmp_path):
    layers = [layer for layer in caffemodel.read(lenet5 / "w.caffemodel") if layer.name != "ip2"]
    caffemodel.write(layers, tmp_path / "partial.caffemodel")
    preflight.check_net(lenet5 / "deploy.prototxt", tmp_path / "partial.caffemodel", require_all=False)


def test_clipq_layers_are_checked_as_the_layers_they_wrap(lenet5, tmp_path):
    plan = {"conv2": LayerPlan(0.5, 4), "ip1": LayerPlan(0.9, 3)}
    clipq_net = convert.to_clipq(caffe_io.read_net_param(lenet5 / "train_val.prototxt"), plan)
    (tmp_path / "clipq.prototxt").write_text(str(clipq_net))
    checked = preflight.check_net(tmp_path / "clipq.prototxt", lenet5 / "w.caffemodel")
    assert preflight.param_shapes(checked.param, checked.shapes)["ip1"] == [(500, 800), (500,)]


def test_layer_excluded_from_a_phase_is_left_out():
    layer = caffe_io.caffe_pb2().LayerParameter(name="acc", type="Accuracy")
    layer.include.add(phase=caffe_io.caffe_pb2().TEST)
    assert preflight.in_phase(layer, "TEST") and not preflight.in_phase(layer, "TRAIN")


def test_nan_or_infinite_weights_are_refused_naming_the_layer(tmp_path):
    w = np.ones((3, 4), np.float32)
    w[1, 2] = np.nan
    caffemodel.write([caffemodel.LayerWeights("fc", "InnerProduct", [np.ones(3, np.float32) * np.inf]),
                      caffemodel.LayerWeights("ip", "InnerProduct", [w])], tmp_path / "bad.caffemodel")
    with pytest.raises(ClipqError, match=r"bad.caffemodel: layer 'fc' blob 0 holds NaN or infinite values"):
        preflight.caffemodel_layers(tmp_path / "bad.caffemodel")
