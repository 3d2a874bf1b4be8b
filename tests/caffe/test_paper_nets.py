"""The paper's ImageNet nets (prototxt/alexnet, googlenet, resnet50) against its Tables 1-3 (paper_params.yaml).

Deploy nets with their fillers' random weights only: no ImageNet, no model-zoo caffemodel.
"""

from __future__ import annotations

import functools

import pytest
import yaml

from clipq import plan
from clipq.caffe import caffe_io, nets

PAPER_NETS = ("alexnet", "googlenet", "resnet50")
COMPRESSIBLE = ("Convolution", "InnerProduct")
WITH_BLOBS = COMPRESSIBLE + ("BatchNorm", "Scale")
TABLE_ROWS = {"alexnet": 8, "googlenet": 57 + 1, "resnet50": 53 + 1}  # conv + fc rows of Tables 1, 2, 3
UNITS = {"KB": 1e3, "MB": 1e6}


@functools.cache
def deploy_net(name: str):
    cf = caffe_io.caffe()
    return cf.Net(str(nets.PROTOTXT / name / "deploy.prototxt"), cf.TEST)


def paper_params(name: str) -> dict:
    return yaml.safe_load((nets.PROTOTXT / name / "paper_params.yaml").read_text())


def layer_types(net) -> dict[str, str]:
    return {name: layer.type for name, layer in zip(net._layer_names, net.layers)}


def param_bytes(net, types: tuple[str, ...] | None = None) -> int:
    """float32 bytes of the blobs of the layers of the given types (of every layer with blobs if None)."""
    kinds = layer_types(net)
    return 4 * sum(blob.data.size for name, blobs in net.params.items()
                   if types is None or kinds[name] in types for blob in blobs)


def printed_range(printed: str) -> tuple[float, float]:
    """The byte interval that rounds to a size printed like "140 KB" or "1.2 MB" (1000-based)."""
    value, unit = printed.split()
    half_step = 0.5 * 10.0 ** -len(value.partition(".")[2])
    return (float(value) - half_step) * UNITS[unit], (float(value) + half_step) * UNITS[unit]


def test_printed_range_follows_the_printed_digits():
    assert printed_range("140 KB") == (139_500, 140_500)
    assert printed_range("1.2 MB") == pytest.approx((1.15e6, 1.25e6))


@pytest.mark.parametrize("name", PAPER_NETS)
def test_deploy_loads_in_caffe_with_1000_classes(name):
    assert deploy_net(name).blobs["prob"].data.shape == (10, 1000)


@pytest.mark.parametrize("name", PAPER_NETS)
def test_paper_layers_are_the_conv_and_fc_layers_of_deploy(name):
    net = deploy_net(name)
    compressible = [layer for layer, kind in layer_types(net).items() if kind in COMPRESSIBLE]
    assert len(compressible) == TABLE_ROWS[name]
    assert set(paper_params(name)["layers"]) == set(compressible)
    assert set(paper_params(name)["paper_sizes"]) == set(compressible) | {"Overall"}


@pytest.mark.parametrize("name", PAPER_NETS)
def test_paper_params_is_a_valid_plan(name):
    layers = plan.load_plan(nets.PROTOTXT / name / "paper_params.yaml")
    assert len(layers) == TABLE_ROWS[name]


@pytest.mark.parametrize("name", PAPER_NETS)
def test_layer_sizes_match_the_original_column(name):
    net = deploy_net(name)
    for layer, sizes in paper_params(name)["paper_sizes"].items():
        if layer == "Overall":
            continue
        size = 4 * sum(blob.data.size for blob in net.params[layer])
        low, high = printed_range(sizes["original"])
        assert low <= size < high, f"{name} {layer}: {size} bytes, paper: {sizes['original']}"


@pytest.mark.parametrize("name", ["alexnet", "googlenet"])
def test_all_parameters_match_the_overall_original_size(name):
    """243.9 MB for AlexNet; 28.0 MB for GoogLeNet without its auxiliary classifiers."""
    low, high = printed_range(paper_params(name)["paper_sizes"]["Overall"]["original"])
    assert low <= param_bytes(deploy_net(name)) < high


def test_resnet50_overall_size_counts_the_batchnorm_and_scale_blobs():
    """Table 3's 102.5 MB: conv + fc weights alone are 102.02 MB; with the BatchNorm (mean, variance, factor) and
    Scale (gamma, beta) blobs 102.44 MB, which the paper's total matches (the saved caffemodel is 102.46 MB)."""
    net = deploy_net("resnet50")
    assert param_bytes(net, COMPRESSIBLE) / 1e6 == pytest.approx(102.02, abs=0.005)
    assert param_bytes(net) / 1e6 == pytest.approx(102.5, abs=0.06)
    assert param_bytes(net) == param_bytes(net, WITH_BLOBS)


@pytest.mark.parametrize("name", PAPER_NETS)
def test_train_val_names_the_layers_with_blobs_of_deploy(name):
    """The same learnable layers, except GoogLeNet's training-only auxiliary classifiers loss1/*, loss2/*."""
    train_val = caffe_io.read_net_param(nets.PROTOTXT / name / "train_val.prototxt")
    with_blobs = [layer.name for layer in train_val.layer if layer.type in WITH_BLOBS]
    aux = [layer for layer in with_blobs if layer.startswith(("loss1/", "loss2/"))]
    assert list(deploy_net(name).params) == [layer for layer in with_blobs if layer not in aux]
    assert len(aux) == (6 if name == "googlenet" else 0)  # conv, fc, classifier per branch


def test_googlenet_aux_classifiers_train_with_weight_03_and_stay_plain():
    clipq_net = caffe_io.read_net_param(nets.PROTOTXT / "googlenet" / "clipq_train_val.prototxt")
    layers = {layer.name: layer for layer in clipq_net.layer}
    assert [layers[f"loss{i}/loss"].loss_weight[0] for i in (1, 2)] == [pytest.approx(0.3)] * 2
    assert layers["loss1/classifier"].type == "InnerProduct" and layers["loss2/conv"].type == "Convolution"
    assert layers["loss3/classifier"].type == "Python"


@pytest.mark.parametrize("name", PAPER_NETS)
def test_train_val_crops_to_the_deploy_input_and_reports_top5(name):
    train_val = caffe_io.read_net_param(nets.PROTOTXT / name / "train_val.prototxt")
    crops = {layer.transform_param.crop_size for layer in train_val.layer if layer.type == "Data"}
    assert crops == {deploy_net(name).blobs["data"].data.shape[-1]}
    top5 = [layer for layer in train_val.layer if layer.name == "accuracy_top5"]
    assert len(top5) == 1 and top5[0].accuracy_param.top_k == 5
