"""clipq export-onnx (caffe.onnx_export): every converted layer type runs in onnxruntime as it runs in Caffe.

Each net gets random weights (BatchNorm with positive variances) and random inputs; every Caffe blob (its
final value, after in-place layers) must equal the ONNX value of the same name within 1e-4 of the blob's
largest magnitude. A compressed LeNet-5 keeps its codes + codebook and decodes to `clipq decode`'s weights
bit for bit."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from clipq import cli
from clipq.caffe import caffe_io, caffemodel, onnx_export
from clipq.plan import LayerPlan
from clipq.storage.sparse_codec import Layer
from clipq.util.errors import ClipqError
from clipq.workflows import compressed_model
from conftest import REPO

RTOL = 1e-4
LENET5 = REPO / "prototxt" / "lenet5" / "deploy.prototxt"
PLAN = {"conv1": LayerPlan(0.2, 6), "conv2": LayerPlan(0.6, 4), "ip1": LayerPlan(0.95, 3), "ip2": LayerPlan(0.5, 4)}


def input_layer(name: str, *dims: int) -> str:
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}\n'


def layer(name: str, kind: str, bottoms, tops=None, param: str = "") -> str:
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    tops = [name] if tops is None else [tops] if isinstance(tops, str) else tops
    wires = " ".join([f'bottom: "{b}"' for b in bottoms] + [f'top: "{t}"' for t in tops])
    return f'layer {{ name: "{name}" type: "{kind}" {wires} {param} }}\n'


CONV = input_layer("data", 2, 4, 11, 12) + "".join([
    layer("conv_hw", "Convolution", "data", param="convolution_param { num_output: 6 kernel_h: 3 kernel_w: 2 "
          "pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2 }"),
    layer("conv_group", "Convolution", "conv_hw", param="convolution_param { num_output: 4 kernel_size: 3 pad: 2 "
          "dilation: 2 group: 2 bias_term: false }"),
    layer("leaky", "ReLU", "conv_group", "conv_group", "relu_param { negative_slope: 0.1 }"),
    layer("conv_1x1", "Convolution", "conv_group", param="convolution_param { num_output: 5 kernel_size: 1 "
          "stride: 2 }"),
    layer("relu", "ReLU", "conv_1x1", "conv_1x1"),
])

POOL_CASES = [  # (kernel, stride, pad): padded, clipped last windows, windows past the input, rectangular
    (3, 2, 1), (2, 2, 1), (3, 2, 0), (3, 3, 1), (5, 3, 2), (4, 3, 1), (3, 1, 1), (2, 2, 0)]


def _pools(source: str) -> str:
    text = ""
    for (k, s, p), pool in itertools.product(POOL_CASES, ("MAX", "AVE")):
        text += layer(f"{source}_{pool.lower()}_k{k}s{s}p{p}", "Pooling", source,
                      param=f"pooling_param {{ pool: {pool} kernel_size: {k} stride: {s} pad: {p} }}")
    text += layer(f"{source}_rect", "Pooling", source, param="pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 "
                  "stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 }")
    for pool in ("MAX", "AVE"):
        text += layer(f"{source}_global_{pool.lower()}", "Pooling", source,
                      param=f"pooling_param {{ pool: {pool} global_pooling: true }}")
    return text


POOL = input_layer("odd", 2, 3, 13, 13) + input_layer("even", 1, 2, 14, 14) + _pools("odd") + _pools("even")

NORM_CHANNELS = input_layer("data", 2, 6, 7, 7) + "".join([  # along the channels (what ncnn covers too)
    layer("lrn_across", "LRN", "data", param="lrn_param { local_size: 5 alpha: 0.5 beta: 0.75 k: 2 }"),
    layer("lrn_within", "LRN", "data", param="lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 "
          "norm_region: WITHIN_CHANNEL }"),
    layer("bn", "BatchNorm", "lrn_across", param="batch_norm_param { eps: 0.001 }"),
    layer("bn_scale", "Scale", "bn", "bn", "scale_param { bias_term: true }"),
    layer("bn2", "BatchNorm", "lrn_within", "lrn_within"),
    layer("bn2_scale", "Scale", "lrn_within", "lrn_within"),
    layer("bn2_bias", "Bias", "lrn_within", "lrn_within"),
    layer("power", "Power", "bn", param="power_param { power: 2 scale: 0.5 shift: 1 }"),
    layer("sigmoid", "Sigmoid", "power"),
    layer("tanh", "TanH", "lrn_within"),
])
NORM = NORM_CHANNELS + layer("scale_hw", "Scale", "tanh", param="scale_param { axis: 2 num_axes: 2 }")

MERGE = input_layer("data", 2, 4, 5, 5) + "".join([
    layer("split", "Split", "data", ["left", "right"]),
    layer("a", "Convolution", "left", param="convolution_param { num_output: 3 kernel_size: 1 }"),
    layer("b", "Convolution", "right", param="convolution_param { num_output: 5 kernel_size: 3 pad: 1 }"),
    layer("c", "Convolution", "right", param="convolution_param { num_output: 3 kernel_size: 3 pad: 1 }"),
    layer("concat", "Concat", ["a", "b"]),
    layer("sum", "Eltwise", ["a", "c"], param="eltwise_param { operation: SUM coeff: 0.5 coeff: -2 }"),
    layer("plain_sum", "Eltwise", ["a", "c", "sum"]),
    layer("prod", "Eltwise", ["a", "c", "sum"], param="eltwise_param { operation: PROD }"),
    layer("max", "Eltwise", ["a", "c"], param="eltwise_param { operation: MAX }"),
    layer("drop", "Dropout", "max", "max", "dropout_param { dropout_ratio: 0.5 }"),
    layer("gate", "InnerProduct", "data", param="inner_product_param { num_output: 3 }"),
    layer("gated", "Scale", ["max", "gate"], param="scale_param { axis: 0 bias_term: true }"),
    layer("concat_h", "Concat", ["prod", "plain_sum"], param="concat_param { axis: 2 }"),
])

SHAPES = 'input: "data"\ninput_shape { dim: 2 dim: 3 dim: 4 dim: 5 }\n' + "".join([
    layer("flat_hw", "Flatten", "data", param="flatten_param { axis: 2 }"),
    layer("ip_axis2", "InnerProduct", "flat_hw", param="inner_product_param { num_output: 7 axis: 2 }"),
    layer("softmax_axis2", "Softmax", "ip_axis2", param="softmax_param { axis: 2 }"),
    layer("flat_ch", "Flatten", "data", param="flatten_param { axis: 1 end_axis: 2 }"),
    layer("ip_transposed", "InnerProduct", "flat_ch", param="inner_product_param { num_output: 4 transpose: true }"),
    layer("reshape", "Reshape", "softmax_axis2", param="reshape_param { shape { dim: 0 dim: -1 } }"),
    layer("ip_after_reshape", "InnerProduct", "reshape", param="inner_product_param { num_output: 6 }"),
    layer("reshape_mid", "Reshape", "data", param="reshape_param { shape { dim: 2 dim: -1 } axis: 2 num_axes: 1 }"),
    layer("softmax", "Softmax", "ip_after_reshape"),
])

NETS = {"conv": CONV, "pool": POOL, "norm": NORM, "merge": MERGE, "shapes": SHAPES}


def random_weights(deploy, path, seed: int = 0):
    """Random weights that keep activations in range: fan-in scaled Gaussians, BatchNorm statistics with
    positive variances and a stored factor; returns the pycaffe net (TEST phase) holding them."""
    cf = caffe_io.caffe()
    cf.set_mode_cpu()
    net = cf.Net(str(deploy), cf.TEST)
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        kind = net.layer_dict[name].type
        if kind == "BatchNorm":
            factor = rng.uniform(0.5, 2)
            blobs[0].data[...] = rng.normal(0, 0.5, blobs[0].data.shape) * factor
            blobs[1].data[...] = rng.uniform(0.5, 2, blobs[1].data.shape) * factor
            blobs[2].data[...] = factor
            continue
        weights = blobs[0].data
        fan_in = weights[0].size if kind in ("Convolution", "InnerProduct") else 1
        std = np.sqrt(2 / fan_in) if kind in ("Convolution", "InnerProduct") else 0.5
        weights[...] = rng.normal(1 if kind == "Scale" else 0, std, weights.shape)
        for blob in blobs[1:]:
            blob.data[...] = rng.normal(0, 0.1, blob.data.shape)
    net.save(str(path))
    return net


def onnx_values(model, feeds: dict[str, np.ndarray], names) -> dict[str, np.ndarray]:
    """The values `names` of an ONNX model run by onnxruntime (each made a graph output)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs()]
    return dict(zip(wanted, session.run(None, feeds)))


