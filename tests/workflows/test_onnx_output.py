"""workflows.onnx_output: a net the exporter refuses gives no ONNX file and the reason, and the run goes on."""

from __future__ import annotations

from clipq.caffe import caffe_io, nets
from clipq.plan import LayerPlan
from clipq.workflows import compressed_model, onnx_output, report


def absval_body(n, bottom):
    L = caffe_io.caffe().layers
    n.ip1 = L.InnerProduct(bottom, num_output=10)
    n.absolute = L.AbsVal(n.ip1)
    return n.absolute


def test_a_layer_type_the_exporter_refuses_gives_no_file_and_the_reason(fashion_mnist_slices, tmp_path):
    data = nets.DataSpec(str(fashion_mnist_slices["train"]), str(fashion_mnist_slices["test"]), 64, 100,
                         (100, 1, 28, 28), scale=1 / 256)
    model = tmp_path / "train_val.prototxt"
    model.write_text(str(nets.train_val("absval", absval_body, data)))
    packed, _ = compressed_model.encode_model(model, None, {"ip1": LayerPlan(0.5, 4)})
    (tmp_path / "model.clipq").write_bytes(packed)
    (tmp_path / "model.onnx").write_bytes(b"an earlier run's file")
    info = onnx_output.for_train_val(model, tmp_path / "model.clipq", tmp_path / "unused.caffemodel",
                                     tmp_path / "model.onnx", tmp_path / "plain_deploy.prototxt")
    assert set(info) == {"refused", "deploy"} and not (tmp_path / "model.onnx").exists()
    assert "layer 'absolute' has type AbsVal, which export-onnx does not convert" in info["refused"]
    assert report.onnx_line(info).startswith("- **no ONNX**: ") and "AbsVal" in report.onnx_line(info)
