"""Outputs are all-or-nothing: a failure leaves the previous file or directory as it was; a killed
writer's temporaries are recognised; outputs get the umask's modes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from clipq.util.atomic import atomic_dir, atomic_output, atomic_write, remove_stale_temporaries, run_token


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


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_atomic_write_gives_the_file_the_umask_mode_not_0600(tmp_path, umask_027):
    with atomic_write(tmp_path / "out.txt") as f:
        f.write("x")
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o640


def test_atomic_dir_gives_the_directory_the_umask_mode(tmp_path, umask_027):
    with atomic_dir(tmp_path / "db") as tmp:
        (tmp / "a").write_text("x")
    assert stat.S_IMODE((tmp_path / "db").stat().st_mode) == 0o750


def test_only_the_temporaries_of_the_given_runs_are_removed(tmp_path):
    (tmp_path / "search").mkdir()
    dead = "1a2b3c4d5e6f"
    for name in (f".stages.json.clipq-{dead}-k2x_9abc.tmp", f"search/.ip1.jsonl.clipq-{dead}-a1b2c3d4.tmp",
                 f".db.clipq-{dead}.old"):
        (tmp_path / name).write_text("half")
    (tmp_path / f".subset_lmdb.clipq-{dead}-zz99zz99.tmp").mkdir()
    kept = ("stages.json", ".hidden", "notes.tmp", "search/.x.tmp", ".thesis.old-2024", ".notes.k2x_9abc.tmp",
            ".a.clipq-99999999aaaa-k2x_9abc.tmp")  # a user's files, and another (live) run's temporary
    for name in kept:
        (tmp_path / name).write_text("keep")
    removed = remove_stale_temporaries(tmp_path, {dead})
    assert len(removed) == 4
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


def test_temporaries_carry_the_run_token_and_children_inherit_it(tmp_path):
    with atomic_write(tmp_path / "out.txt") as f:
        f.write("x")
        names = [p.name for p in tmp_path.iterdir()]
    assert names == [f".out.txt.clipq-{run_token()}-{names[0][-12:-4]}.tmp"]
    child = subprocess.run([sys.executable, "-c", "from clipq.util.atomic import run_token; print(run_token())"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == run_token()


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_atomic_output_replaces_what_is_there_only_when_the_writer_finishes(tmp_path, kind):
    target = tmp_path / "out"
    target.mkdir() if kind == "directory" else target.write_text("old")
    with atomic_output(target) as partial:
        assert not partial.exists() and partial.parent.parent == tmp_path
        partial.mkdir() if kind == "directory" else partial.write_text("new")
        assert (target.is_dir() if kind == "directory" else target.read_text() == "old")
    assert (target.is_dir() if kind == "directory" else target.read_text() == "new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_output_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as partial:
            partial.write_text("half")
            raise RuntimeError("the tool failed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_new_directory_never_replaces_one_made_while_it_was_written(tmp_path):
    with pytest.raises(FileExistsError, match="appeared while clipq was writing it"):
        with atomic_dir(tmp_path / "data", replace=False) as tmp:
            (tmp / "train_lmdb").mkdir()
            (tmp_path / "data").mkdir()
            (tmp_path / "data" / "mine.txt").write_text("the user's")
    assert [p.name for p in tmp_path.rglob("*")] == ["data", "mine.txt"]  # the temporary is gone, theirs kept