def assert_same_as_caffe(net, model, seed: int = 1) -> list[str]:
    """Run pycaffe `net` and the ONNX model on the same random inputs; every blob must agree. Returns the
    blobs compared."""
    rng = np.random.default_rng(seed)
    feeds = {name: rng.standard_normal(net.blobs[name].data.shape).astype(np.float32) for name in net.inputs}
    for name, value in feeds.items():
        net.blobs[name].data[...] = value
    net.forward()
    blobs = [name for name in net.blobs if "_split_" not in name and name not in feeds]
    got = onnx_values(model, feeds, blobs)
    for name in blobs:
        want = net.blobs[name].data
        assert got[name].shape == want.shape, name
        scale = max(float(np.abs(want).max()), 1e-30)
        assert np.abs(got[name] - want).max() <= RTOL * scale, (name, np.abs(got[name] - want).max() / scale)
    return blobs


def dense_layers(weights) -> dict[str, Layer]:
    return {w.name: Layer(w.name, w.type, w.blobs) for w in caffemodel.read(weights) if w.blobs}


def export_dense(deploy, weights, opset: int = 13):
    exported = onnx_export.convert(caffe_io.read_net_param(deploy), dense_layers(weights), str(deploy),
                                   str(weights), opset)
    onnx_export.check(exported.model)
    return exported


