"""Paper-style size tables: units, formats and the comparison with the paper's numbers."""

from __future__ import annotations

import json

import pytest

from clipq import cli, plan
from clipq.storage import size
from clipq.workflows import compressed_model


@pytest.mark.parametrize("n,text", [(140_000, "140 KB"), (9_120, "9.12 KB"), (1_800_000, "1.80 MB"),
                                    (151_000_000, "151.0 MB"), (243_860_000, "243.9 MB"), (35_100, "35.1 KB"),
                                    (700, "700 B")])
def test_bytes_are_1000_based_with_three_significant_digits(n, text):
    assert size.format_bytes(n) == text


def test_rates_keep_a_decimal_below_ten_so_a_growing_layer_shows():
    assert [size.format_rate(r) for r in (51.2, 9.46, 0.5)] == ["51x", "9.5x", "0.5x"]


def test_paper_sizes_parse():
    assert size.parse_size("243.9 MB") == pytest.approx(243.9e6)
    with pytest.raises(ValueError):
        size.parse_size("lots")


def test_markdown_and_paper_columns():
    rows = [size.Row("fc6", 0.96, 3, 151_000_000, 1_850_000), size.Row("Overall", None, None, 151_000_000, 1_850_000)]
    rows = size.with_paper(rows, {"fc6": {"compressed": "1.80 MB"}, "Overall": {"compressed": "2 MB"}})
    md = size.render(rows, "md")
    assert md.splitlines()[0] == "| Layer | p | b | Original | Compressed | Rate | Paper | vs paper |"
    assert "| fc6 | 0.96 | 3 | 151.0 MB | 1.85 MB | 82x | 1.80 MB | +3% |" in md
    assert "**Overall**" in md


def test_size_cli_json_on_random_weights(repo, capsys):
    code = cli.main(["size", "--model", str(repo / "prototxt/lenet5/deploy.prototxt"),
                     "--plan", str(repo / "prototxt/lenet5/example_plan.yaml"), "--format", "json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    layers = {row["layer"]: row for row in doc["layers"]}
    assert layers["ip1"]["original"] == 4 * 400_500 and layers["ip1"]["bits"] == 3
    assert layers["Overall"]["compressed"] < doc["file_bytes"]


def test_paper_comparison_needs_paper_sizes(repo, capsys):
    code = cli.main(["size", "--model", str(repo / "prototxt/lenet5/deploy.prototxt"),
                     "--plan", str(repo / "prototxt/lenet5/example_plan.yaml"), "--paper"])
    assert code == 2
    assert "has no paper_sizes" in capsys.readouterr().err


def test_size_of_a_file_reports_its_measured_bytes_whatever_its_free_form_meta_says(repo, tmp_path, capsys):
    from clipq.storage import sparse_codec
    data, layers = compressed_model.encode_model(repo / "prototxt/lenet5/deploy.prototxt", None,
                                                 plan.load_plan(repo / "prototxt/lenet5/example_plan.yaml"))
    path = tmp_path / "m.clipq"
    path.write_bytes(sparse_codec.encode(layers, {"file_bytes": "x", "file": "elsewhere"}))
    assert cli.main(["size", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["file_bytes"] == path.stat().st_size and doc["file"] == str(path)
