"""The `clipq` command line: help for every subcommand, --version, doctor, and error exits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import clipq
from clipq import cli
from clipq.cli.main import build_parser

SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: clipq {command}" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"clipq {clipq.__version__}"


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: clipq" in capsys.readouterr().err


def test_doctor_passes_and_says_which_caffe_source_is_used(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    source_line = next(line for line in out.splitlines() if "caffe source" in line)
    assert "bvlc 9b89154" in source_line or "brocolli" in source_line


def test_installed_console_scripts_run():
    bin_dir = Path(sys.prefix) / "bin"
    out = subprocess.run([str(bin_dir / "clipq"), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"clipq {clipq.__version__}"
    out = subprocess.run([str(bin_dir / "caffe"), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "caffe version" in out.stdout + out.stderr


def test_user_error_exits_2_with_the_file_name(tmp_path, capsys):
    code = cli.main(["evaluate", "--model", str(tmp_path / "m.prototxt"), "--weights", str(tmp_path / "w")])
    assert code == 2
    assert "m.prototxt: file not found" in capsys.readouterr().err
