"""layers/clipq_layers.py in real Caffe: forward = Caffe's layer with the quantized weights, backward =
Caffe's gradients written to the full-precision weights (straight-through), Caffe-shaped blobs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipq.caffe import caffe_io, distill
from clipq.caffe.param_str import WRAPPED
from clipq.methods import METHODS
from clipq.methods import clipq as clipq_method
from clipq.quant.prune_quant import clip_quantize

CONV = {"num_output": 6, "kernel_size": [3], "stride": [2], "pad": [1], "group": 2, "dilation": [1],
        "weight_filler": {"type": "gaussian", "std": 0.1}, "bias_filler": {"type": "constant", "value": 0.2}}
IP = {"num_output": 7, "weight_filler": {"type": "gaussian", "std": 0.1},
      "bias_filler": {"type": "constant", "value": 0.1}}
SHAPES = {"Convolution": (3, 4, 9, 9), "InnerProduct": (5, 2, 3, 4)}


def text_param(kind, param):
    """A *_param dict as prototxt text (repeated fields as repeated keys)."""
    from google.protobuf import json_format

    message = getattr(caffe_io.caffe_pb2().LayerParameter(), {"Convolution": "convolution_param",
                                                              "InnerProduct": "inner_product_param"}[kind])
    json_format.ParseDict(param, message)
    return str(message).replace("\n", " ")


def net_pair(tmp_path, kind, param, p, bits, **options):
    """(CLIP-Q net, plain Caffe net) with the same input shape, both with a 'layer' and input 'x'."""
    cf = caffe_io.caffe()
    shape = " ".join(f"dim: {d}" for d in SHAPES[kind])
    field = {"Convolution": "convolution_param", "InnerProduct": "inner_product_param"}[kind]
    head = f'force_backward: true layer {{ name: "x" type: "Input" top: "x" input_param {{ shape {{ {shape} }} }} }}'
    cls = {"Convolution": "ClipQConvolution", "InnerProduct": "ClipQInnerProduct"}[kind]
    param_str = json.dumps({"p": p, "bits": bits, **options, field: param, "name": "layer"}).replace("'", "\\'")
    clipq_net = (head + f' layer {{ name: "layer" type: "Python" bottom: "x" top: "y" python_param {{ '
                 f"module: 'clipq_layers' layer: '{cls}' param_str: '{param_str}' }} }}")
    plain_net = head + (f' layer {{ name: "layer" type: "{kind}" bottom: "x" top: "y" '
                        f'{field} {{ {text_param(kind, param)} }} }}')
    (tmp_path / "clipq.prototxt").write_text(clipq_net)
    (tmp_path / "plain.prototxt").write_text(plain_net)
    return (cf.Net(str(tmp_path / "clipq.prototxt"), cf.TRAIN), cf.Net(str(tmp_path / "plain.prototxt"), cf.TRAIN))


def run(net, x, dy):
    net.blobs["x"].data[...] = x
    net.forward()
    for blob in net.params["layer"]:
        blob.diff[...] = 0
    net.blobs["y"].diff[...] = dy
    net.backward()
    return (net.blobs["y"].data.copy(), net.blobs["x"].diff.copy(),
            [blob.diff.copy() for blob in net.params["layer"]])


@pytest.mark.parametrize("kind,param", [("Convolution", CONV), ("InnerProduct", IP)])
def test_equals_caffes_layer_run_with_the_quantized_weights(tmp_path, kind, param):
    clipq_net, plain_net = net_pair(tmp_path, kind, param, p=0.3, bits=3)
    w, b = (blob.data for blob in clipq_net.params["layer"])
    plain_net.params["layer"][0].data[...] = clip_quantize(w, 0.3, 3).weights
    plain_net.params["layer"][1].data[...] = b
    rng = np.random.default_rng(0)
    x = rng.normal(size=SHAPES[kind]).astype(np.float32)
    dy = rng.normal(size=clipq_net.blobs["y"].data.shape).astype(np.float32)
    (y1, dx1, dp1), (y2, dx2, dp2) = run(clipq_net, x, dy), run(plain_net, x, dy)
    assert y1.shape == y2.shape
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_array_equal(dp1[0], dp2[0])  # straight-through: dL/dW_fp = dL/dW_quantized
    np.testing.assert_array_equal(dp1[1], dp2[1])


@pytest.mark.parametrize("kind,param", [("Convolution", CONV), ("InnerProduct", IP)])
def test_p0_and_8_bits_is_close_to_the_plain_layer(tmp_path, kind, param):
    clipq_net, plain_net = net_pair(tmp_path, kind, param, p=0.0, bits=8)
    for mine, theirs in zip(clipq_net.params["layer"], plain_net.params["layer"]):
        theirs.data[...] = mine.data
    rng = np.random.default_rng(1)
    x = rng.normal(size=SHAPES[kind]).astype(np.float32)
    dy = rng.normal(size=clipq_net.blobs["y"].data.shape).astype(np.float32)
    (y1, dx1, dp1), (y2, dx2, dp2) = run(clipq_net, x, dy), run(plain_net, x, dy)
    scale = np.abs(y2).max()
    assert np.abs(y1 - y2).max() < 0.02 * scale
    assert np.abs(dx1 - dx2).max() < 0.02 * np.abs(dx2).max()
    np.testing.assert_allclose(dp1[0], dp2[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,param", [("Convolution", CONV), ("InnerProduct", IP)])
def test_blobs_have_caffes_shapes_and_fillers(tmp_path, kind, param):
    clipq_net, plain_net = net_pair(tmp_path, kind, param, p=0.5, bits=4)
    mine, theirs = clipq_net.params["layer"], plain_net.params["layer"]
    assert [b.data.shape for b in mine] == [b.data.shape for b in theirs]
    assert np.all(mine[1].data == param["bias_filler"]["value"])
    assert 0.05 < mine[0].data.std() < 0.2


def test_the_full_precision_weights_are_never_overwritten(tmp_path):
    clipq_net, _ = net_pair(tmp_path, "InnerProduct", IP, p=0.6, bits=2)
    before = clipq_net.params["layer"][0].data.copy()
    clipq_net.forward()
    clipq_net.backward()
    np.testing.assert_array_equal(clipq_net.params["layer"][0].data, before)


def test_a_pruned_weight_comes_back_when_it_grows(tmp_path):
    clipq_net, _ = net_pair(tmp_path, "InnerProduct", IP, p=0.4, bits=3)
    w = clipq_net.params["layer"][0].data
    inner = clipq_net.layers[1].inner.params[0].data
    w[0, 0] = 1e-7
    clipq_net.forward()
    assert inner[0, 0] == 0
    w[0, 0] = 0.5
    clipq_net.forward()
    assert inner[0, 0] > 0


def test_save_and_copy_from_round_trip_the_full_precision_weights(tmp_path):
    clipq_net, _ = net_pair(tmp_path, "Convolution", CONV, p=0.3, bits=3)
    clipq_net.params["layer"][1].data[...] = 0.7
    clipq_net.save(str(tmp_path / "w.caffemodel"))
    cf = caffe_io.caffe()
    loaded = cf.Net(str(tmp_path / "clipq.prototxt"), str(tmp_path / "w.caffemodel"), cf.TEST)
    for a, b in zip(clipq_net.params["layer"], loaded.params["layer"]):
        np.testing.assert_array_equal(a.data, b.data)


def test_a_plain_caffemodel_loads_into_the_clipq_net(tmp_path):
    clipq_net, plain_net = net_pair(tmp_path, "InnerProduct", IP, p=0.3, bits=3)
    plain_net.params["layer"][0].data[...] = np.arange(plain_net.params["layer"][0].data.size).reshape(7, 24)
    plain_net.save(str(tmp_path / "plain.caffemodel"))
    clipq_net.copy_from(str(tmp_path / "plain.caffemodel"))
    np.testing.assert_array_equal(clipq_net.params["layer"][0].data, plain_net.params["layer"][0].data)


def test_bad_param_str_stops_net_creation_naming_the_layer_and_key(tmp_path):
    with pytest.raises(ValueError, match=r"CLIP-Q layer 'layer' \(InnerProduct\) param_str: p must be a number"):
        net_pair(tmp_path, "InnerProduct", IP, p=1.5, bits=3)


def test_a_first_layer_gets_the_same_weight_gradient_every_iteration(tmp_path):
    """The input of a first layer needs no gradient; after the first backward the layer stops computing
    it, and its weight gradient must stay Caffe's."""
    cf = caffe_io.caffe()
    shape = " ".join(f"dim: {d}" for d in SHAPES["Convolution"])
    field = "convolution_param"
    data = (f'layer {{ name: "x" type: "DummyData" top: "x" dummy_data_param {{ shape {{ {shape} }} '
            f'data_filler {{ type: "gaussian" std: 1 }} }} }}')
    loss = 'layer { name: "loss" type: "Reduction" bottom: "y" top: "loss" loss_weight: 1 }'
    param_str = json.dumps({"p": 0.3, "bits": 4, field: CONV, "name": "layer"})
    clipq_layer = (f'layer {{ name: "layer" type: "Python" bottom: "x" top: "y" python_param {{ '
                   f"module: 'clipq_layers' layer: 'ClipQConvolution' param_str: '{param_str}' }} }}")
    plain_layer = (f'layer {{ name: "layer" type: "Convolution" bottom: "x" top: "y" '
                   f'{field} {{ {text_param("Convolution", CONV)} }} }}')
    (tmp_path / "c.prototxt").write_text(data + clipq_layer + loss)
    (tmp_path / "p.prototxt").write_text(data + plain_layer + loss)
    clipq_net = cf.Net(str(tmp_path / "c.prototxt"), cf.TRAIN)
    plain_net = cf.Net(str(tmp_path / "p.prototxt"), cf.TRAIN)
    for _ in range(3):
        plain_net.params["layer"][0].data[...] = clip_quantize(clipq_net.params["layer"][0].data, 0.3, 4).weights
        plain_net.params["layer"][1].data[...] = clipq_net.params["layer"][1].data
        clipq_net.forward()
        plain_net.blobs["x"].data[...] = clipq_net.blobs["x"].data
        plain_net.forward(start="layer")
        for net in (clipq_net, plain_net):
            for blob in net.params["layer"]:
                blob.diff[...] = 0
            net.backward()
        for mine, theirs in zip(clipq_net.params["layer"], plain_net.params["layer"]):
            np.testing.assert_allclose(mine.diff, theirs.diff, rtol=1e-5, atol=1e-6)
            assert np.abs(mine.diff).max() > 0