@pytest.mark.parametrize("name", sorted(NETS))
def test_hand_written_nets_agree_with_caffe(name, tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(f'name: "{name}"\n' + NETS[name])
    net = random_weights(deploy, tmp_path / "w.caffemodel")
    blobs = assert_same_as_caffe(net, export_dense(deploy, tmp_path / "w.caffemodel").model)
    assert len(blobs) == len([b for b in net.blobs if "_split_" not in b]) - len(net.inputs)


def test_every_converted_layer_type_is_in_a_hand_written_net():
    used = {kind for text in NETS.values() for kind in
            (line.split('type: "')[1].split('"')[0] for line in text.splitlines() if 'type: "' in line)}
    assert set(onnx_export.CONVERTERS) <= used


def test_caffe_pooling_sizes_are_declared_so_shape_inference_agrees(tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text('name: "pool"\n' + POOL)
    net = random_weights(deploy, tmp_path / "w.caffemodel")
    exported = export_dense(deploy, tmp_path / "w.caffemodel")
    inferred = onnx.shape_inference.infer_shapes(exported.model, strict_mode=True)
    declared = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in inferred.graph.output}
    for name, shape in declared.items():
        assert shape == net.blobs[name].data.shape, name


@pytest.mark.parametrize("net", ["lenet5", "lenet300_100"])
def test_lenets_agree_with_caffe(net, tmp_path):
    deploy = REPO / "prototxt" / net / "deploy.prototxt"
    caffe_net = random_weights(deploy, tmp_path / "w.caffemodel")
    exported = export_dense(deploy, tmp_path / "w.caffemodel")
    assert exported.outputs == ["prob"] and not exported.compressed
    assert_same_as_caffe(caffe_net, exported.model)


@pytest.fixture(scope="module")
def compressed_lenet5(tmp_path_factory):
    """A LeNet-5 .clipq made by clipq's encode path (PLAN) from random weights, and its decoded caffemodel."""
    d = tmp_path_factory.mktemp("onnx_lenet5")
    random_weights(LENET5, d / "w.caffemodel")
    compressed_model.encode_file(LENET5, d / "w.caffemodel", d / "m.clipq", PLAN)
    compressed_model.decode_file(d / "m.clipq", d / "decoded.caffemodel", LENET5)
    return d


@pytest.mark.parametrize("opset", [13, 21])
def test_compressed_lenet5_keeps_codes_and_agrees_with_caffe_on_the_decoded_model(compressed_lenet5, tmp_path,
                                                                                  opset):
    d = compressed_lenet5
    written = compressed_model.export_onnx(LENET5, tmp_path / "m.onnx", clipq=d / "m.clipq", opset=opset)
    expected = {name: "UINT4" if opset == 21 and lp.bits <= 4 else "UINT8" for name, lp in PLAN.items()}
    assert written.compressed == expected
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model, full_check=True)
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    for name, kind in expected.items():
        assert kinds[f"{name}/codes"] == getattr(onnx.TensorProto, kind)
        assert f"{name}/weights" not in kinds  # no dense copy of a compressed layer
    cf = caffe_io.caffe()
    net = cf.Net(str(LENET5), str(d / "decoded.caffemodel"), cf.TEST)
    assert_same_as_caffe(net, model)
    # the weights the graph decodes are the decoded caffemodel's, bit for bit
    decoded = dense_layers(d / "decoded.caffemodel")
    feeds = {"data": np.zeros(net.blobs["data"].data.shape, np.float32)}
    weights = onnx_values(model, feeds, [f"{name}/weights" for name in PLAN])
    for name in PLAN:
        assert weights[f"{name}/weights"].tobytes() == decoded[name].blobs[0].tobytes(), name
    dense = compressed_model.export_onnx(LENET5, tmp_path / "dense.onnx", weights=d / "decoded.caffemodel")
    assert written.bytes < dense.bytes == written.dense_bytes
    assert written.bytes == (tmp_path / "m.onnx").stat().st_size


