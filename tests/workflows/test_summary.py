"""`clipq summary`: runs of the same net aggregated as mean (min .. max)."""

from __future__ import annotations

import json

import pytest

from clipq.util.errors import ClipqError
from clipq.workflows import summary


def fake_run(directory, seed: int, decoded: float, nbytes: int, met: bool):
    directory.mkdir()
    report = {"model": "prototxt/lenet5/train_val.prototxt", "settings": {"seed": seed},
              "accuracy": {"baseline": 0.90, "decoded": decoded},
              "val_accuracy": {"baseline": 0.91, "decoded": decoded + 0.005},
              "size": {"rate": 1_000_000 / nbytes, "clipq_file_bytes": nbytes},
              "budget": {"met": met, "rounds": [{}, {}, {}], "max_drop": 0.5}}
    (directory / "report.json").write_text(json.dumps(report))
    return directory


def test_runs_of_one_net_become_one_row_with_mean_and_range(tmp_path):
    cases = ((0, 0.897, 20000, True), (1, 0.899, 25000, True), (2, 0.893, 40000, False))
    runs = [fake_run(tmp_path / f"s{seed}", seed, decoded, nbytes, met) for seed, decoded, nbytes, met in cases]
    text = summary.table(summary.load_reports(runs))
    row = text.splitlines()[2]
    assert row.startswith("| lenet5 | 3 (0, 1, 2) |")
    assert "+0.37 (+0.10 .. +0.70)" in row  # test drop in points
    assert "28,333 (20,000 .. 40,000)" in row
    assert "2/3 (<= 0.5)" in row


def test_a_directory_without_a_report_is_named(tmp_path):
    with pytest.raises(ClipqError, match="nothing/report.json: cannot read"):
        summary.load_reports([tmp_path / "nothing"])
