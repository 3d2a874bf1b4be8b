"""`clipq zoo` from the command line: its help, a run printed as JSON, the layer list."""

from __future__ import annotations

import json

import pytest

from clipq.cli import main
from conftest import MINI_LAYERS


def test_help_documents_the_comparison(capsys):
    with pytest.raises(SystemExit):
        main(["zoo", "--help"])
    text = capsys.readouterr().out
    for phrase in ("top-1 agreement", "--inputs", "upgrade_net_proto_text", "--search", "--solver", "random"):
        assert phrase in text


def test_command_line_run_prints_the_report_as_json(mini, tmp_path, capsys):
    assert main(["zoo", "--model", str(mini["deploy"]), "--weights", str(mini["weights"]), "--out", str(tmp_path),
                 "--p", "0.3", "--b", "8", "--format", "json", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["comparison"]["samples"] == 16 and printed["plan"]["source"] == "uniform p=0.3, b=8"


def test_command_line_list_prints_the_layers(mini, tmp_path, capsys):
    assert main(["zoo", "--model", str(mini["deploy"]), "--weights", str(mini["weights"]), "--out", str(tmp_path),
                 "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["Layer", "Type", "Weight"]
    assert [line.split()[0] for line in lines[1:]] == MINI_LAYERS
