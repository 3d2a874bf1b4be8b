"""`clipq compare`: operating points placed by size, the frontier, the report; end to end on a small MLP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipq.methods import METHODS
from clipq.search import gp
from clipq.util.errors import ClipqError
from clipq.workflows import compare, pipeline


def test_frontier_drops_points_beaten_in_rate_and_accuracy():
    rows = [{"rate": 10, "test_top1": 0.9}, {"rate": 20, "test_top1": 0.91}, {"rate": 30, "test_top1": 0.85},
            {"rate": 25, "test_top1": 0.80}]
    assert [r["rate"] for r in compare.frontier(rows)] == [20, 30]


def test_compare_needs_validation_data_and_known_methods(trained_mlp, tmp_path):
    cc = pipeline.CompressConfig(trained_mlp["model"], trained_mlp["weights"], trained_mlp["solver"], tmp_path / "o")
    with pytest.raises(ClipqError, match="--val"):
        compare.CompareConfig(cc).check()
    cc = pipeline.CompressConfig(trained_mlp["model"], trained_mlp["weights"], trained_mlp["solver"], tmp_path / "o",
                                 val=trained_mlp["val"])
    with pytest.raises(ClipqError, match="unknown method"):
        compare.CompareConfig(cc, methods=("clipq", "magic")).check()
    with pytest.raises(ClipqError, match="include clipq"):
        compare.CompareConfig(cc, methods=("dns",)).check()
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def compared(trained_mlp, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    cc = pipeline.CompressConfig(trained_mlp["model"], trained_mlp["weights"], trained_mlp["solver"], out,
                                 settings=gp.SearchSettings(lam=1000, iterations=6, initial=3, subset=500),
                                 jobs=1, max_iter=8, progress=False, val=trained_mlp["val"])
    return compare.run(compare_config(cc), log=lambda m: None), out


def compare_config(cc) -> compare.CompareConfig:
    """Two trials of 4 iterations, then 8 for the chosen one; LC in 2 L steps."""
    return compare.CompareConfig(cc, targets=(10.0, 40.0), matched=1,
                                 options={"lc": {"steps": 2}, "lc-quantized": {"steps": 2}}, trials=2, trial_share=0.5)


def test_every_method_runs_at_clipqs_size_with_the_same_iterations(compared):
    report, out = compared
    methods = [r["method"] for r in report["rows"]]
    assert methods[0] == "clipq" and set(methods) == set(METHODS.names())
    assert {r["iterations"] for r in report["rows"]} == {8}
    smallest_clipq = min(r["bytes"] for r in report["rows"] if r["method"] == "clipq")
    for r in report["rows"]:
        if r["method"] in ("uniform", "sequential", "deep-compression"):  # fixed masks: sizes as planned
            assert abs(np.log(r["bytes"] / smallest_clipq)) < np.log(1.3), r


def test_every_method_gets_the_same_number_of_trials_chosen_on_validation_and_scored_on_test_once(compared):
    report, out = compared
    assert report["trials"] == 2 and report["trial_iterations"] == 4
    for r in report["rows"]:
        if "bits after training" in r["slot"]:
            continue
        assert len(r["trials"]) == 2 and r["chosen"] == 1 + int(np.argmin([t["val_drop"] for t in r["trials"]]))
        assert r["point"].startswith(r["trials"][r["chosen"] - 1]["label"].split(", lr x")[0])
        for k in (1, 2):
            stages = json.loads((Path(r["dir"]) / "trials" / str(k) / "stages.json").read_text())
            assert set(stages["evaluate"]["result"]) == {"decoded_val"}  # a trial is never scored on test
    table = (out / "compare.md").read_text()
    assert "fine-tuned trials of 4 iterations" in table and "The trials" in table


def test_methods_that_do_not_quantize_also_get_a_row_with_bits_chosen_after_training(compared):
    report, _ = compared
    for method in ("dns", "lc"):
        stored8, rebit = [r for r in report["rows"] if r["method"] == method]
        assert rebit["slot"] == stored8["slot"] + ", bits after training" and "; bits " in rebit["point"]
        bits = [int(b) for b in rebit["point"].split("; bits ")[1].split()[1::2]]
        assert all(compare.FEWEST_BITS <= b <= 8 for b in bits)
        assert rebit["bytes"] <= stored8["bytes"] and rebit["trials"] == []
    assert not any("bits after training" in r["slot"] for r in report["rows"] if r["method"] not in ("dns", "lc"))


def test_trials_are_topped_up_with_learning_rate_variants():
    from clipq.methods.base import Method, Trial
    own = (Trial("a", lambda: Method("m", {})), Trial("b", lambda: Method("m", {})))
    trials = compare.tuned(own, 5)
    assert [t.label for t in trials] == ["a", "b", "a, lr x2", "b, lr x2", "a, lr x0.5"]
    method = trials[4].make()
    assert method.lr == 0.5 and method.settings == {"lr": 0.5}
    assert compare.tuned(own, 1) == own[:1]


def test_compare_writes_table_plot_and_json_and_resumes(compared, trained_mlp):
    report, out = compared
    assert json.loads((out / "compare.json").read_text())["rows"] == report["rows"]
    table = (out / "compare.md").read_text()
    assert "Deep Compression" in table and "Table 4" in table and (out / "plots" / "compare.png").stat().st_size
    cc = pipeline.CompressConfig(trained_mlp["model"], trained_mlp["weights"], trained_mlp["solver"], out,
                                 settings=gp.SearchSettings(lam=1000, iterations=6, initial=3, subset=500),
                                 jobs=1, max_iter=8, progress=False, val=trained_mlp["val"])
    lines = []
    again = compare.run(compare_config(cc), log=lines.append)
    assert [r["bytes"] for r in again["rows"]] == [r["bytes"] for r in report["rows"]]
    assert not any(line.endswith("finetune] ...") for line in lines)  # nothing trained twice


def test_summary_of_compare_runs_has_a_row_per_method_and_operating_point(compared):
    from clipq.workflows import summary
    report, out = compared
    text = summary.table(summary.load_reports([out, out]))
    rows = [line for line in text.splitlines()[2:]]
    assert len(rows) == len({(r["method"], r["slot"]) for r in report["rows"]})
    assert all("| 2 (0, 0) |" in row for row in rows)


def test_summary_refuses_compress_and_compare_runs_together(compared, tmp_path):
    from clipq.workflows import summary
    _, out = compared
    report = {"model": "m", "accuracy": {"baseline": 0.9, "decoded": 0.9}, "settings": {"seed": 0},
              "size": {"rate": 10.0, "clipq_file_bytes": 100}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(ClipqError, match="not both"):
        summary.table(summary.load_reports([out, tmp_path]))
