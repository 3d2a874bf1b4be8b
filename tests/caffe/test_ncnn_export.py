"""clipq export-ncnn (caffe.ncnn_export): every converted layer type runs in ncnn as it runs in Caffe.

ncnn runs one sample at a time, in float32 (fp16 / bf16 storage and arithmetic, packing, winograd and sgemm
off). Each net gets random weights and inputs; for every sample, every Caffe blob (its final value, after
in-place layers) must equal ncnn's blob of the same name within 1e-4 of the blob's largest magnitude. A
compressed LeNet-5 is stored as ncnn's 256-entry tables and decodes to `clipq decode`'s weights bit for bit."""

from __future__ import annotations

import struct

import ncnn
import numpy as np
import pytest

from clipq import cli
from clipq.caffe import caffe_io, ncnn_export
from clipq.util.errors import ClipqError
from clipq.workflows import compressed_model
from conftest import REPO
# compressed_lenet5: the ONNX tests' module fixture (one .clipq of PLAN per module), shared by import
from test_onnx_export import (CONV, LENET5, NORM_CHANNELS, PLAN, POOL, RTOL, compressed_lenet5, dense_layers,
                              input_layer, layer, random_weights)

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
    layer("concat_h", "Concat", ["prod", "plain_sum"], param="concat_param { axis: 2 }"),
    layer("softmax_c", "Softmax", "concat_h"),
    layer("flat", "Flatten", "max"),
    layer("ip", "InnerProduct", "flat", param="inner_product_param { num_output: 6 }"),
    layer("ip_t", "InnerProduct", "data", param="inner_product_param { num_output: 4 transpose: true }"),
    layer("joined", "Concat", ["ip", "ip_t"]),
    layer("softmax", "Softmax", "joined"),
])

NETS = {"conv": CONV, "pool": POOL, "norm": NORM_CHANNELS, "merge": MERGE}
FP32 = ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage", "use_bf16_packed",
        "use_packing_layout", "use_winograd_convolution", "use_sgemm_convolution", "use_int8_inference")


def ncnn_net(param, binary):
    """An ncnn Net in plain float32 on one thread, loaded from the two files."""
    net = ncnn.Net()
    for option in FP32:
        setattr(net.opt, option, False)
    net.opt.num_threads = 1
    assert net.load_param(str(param)) == 0
    assert net.load_model(str(binary)) == 0
    return net


def assert_same_as_caffe(caffe_net, param, binary, seed: int = 1) -> list[str]:
    """Run pycaffe and ncnn on the same random inputs, ncnn one sample at a time; every blob must agree."""
    rng = np.random.default_rng(seed)
    feeds = {name: rng.standard_normal(caffe_net.blobs[name].data.shape).astype(np.float32)
             for name in caffe_net.inputs}
    for name, value in feeds.items():
        caffe_net.blobs[name].data[...] = value
    caffe_net.forward()
    blobs = [name for name in caffe_net.blobs if "_split_" not in name and name not in feeds]
    net = ncnn_net(param, binary)
    for i in range(max(value.shape[0] for value in feeds.values())):
        extractor = net.create_extractor()
        extractor.set_light_mode(False)
        for name, value in feeds.items():  # an input with fewer samples gives its last again
            sample = np.ascontiguousarray(value[min(i, value.shape[0] - 1)])
            assert extractor.input(name, ncnn.Mat(sample).clone()) == 0
        for name in (name for name in blobs if i < caffe_net.blobs[name].data.shape[0]):
            status, mat = extractor.extract(name)
            assert status == 0, name
            want = caffe_net.blobs[name].data[i]
            got = np.array(mat)
            assert got.size == want.size, (name, got.shape, want.shape)
            scale = max(float(np.abs(want).max()), 1e-30)
            error = np.abs(got.reshape(want.shape) - want).max()
            assert error <= RTOL * scale, (name, i, error / scale)
    return blobs


def export_dense(deploy, weights, prefix):
    exported = ncnn_export.convert(caffe_io.read_net_param(deploy), dense_layers(weights), str(deploy),
                                   str(weights))
    param, binary = compressed_model.ncnn_paths(prefix)
    param.write_text(exported.param)
    binary.write_bytes(exported.bin)
    return exported, param, binary