@pytest.mark.parametrize("kind,param", [("Convolution", CONV), ("InnerProduct", IP)])
def test_a_larger_batch_after_a_step_still_equals_caffe(tmp_path, kind, param):
    """The inner layer works on the outer blobs' memory: a batch that grows reallocates them."""
    clipq_net, plain_net = net_pair(tmp_path, kind, param, p=0.3, bits=3)
    rng = np.random.default_rng(1)
    for batch in (SHAPES[kind][0], 3 * SHAPES[kind][0]):
        shape = (batch,) + SHAPES[kind][1:]
        for net in (clipq_net, plain_net):
            net.blobs["x"].reshape(*shape)
            net.reshape()
        w, b = (blob.data for blob in clipq_net.params["layer"])
        plain_net.params["layer"][0].data[...] = clip_quantize(w, 0.3, 3).weights
        plain_net.params["layer"][1].data[...] = b
        x = rng.normal(size=shape).astype(np.float32)
        dy = rng.normal(size=clipq_net.blobs["y"].data.shape).astype(np.float32)
        (y1, dx1, dp1), (y2, dx2, dp2) = run(clipq_net, x, dy), run(plain_net, x, dy)
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(dx1, dx2)
        for mine, theirs in zip(dp1, dp2):
            np.testing.assert_array_equal(mine, theirs)


