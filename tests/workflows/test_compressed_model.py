"""clipq encode / decode on caffemodels: bit-exact with export, lossless for exported models, and
clear errors for plans and prototxts that do not match."""

from __future__ import annotations

import numpy as np
import pytest

from clipq.caffe import caffe_io, caffemodel, convert
from clipq.plan import LayerPlan
from clipq.storage import size
from clipq.util.errors import ClipqError
from clipq.workflows import compressed_model
from conftest import random_caffemodel

PLAN = {"conv1": LayerPlan(0.2, 6), "conv2": LayerPlan(0.6, 4), "ip1": LayerPlan(0.95, 3), "ip2": LayerPlan(0.5, 4)}


@pytest.fixture
def lenet5(tmp_path, repo):
    """LeNet-5 deploy with random full-precision weights, and its CLIP-Q version."""
    deploy = repo / "prototxt" / "lenet5" / "deploy.prototxt"
    random_caffemodel(deploy, tmp_path / "w.caffemodel", std=0.05)
    clipq_proto = tmp_path / "clipq.prototxt"
    clipq_proto.write_text(str(convert.to_clipq(caffe_io.read_net_param(deploy), PLAN)))
    return deploy, clipq_proto, tmp_path / "w.caffemodel"


def weights_of(path):
    return {layer.name: layer.blobs for layer in caffemodel.read(path) if layer.blobs}


def test_decode_of_encode_equals_export(lenet5, tmp_path):
    deploy, clipq_proto, weights = lenet5
    compressed_model.encode_file(clipq_proto, weights, tmp_path / "m.clipq")
    compressed_model.decode_file(tmp_path / "m.clipq", tmp_path / "decoded.caffemodel", deploy)
    convert.export(clipq_proto, weights, tmp_path / "exported.caffemodel")
    decoded, exported = weights_of(tmp_path / "decoded.caffemodel"), weights_of(tmp_path / "exported.caffemodel")
    assert decoded.keys() == exported.keys()
    for name in decoded:
        for a, b in zip(decoded[name], exported[name]):
            assert np.array_equal(a, b)


def test_an_exported_model_is_stored_exactly(lenet5, tmp_path):
    deploy, clipq_proto, weights = lenet5
    convert.export(clipq_proto, weights, tmp_path / "exported.caffemodel")
    compressed_model.encode_file(deploy, tmp_path / "exported.caffemodel", tmp_path / "m.clipq", PLAN)
    compressed_model.decode_file(tmp_path / "m.clipq", tmp_path / "again.caffemodel")
    again, exported = weights_of(tmp_path / "again.caffemodel"), weights_of(tmp_path / "exported.caffemodel")
    for name in exported:
        for a, b in zip(again[name], exported[name]):
            assert np.array_equal(a, b)


def test_decoded_caffemodel_loads_in_caffe_with_the_plain_deploy(lenet5, tmp_path):
    deploy, clipq_proto, weights = lenet5
    compressed_model.encode_file(clipq_proto, weights, tmp_path / "m.clipq", use_huffman=True)
    compressed_model.decode_file(tmp_path / "m.clipq", tmp_path / "d.caffemodel")
    cf = caffe_io.caffe()
    net = cf.Net(str(deploy), str(tmp_path / "d.caffemodel"), cf.TEST)
    assert np.count_nonzero(net.params["ip1"][0].data) == round(0.05 * 500 * 800)


def test_decoding_for_another_net_names_the_layer(lenet5, tmp_path, repo):
    _, clipq_proto, weights = lenet5
    compressed_model.encode_file(clipq_proto, weights, tmp_path / "m.clipq")
    other = repo / "prototxt" / "lenet300_100" / "deploy.prototxt"
    with pytest.raises(ClipqError, match="layer 'ip1' has blob shapes"):
        compressed_model.decode_file(tmp_path / "m.clipq", tmp_path / "d.caffemodel", other)
    assert not (tmp_path / "d.caffemodel").exists()


