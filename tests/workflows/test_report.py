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