def test_gradients_accumulate_into_the_weights_diff_like_caffes(tmp_path):
    """Caffe's layers add to the param diff (iter_size > 1 relies on it): two backward passes without
    clearing give twice one pass, as the plain layer does."""
    clipq_net, plain_net = net_pair(tmp_path, "InnerProduct", IP, p=0.3, bits=3)
    w, b = (blob.data for blob in clipq_net.params["layer"])
    plain_net.params["layer"][0].data[...] = clip_quantize(w, 0.3, 3).weights
    plain_net.params["layer"][1].data[...] = b
    rng = np.random.default_rng(2)
    x = rng.normal(size=SHAPES["InnerProduct"]).astype(np.float32)
    dy = rng.normal(size=clipq_net.blobs["y"].data.shape).astype(np.float32)
    for net in (clipq_net, plain_net):
        run(net, x, dy)
        net.backward()  # again, diffs not cleared
    for mine, theirs in zip(clipq_net.params["layer"], plain_net.params["layer"]):
        np.testing.assert_allclose(mine.diff, theirs.diff, rtol=1e-6)
        assert np.abs(mine.diff).max() > 0


def test_every_layer_kind_a_method_uses_has_a_convolution_and_an_inner_product_layer():
    import clipq_layers  # layers/, as `caffe train` imports it

    for kind in METHODS.layer_kinds():
        for wrapped in WRAPPED:
            layer = getattr(clipq_layers, f"{kind}{wrapped}", None)
            assert isinstance(layer, type) and layer.WRAPPED_TYPE == wrapped, f"{kind}{wrapped}"