def test_a_damaged_clipq_is_refused_and_nothing_is_written(lenet5, tmp_path):
    _, clipq_proto, weights = lenet5
    compressed_model.encode_file(clipq_proto, weights, tmp_path / "m.clipq")
    with open(tmp_path / "m.clipq", "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(ClipqError, match="m.clipq: 16 bytes after the last layer"):
        compressed_model.decode_file(tmp_path / "m.clipq", tmp_path / "d.caffemodel")
    assert not (tmp_path / "d.caffemodel").exists()


def test_plan_must_name_conv_or_fc_layers_of_the_net(lenet5, tmp_path):
    deploy, _, weights = lenet5
    with pytest.raises(ClipqError, match="layer 'pool1' is a Pooling layer"):
        compressed_model.encode_file(deploy, weights, tmp_path / "m.clipq", {"pool1": LayerPlan(0.5, 3)})
    with pytest.raises(ClipqError, match="has no CLIP-Q layers; give a plan"):
        compressed_model.encode_file(deploy, weights, tmp_path / "m.clipq")


def test_not_a_caffemodel_is_a_clear_error(tmp_path, lenet5):
    deploy, _, _ = lenet5
    (tmp_path / "bad.caffemodel").write_bytes(b"\xff" * 64)
    with pytest.raises(ClipqError, match="bad.caffemodel: not a valid caffemodel"):
        compressed_model.encode_file(deploy, tmp_path / "bad.caffemodel", tmp_path / "m.clipq", PLAN)


def test_caffemodel_reader_agrees_with_protobuf(lenet5):
    _, _, weights = lenet5
    fast = weights_of(weights)
    for layer in caffe_io.read_caffemodel(weights).layer:
        if len(layer.blobs):
            for blob, array in zip(layer.blobs, fast[layer.name]):
                assert np.array_equal(caffe_io.blob_to_array(blob), array)


def test_random_weights_size_table_matches_the_encoded_layers(repo):
    deploy = repo / "prototxt" / "lenet5" / "deploy.prototxt"
    data, layers = compressed_model.encode_model(deploy, None, PLAN)
    rows = size.rows(layers)
    assert [r.layer for r in rows] == list(PLAN)
    ip1 = next(r for r in rows if r.layer == "ip1")
    assert ip1.original == 4 * (500 * 800 + 500)
    assert ip1.compressed == next(layer.facts["length"] for layer in layers if layer.name == "ip1")
    assert size.overall(layers).compressed < len(data)  # the file adds its header


def test_layers_sharing_weights_are_stored_once_and_decode_as_caffe_shares_them(tmp_path):
    deploy = tmp_path / "shared.prototxt"
    deploy.write_text('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 64 } } }\n'
                      + "".join(f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                                f'param {{ name: "w" }} inner_product_param {{ num_output: 64 }} }}\n'
                                for name, bottom in (("a", "x"), ("b", "a"))))
    random_caffemodel(deploy, tmp_path / "w.caffemodel", std=0.5)
    layers = compressed_model.encode_file(deploy, tmp_path / "w.caffemodel", tmp_path / "m.clipq",
                                          {"a": LayerPlan(0.5, 4), "b": LayerPlan(0.5, 4)})
    assert [(layer.facts["encoding"], layer.facts.get("of")) for layer in layers] == [("sparse", None),
                                                                                      ("shared", "a")]
    assert layers[1].facts["length"] == 4 * 64  # b's own bias only
    compressed_model.decode_file(tmp_path / "m.clipq", tmp_path / "d.caffemodel", deploy)
    cf = caffe_io.caffe()
    net = cf.Net(str(deploy), str(tmp_path / "d.caffemodel"), cf.TEST)
    assert np.array_equal(net.params["a"][0].data, net.params["b"][0].data)
    assert abs(np.count_nonzero(net.params["b"][0].data) - 64 * 64 // 2) <= 2  # pruned at p = 0.5