@pytest.mark.parametrize("name", sorted(NETS))
def test_hand_written_nets_agree_with_caffe(name, tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(f'name: "{name}"\n' + NETS[name])
    net = random_weights(deploy, tmp_path / "w.caffemodel")
    _, param, binary = export_dense(deploy, tmp_path / "w.caffemodel", tmp_path / "m")
    blobs = assert_same_as_caffe(net, param, binary)
    assert len(blobs) == len([b for b in net.blobs if "_split_" not in b]) - len(net.inputs)


def test_every_converted_layer_type_is_in_a_hand_written_net():
    used = {kind for text in NETS.values() for kind in
            (line.split('type: "')[1].split('"')[0] for line in text.splitlines() if 'type: "' in line)}
    assert set(ncnn_export.CONVERTERS) <= used


def test_a_blob_read_twice_goes_through_a_split(tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(MERGE)
    random_weights(deploy, tmp_path / "w.caffemodel")
    exported, _, _ = export_dense(deploy, tmp_path / "w.caffemodel", tmp_path / "m")
    lines = exported.param.splitlines()
    assert lines[0] == "7767517"
    readers = [token for line in lines[2:] for token in line.split()[4:4 + int(line.split()[2])]]
    assert len(readers) == len(set(readers))  # each blob has one reader
    assert any(line.split()[0] == "Split" and line.split()[4:6] == ["a", "a_splitncnn_0"] for line in lines)


@pytest.mark.parametrize("net", ["lenet5", "lenet300_100"])
def test_lenets_agree_with_caffe(net, tmp_path):
    deploy = REPO / "prototxt" / net / "deploy.prototxt"
    caffe_net = random_weights(deploy, tmp_path / "w.caffemodel")
    exported, param, binary = export_dense(deploy, tmp_path / "w.caffemodel", tmp_path / "m")
    assert exported.outputs == ["prob"] and not exported.compressed
    assert_same_as_caffe(caffe_net, param, binary)


def read_tables(binary: bytes, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """The weights a LeNet-5 .bin holds, decoded as ncnn's ModelBin does (flag 1: table + indices; the
    biases follow each layer's weights), by layer in the net's order."""
    weights, offset = {}, 0
    for name, (count, outputs) in sizes.items():
        flag, = struct.unpack_from("<I", binary, offset)
        assert flag == ncnn_export.TABLE_FLAG, name
        table = np.frombuffer(binary, "<f4", ncnn_export.TABLE_SIZE, offset + 4)
        indices = np.frombuffer(binary, np.uint8, count, offset + 4 + 4 * ncnn_export.TABLE_SIZE)
        weights[name] = table[indices]
        offset += 4 + 4 * ncnn_export.TABLE_SIZE + count + (-count % 4) + 4 * outputs
    assert offset == len(binary)
    return weights


def test_compressed_lenet5_keeps_tables_and_agrees_with_caffe_on_the_decoded_model(compressed_lenet5, tmp_path):
    d = compressed_lenet5
    written = compressed_model.export_ncnn(LENET5, tmp_path / "m", clipq=d / "m.clipq")
    assert written.compressed == {name: lp.bits for name, lp in PLAN.items()}
    cf = caffe_io.caffe()
    net = cf.Net(str(LENET5), str(d / "decoded.caffemodel"), cf.TEST)
    assert_same_as_caffe(net, written.param, written.bin)
    # the weights ncnn decodes are the decoded caffemodel's, bit for bit
    decoded = dense_layers(d / "decoded.caffemodel")
    sizes = {name: (decoded[name].blobs[0].size, decoded[name].blobs[1].size) for name in PLAN}
    for name, weights in read_tables(written.bin.read_bytes(), sizes).items():
        assert weights.tobytes() == decoded[name].blobs[0].tobytes(), name
    dense = compressed_model.export_ncnn(LENET5, tmp_path / "dense", weights=d / "decoded.caffemodel")
    assert written.bin_bytes < dense.bin_bytes == written.dense_bin_bytes
    assert written.bin_bytes == written.bin.stat().st_size


def test_an_unsupported_layer_type_is_one_line_naming_the_layer(tmp_path):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(input_layer("data", 1, 2, 3, 3) + layer("absolute", "AbsVal", "data"))
    with pytest.raises(ClipqError, match=r"layer 'absolute' has type AbsVal, which export-ncnn does not convert") \
            as error:
        ncnn_export.convert(caffe_io.read_net_param(deploy), {}, str(deploy))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text, message", [
    (layer("s", "Scale", "data", param="scale_param { axis: 2 num_axes: 2 }"), r"layer 's' \(Scale\): .*channel"),
    (layer("r", "Reshape", "data", param="reshape_param { shape { dim: 0 dim: -1 } }"), r"type Reshape"),
    (layer("f", "Flatten", "data", param="flatten_param { axis: 2 }"), r"layer 'f' \(Flatten\): a Flatten of axes"),
    (layer("c", "Concat", ["data", "data"], param="concat_param { axis: 0 }"), r"layer 'c' \(Concat\): .*batch"),
])
def test_an_option_ncnn_has_no_counterpart_for_is_refused_by_layer(tmp_path, text, message):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(input_layer("data", 1, 2, 3, 3) + text)
    random_weights(deploy, tmp_path / "w.caffemodel")
    with pytest.raises(ClipqError, match=message) as error:
        ncnn_export.convert(caffe_io.read_net_param(deploy), dense_layers(tmp_path / "w.caffemodel"), str(deploy))
    assert "\n" not in str(error.value)


def test_cli_writes_both_files_and_prints_their_sizes_against_dense(compressed_lenet5, tmp_path, capsys):
    prefix = tmp_path / "lenet5"
    assert cli.main(["export-ncnn", "--model", str(LENET5), "--clipq", str(compressed_lenet5 / "m.clipq"),
                     "--output", str(prefix)]) == 0
    printed = capsys.readouterr().out
    param, binary = tmp_path / "lenet5.param", tmp_path / "lenet5.bin"
    assert (f"{param}: {param.stat().st_size:,} bytes; {binary}: {binary.stat().st_size:,} bytes, outputs prob; "
            "dense float32 .bin:") in printed
    assert "ip1                      256-entry table + uint8 indices (b=3)" in printed


def test_cli_bad_input_is_one_line_exit_2_and_no_file_written(tmp_path, capsys):
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(input_layer("data", 1, 2, 3, 3) + layer("absolute", "AbsVal", "data"))
    random_weights(LENET5, tmp_path / "w.caffemodel")
    prefix = tmp_path / "m"
    assert cli.main(["export-ncnn", "--model", str(deploy), "--weights", str(tmp_path / "w.caffemodel"),
                     "--output", str(prefix)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer 'absolute' has type AbsVal" in err
    other = REPO / "prototxt" / "lenet300_100" / "deploy.prototxt"
    assert cli.main(["export-ncnn", "--model", str(other), "--weights", str(tmp_path / "w.caffemodel"),
                     "--output", str(prefix)]) == 2
    assert "layer 'ip1'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy.prototxt", "w.caffemodel"]


def test_a_failed_param_write_leaves_no_bin(compressed_lenet5, tmp_path):
    (tmp_path / "m.param").mkdir()  # the .param cannot replace a directory
    with pytest.raises(OSError):
        compressed_model.export_ncnn(LENET5, tmp_path / "m", clipq=compressed_lenet5 / "m.clipq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.param"]


@pytest.mark.slow
@pytest.mark.parametrize("net", ["alexnet", "googlenet", "resnet50"])
def test_paper_deploys_agree_with_caffe(net, tmp_path):
    text = (REPO / "prototxt" / net / "deploy.prototxt").read_text()
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(text.replace("dim: 10\n", "dim: 1\n", 1))  # batch 1
    caffe_net = random_weights(deploy, tmp_path / "w.caffemodel")
    assert caffe_net.blobs["data"].data.shape[0] == 1
    _, param, binary = export_dense(deploy, tmp_path / "w.caffemodel", tmp_path / "m")
    assert_same_as_caffe(caffe_net, param, binary)