def test_with_a_ramp_p_grows_by_zhu_and_gupta_s_schedule_over_the_training_passes(tmp_path):
    clipq_net, _ = net_pair(tmp_path, "InnerProduct", IP, p=0.8, bits=4, ramp=4)
    w = clipq_net.params["layer"][0].data
    passes = clipq_net.params["layer"][-1].data
    inner = clipq_net.layers[1].inner.params[0].data
    pruned = []
    for _ in range(6):
        clipq_net.forward()
        pruned.append(float(np.mean(inner == 0)))
    assert passes[0] == 6 and len(clipq_net.params["layer"]) == 3
    expected = [np.mean(clip_quantize(w, clipq_method.ramped_rate(0.8, t, 4), 4).weights == 0) for t in range(6)]
    assert pruned == pytest.approx(expected) and pruned[0] == 0
    assert pruned[4] == pruned[5] == pytest.approx(0.8, abs=0.01)


def test_the_ramp_schedule_is_cubic_and_ends_at_p():
    assert clipq_method.ramped_rate(0.9, 0, 10) == 0.0
    assert clipq_method.ramped_rate(0.9, 5, 10) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert clipq_method.ramped_rate(0.9, 10, 10) == clipq_method.ramped_rate(0.9, 99, 10) == 0.9
    assert clipq_method.ramped_rate(0.9, 3, 0) == 0.9  # no ramp


def test_soft_target_loss_layer_gives_the_numpy_loss_and_a_gradient_to_the_student_only(tmp_path):
    cf = caffe_io.caffe()
    (tmp_path / "net.prototxt").write_text(
        'force_backward: true layer { name: "s" type: "Input" top: "s" input_param { shape { dim: 3 dim: 4 } } }\n'
        'layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 3 dim: 4 } } }\n'
        'layer { name: "kd" type: "Python" bottom: "s" bottom: "t" top: "loss" loss_weight: 0.5 propagate_down: true '
        'propagate_down: false python_param { module: "clipq_layers" layer: "SoftTargetLoss" '
        'param_str: \'{"temperature": 2.0}\' } }')
    net = cf.Net(str(tmp_path / "net.prototxt"), cf.TRAIN)
    rng = np.random.default_rng(3)
    s, t = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    net.blobs["s"].data[...], net.blobs["t"].data[...] = s, t
    net.forward()
    net.backward()
    loss, grad = distill.soft_target_loss(s, t, 2.0)
    assert float(net.blobs["loss"].data) == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(net.blobs["s"].diff, 0.5 * grad, rtol=1e-5)
    assert not net.blobs["t"].diff.any()
