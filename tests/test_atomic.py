"""Outputs are all-or-nothing: a failure leaves the previous file or directory as it was."""

from __future__ import annotations

import pytest

from clipq.atomic import atomic_dir, atomic_write


def test_atomic_write_replaces_the_file_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_write(target) as f:
        f.write("new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_keeps_the_old_directory_when_writing_fails(tmp_path):
    target = tmp_path / "db"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("half")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["db"]


def test_atomic_dir_replaces_the_directory_on_success(tmp_path):
    target = tmp_path / "db"
    target.mkdir()
    (target / "stale").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["db"]