def test_uint4_codes_are_packed_two_a_byte_low_nibble_first():
    codes = np.arange(7, dtype=np.uint8) % 16
    tensor = onnx.helper.make_tensor("c", onnx.TensorProto.UINT4, codes.shape, onnx_export._pack_uint4(codes),
                                     raw=True)
    assert len(tensor.raw_data) == 4
    assert np.array_equal(onnx.numpy_helper.to_array(tensor).astype(np.uint8), codes)


def test_an_unsupported_layer_type_is_one_line_naming_the_layer(tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(input_layer("data", 1, 2, 3, 3) + layer("absolute", "AbsVal", "data"))
    with pytest.raises(ClipqError, match=r"layer 'absolute' has type AbsVal, which export-onnx does not convert") \
            as error:
        onnx_export.convert(caffe_io.read_net_param(deploy), {}, str(deploy))
    assert "\n" not in str(error.value)


def test_weights_of_another_net_are_refused_by_layer(tmp_path, compressed_lenet5):
    deploy = REPO / "prototxt" / "lenet300_100" / "deploy.prototxt"
    with pytest.raises(ClipqError, match=r"no weights for layer 'ip1'|layer 'ip1' .* has shape"):
        compressed_model.export_onnx(deploy, tmp_path / "m.onnx", clipq=compressed_lenet5 / "m.clipq")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_writes_the_model_and_prints_its_size_against_dense(compressed_lenet5, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert cli.main(["export-onnx", "--model", str(LENET5), "--clipq", str(compressed_lenet5 / "m.clipq"),
                     "--output", str(out), "--opset", "21"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: {out.stat().st_size:,} bytes, opset 21, outputs prob; dense float32 ONNX:" in printed
    assert "ip1                      codes + codebook (UINT4)" in printed


def test_cli_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(input_layer("data", 1, 2, 3, 3) + layer("absolute", "AbsVal", "data"))
    random_weights(LENET5, tmp_path / "w.caffemodel")
    out = tmp_path / "m.onnx"
    assert cli.main(["export-onnx", "--model", str(deploy), "--weights", str(tmp_path / "w.caffemodel"),
                     "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer 'absolute' has type AbsVal" in err
    assert cli.main(["export-onnx", "--model", str(LENET5), "--weights", str(tmp_path / "missing.caffemodel"),
                     "--output", str(out)]) == 2
    assert "missing.caffemodel: file not found" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["deploy.prototxt", "w.caffemodel"]


@pytest.mark.slow
@pytest.mark.parametrize("net", ["alexnet", "googlenet", "resnet50"])
def test_paper_deploys_agree_with_caffe(net, tmp_path):
    text = (REPO / "prototxt" / net / "deploy.prototxt").read_text()
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(text.replace("dim: 10\n", "dim: 1\n", 1))  # batch 1
    caffe_net = random_weights(deploy, tmp_path / "w.caffemodel")
    assert caffe_net.blobs["data"].data.shape[0] == 1
    assert_same_as_caffe(caffe_net, export_dense(deploy, tmp_path / "w.caffemodel").model)
