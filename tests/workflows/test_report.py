"""The `clipq compress` report's Markdown: what its numbers are measured on."""

from __future__ import annotations

from clipq.workflows import report


def minimal_report(synthetic: bool) -> dict:
    return {"model": "m.prototxt", "weights": "w.caffemodel", "plan": "plan.yaml", "searched": True,
            "data": {"search": "a training subset", "synthetic": synthetic}, "clipq": "/out/model.clipq",
            "accuracy": {"baseline": 0.001, "clipq_net": 1.0, "decoded": 1.0}, "top5": {"baseline": None},
            "val_accuracy": None, "size": {"float32_bytes": 1000, "clipq_file_bytes": 100, "rate": 10.0},
            "layers": [], "budget": None, "seconds": {}, "plots": []}


def drop_line(markdown: str) -> str:
    return next(line for line in markdown.splitlines() if "drop" in line)


def test_synthetic_data_is_said_next_to_the_drop():
    assert "SYNTHETIC data" in drop_line(report.report_markdown(minimal_report(synthetic=True)))


def test_real_data_has_no_synthetic_note():
    assert "SYNTHETIC" not in report.report_markdown(minimal_report(synthetic=False))


def test_an_onnx_top1_unlike_caffes_is_said_loudly():
    onnx = {"file": "/out/final_model.onnx", "bytes": 1000, "dense_bytes": 4000, "opset": 13,
            "compressed": {"a": "UINT8"},
            "top1": {"images": 100, "onnx": 0.5, "caffe": 0.51, "onnx_correct": 50, "caffe_correct": 51,
                     "differing_images": 1, "equal": False}}
    line = next(line for line in report.report_markdown(minimal_report(False) | {"onnx": onnx}).splitlines()
                if "ONNX" in line)
    assert "`final_model.onnx` 1,000 bytes" in line and "**ONNX TOP-1 DIFFERS FROM CAFFE'S**" in line
