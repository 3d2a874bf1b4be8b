"""Interrupted and concurrent runs: the output lock, stale temporaries, snapshots checked before a resume,
and signals that end the whole process tree (real `caffe train`, real `clipq` processes).

The slow tier kills `clipq search` and `clipq compress` at seeded random moments (SIGKILL and SIGTERM),
resumes them, and compares with an uninterrupted run; and runs two `compress` on one --out.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from clipq.caffe import caffemodel, train
from clipq.search.gp import SearchSettings
from clipq.search.local import search_layer
from clipq.util.errors import ClipqError
from clipq.util.atomic import TOKEN_VARIABLE, run_token
from clipq.util.lock import LOCK_NAME, locked, new_output, output_directory

CLIPQ = Path(sys.executable).with_name("clipq")

TINY_NET = """
name: "tiny"
layer { name: "x" type: "DummyData" top: "x" top: "y"
        dummy_data_param { shape { dim: 16 dim: 4 } shape { dim: 16 dim: 2 }
                           data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 0.3 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "y" top: "loss" }
"""

HOLD_LOCK = ("import sys, time\nfrom clipq.util.lock import output_directory\n"
             "with output_directory(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n")


def tiny_solver(tmp_path: Path, max_iter: int, snapshot: int) -> Path:
    (tmp_path / "net.prototxt").write_text(TINY_NET)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.01\nlr_policy: "fixed"\ndisplay: 1\n'
                      f"max_iter: {max_iter}\nsnapshot: {snapshot}\n"
                      f'snapshot_prefix: "{tmp_path / "snap" / "tiny"}"\nsolver_mode: CPU\nrandom_seed: 5\n')
    return solver


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (an orphan's zombie may wait long for its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another run (its own token, not this process's) holding `directory`."""
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True,
                              env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


# --- the output lock and stale temporaries -----------------------------------------------------------

def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holders_pid(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(ClipqError, match=rf"in use by another clipq run \(pid {holder.pid} on "):
            with output_directory(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over_with_a_message(tmp_path):
    holder = hold_lock(tmp_path)
    holder.kill()
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists()
    messages = []
    with output_directory(tmp_path, messages.append):
        assert f"pid {os.getpid()} " in (tmp_path / LOCK_NAME).read_text()
    assert "no longer running" in messages[0] and f"pid {holder.pid} " in messages[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_process_may_take_its_own_lock_again(tmp_path):
    with output_directory(tmp_path):
        with output_directory(tmp_path):
            pass
        assert (tmp_path / LOCK_NAME).exists()


def test_an_output_directory_a_refused_run_created_is_not_left_behind(tmp_path):
    with pytest.raises(ClipqError):
        with output_directory(tmp_path / "out"):
            raise ClipqError("bad input")
    assert not (tmp_path / "out").exists()


def test_taking_over_a_dead_runs_lock_removes_its_temporaries_and_nothing_else(tmp_path):
    holder = hold_lock(tmp_path)
    holder.kill()
    holder.wait()
    token = (tmp_path / LOCK_NAME).read_text().split("token ")[1].split()[0]
    (tmp_path / f".stages.json.clipq-{token}-ab12cd34.tmp").write_text('{"base')
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / ".thesis.old-2024").write_text("the user's")  # looks like an old temporary: kept
    (tmp_path / f".x.clipq-{run_token()}-ab12cd34.tmp").write_text("a live run's")  # not the dead run's: kept
    messages = []
    with output_directory(tmp_path, messages.append):
        pass
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        [f".x.clipq-{run_token()}-ab12cd34.tmp", ".thesis.old-2024", "docs"])
    assert "removed 1 temporary file" in messages[1]


def test_a_refused_run_removes_nothing(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / ".thesis.old-2024").write_text("the user's")
    with pytest.raises(ClipqError), output_directory(tmp_path):
        raise ClipqError("--layers nosuch")
    assert (tmp_path / "docs" / ".thesis.old-2024").read_text() == "the user's"


HOLD_LOG = ("import fcntl, sys, time\nlog = open(sys.argv[1], 'a')\nfcntl.flock(log, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\ntime.sleep(1)\nlog.write(sys.argv[2])\n")


def fake_eval(layer: str, p: float, bits: int) -> tuple[float, float]:
    return 50.0, 0.1


def test_a_layer_log_an_earlier_worker_still_writes_is_waited_for_not_logged_twice(tmp_path):
    settings = SearchSettings(iterations=2, initial=3)
    search_layer("fc", 0, fake_eval, settings, tmp_path / "done", "model")
    second = (tmp_path / "done" / "search" / "fc.jsonl").read_text().splitlines(keepends=True)[2]
    search_layer("fc", 0, fake_eval, replace(settings, iterations=1), tmp_path, "model")
    old_worker = subprocess.Popen([sys.executable, "-c", HOLD_LOG, str(tmp_path / "search" / "fc.jsonl"), second],
                                  stdout=subprocess.PIPE, text=True)
    assert old_worker.stdout.readline().strip() == "held"
    history = search_layer("fc", 0, fake_eval, replace(settings, iterations=3), tmp_path, "model")
    old_worker.wait()
    assert [e.iteration for e in history] == [0, 1, 2]
    assert [json.loads(line).get("iteration") for line in (tmp_path / "search" / "fc.jsonl").read_text().splitlines()] \
        == [None, 0, 1, 2]


# --- resuming only from whole snapshots --------------------------------------------------------------

def test_a_truncated_final_caffemodel_is_trained_again_from_the_previous_snapshot(tmp_path, capsys):
    solver = tiny_solver(tmp_path, max_iter=40, snapshot=20)
    final = train.train(solver, progress=False)
    truncate(final)
    train.train(solver, progress=False)
    assert "not taking tiny_iter_40.caffemodel as the result" in capsys.readouterr().err
    assert re.search(r"Resuming from \S*tiny_iter_20\.solverstate", (tmp_path / "snap" / "tiny.log").read_text())
    assert {layer.name for layer in caffemodel.read(final)} == {"x", "fc", "loss"}


def test_a_truncated_newest_solverstate_falls_back_to_the_previous_one(tmp_path, capsys):
    solver = tiny_solver(tmp_path, max_iter=60, snapshot=20)
    train.train(solver, progress=False)
    for path in (tmp_path / "snap").glob("tiny_iter_60.*"):
        path.unlink()  # as if killed while writing the iteration-40 solverstate
    truncate(tmp_path / "snap" / "tiny_iter_40.solverstate")
    train.train(solver, progress=False)
    assert "not resuming from tiny_iter_40.solverstate: " in capsys.readouterr().err
    log = (tmp_path / "snap" / "tiny.log").read_text()
    assert re.findall(r"Resuming from \S*(tiny_iter_\d+)\.solverstate", log) == ["tiny_iter_20"]
    assert train.caffemodel_problem(tmp_path / "snap" / "tiny_iter_60.caffemodel", {"x", "fc", "loss"}) is None


def test_without_a_whole_snapshot_training_starts_from_the_initial_weights(tmp_path, capsys):
    solver = tiny_solver(tmp_path, max_iter=40, snapshot=20)
    train.train(solver, progress=False)
    for path in (tmp_path / "snap").glob("tiny_iter_40.*"):
        path.unlink()
    truncate(tmp_path / "snap" / "tiny_iter_20.caffemodel")  # the solverstate's learned net
    train.train(solver, progress=False)
    assert "starting from the initial weights" in capsys.readouterr().err
    assert "Resuming" not in (tmp_path / "snap" / "tiny.log").read_text()
    assert (tmp_path / "snap" / "tiny_iter_40.caffemodel").exists()


# --- signals end the process tree ---------------------------------------------------------------------

def start_training(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """`clipq train` on a solver that would run for hours; returns it and its `caffe train` child, training."""
    solver = tiny_solver(tmp_path, max_iter=10_000_000, snapshot=0)
    # as from a terminal: a background job (`make test &`, some CI runners) inherits SIGINT ignored, and
    # Python then leaves it ignored, as a program started in the background should
    proc = subprocess.Popen([str(CLIPQ), "train", "--solver", str(solver), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = tmp_path / "snap" / "tiny.log"
    wait_until(lambda: log.exists() and "Iteration 10," in log.read_text(), 60, "caffe to train")
    caffe_pids = children(proc.pid)
    assert len(caffe_pids) == 1
    return proc, caffe_pids[0]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_termination_signal_to_clipq_train_makes_caffe_snapshot_and_exit(tmp_path, sig):
    proc, caffe = start_training(tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; Caffe snapshotted" in err
    assert not running(caffe)
    assert train.snapshots(str(tmp_path / "snap" / "tiny"))  # Caffe's SIGINT snapshot: a rerun resumes
    assert not (tmp_path / "snap" / "tiny.lock").exists()


def test_sigkill_to_clipq_train_still_makes_caffe_snapshot_and_exit(tmp_path):
    proc, caffe = start_training(tmp_path)
    proc.kill()
    proc.communicate()
    wait_until(lambda: not running(caffe), 60, "caffe to end with its parent")
    _, snapshot = train.snapshots(str(tmp_path / "snap" / "tiny"))[0]
    assert train.solverstate_problem(snapshot, {"x", "fc", "loss"}) is None
    messages = []
    with locked(tmp_path / "snap" / "tiny.lock", messages.append):
        assert f"pid {proc.pid} " in messages[0]


# --- slow tier: kills at random moments, resumed; two runs on one --out ------------------------------

SEARCH = ["--iterations", "4", "--initial", "3", "--subset", "500", "--jobs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def mlp(trained_mlp):
    return trained_mlp


def search_command(mlp, out: Path) -> list[str]:
    return [str(CLIPQ), "search", "--model", str(mlp["model"]), "--weights", str(mlp["weights"]),
            "--out", str(out), *SEARCH]


def compress_command(mlp, out: Path) -> list[str]:
    return [str(CLIPQ), "compress", "--model", str(mlp["model"]), "--weights", str(mlp["weights"]),
            "--solver", str(mlp["solver"]), "--out", str(out), *SEARCH]


def descendants(pid: int) -> list[int]:
    found = children(pid)
    return found + [d for child in found for d in descendants(child)]


def run_and_kill(command: list[str], sig: int, ready: Callable[[list[str]], bool], delay: float) -> str:
    """Start `command`; once `ready(its stderr lines so far)`, wait `delay` s and send `sig`; wait for the
    whole process tree to end. Returns its stderr."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(line) for line in proc.stderr], daemon=True)
    reader.start()
    wait_until(lambda: ready(lines) or proc.poll() is not None, 300, "the moment to kill")
    time.sleep(delay)
    tree = descendants(proc.pid)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    reader.join()
    wait_until(lambda: not any(running(pid) for pid in tree), 120, "the killed run's processes to end")
    return "".join(lines)


def logged_evaluations(out: Path) -> int:
    return sum(len(path.read_text().splitlines()) - 1 for path in (out / "search").glob("*.jsonl"))


def after_evaluations(out: Path, count: int) -> Callable[[list[str]], bool]:
    return lambda lines: (out / "search").exists() and logged_evaluations(out) >= count


def after_line(text: str) -> Callable[[list[str]], bool]:
    return lambda lines: any(text in line for line in lines)


def after_file_line(path: Path, text: str) -> Callable[[list[str]], bool]:
    return lambda lines: path.exists() and text in path.read_text()


def search_entries(out: Path) -> dict[str, list[dict]]:
    """Each layer log's lines, without the timings."""
    logs = {}
    for path in sorted((out / "search").glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        logs[path.name] = [{k: v for k, v in line.items() if k != "seconds"} for line in lines]
    return logs


def leftovers(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith((".tmp", ".lock", ".old"))]


@pytest.fixture(scope="module")
def search_reference(mlp):
    out = mlp["root"] / "search_reference"
    subprocess.run(search_command(mlp, out), check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def compress_reference(mlp):
    out = mlp["root"] / "compress_reference"
    subprocess.run(compress_command(mlp, out), check=True, capture_output=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_search_killed_at_random_moments_resumes_to_the_uninterrupted_plan_and_logs(tmp_path, mlp, search_reference,
                                                                                       sig):
    rng = random.Random(sig)
    errors = [run_and_kill(search_command(mlp, tmp_path), sig, after_evaluations(tmp_path, count), rng.uniform(0, 1))
              for count in sorted(rng.sample(range(1, 12), 3))]  # of 3 layers x 4 evaluations
    subprocess.run(search_command(mlp, tmp_path), check=True, capture_output=True)
    assert not any("Traceback" in e for e in errors)
    assert (tmp_path / "plan.yaml").read_bytes() == (search_reference / "plan.yaml").read_bytes()
    assert search_entries(tmp_path) == search_entries(search_reference)  # nothing lost, nothing logged twice
    assert leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_compress_killed_in_the_search_and_after_the_fine_tuning_resumes_to_the_same_bytes(
        tmp_path, mlp, compress_reference, sig):
    rng = random.Random(sig)
    moments = [(after_evaluations(tmp_path, rng.randint(1, 11)), rng.uniform(0, 1)),  # the search's workers
               (after_line("[encode] ..."), rng.uniform(0, 0.5))]
    errors = [run_and_kill(compress_command(mlp, tmp_path), sig, ready, delay) for ready, delay in moments]
    subprocess.run(compress_command(mlp, tmp_path), check=True, capture_output=True)
    assert not any("Traceback" in e for e in errors)
    assert (tmp_path / "plan.yaml").read_bytes() == (compress_reference / "plan.yaml").read_bytes()
    assert search_entries(tmp_path) == search_entries(compress_reference)
    for name in ("model.clipq", "decoded.caffemodel"):
        assert (tmp_path / name).read_bytes() == (compress_reference / name).read_bytes(), name
    # the fine-tuned caffemodel embeds its net, whose TRAIN source is OUT's shuffled copy of the training LMDB:
    # its weights, not its bytes, are the same
    resumed, reference = (caffemodel.read(out / "finetuned.caffemodel") for out in (tmp_path, compress_reference))
    assert all(a.name == b.name and all(np.array_equal(x, y) for x, y in zip(a.blobs, b.blobs, strict=True))
               for a, b in zip(resumed, reference, strict=True))
    assert leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_compress_killed_in_the_fine_tuning_resumes_from_caffes_snapshot(tmp_path, mlp, compress_reference, sig):
    """Caffe snapshots on the SIGINT clipq sends (or the kernel, when clipq is SIGKILLed). Its resume restarts
    the LMDB from the first image, so the weights differ a little from an uninterrupted run's; the plan not."""
    log = tmp_path / "finetune.log"
    solving = after_file_line(log, "Solving")  # by then Caffe handles SIGINT
    error = run_and_kill(compress_command(mlp, tmp_path), sig, solving, random.Random(sig).uniform(0, 0.3))
    subprocess.run(compress_command(mlp, tmp_path), check=True, capture_output=True)
    assert "Traceback" not in error
    assert re.search(r"Resuming from \S*clipq_iter_\d+\.solverstate", log.read_text())
    assert "clipq_iter_40.caffemodel" in log.read_text()
    assert (tmp_path / "plan.yaml").read_bytes() == (compress_reference / "plan.yaml").read_bytes()
    report, expected = (json.loads((out / "report.json").read_text()) for out in (tmp_path, compress_reference))
    assert [(r["layer"], r["bits"]) for r in report["layers"]] == [(r["layer"], r["bits"]) for r in expected["layers"]]
    # the stored p is the share of zeros of the final weights, which differ a little (a weight or two of a
    # layer can fall on the other side of its threshold); the plan's p is plan.yaml's, equal above
    assert [r["p"] for r in report["layers"]] == pytest.approx([r["p"] for r in expected["layers"]], abs=1e-4)
    assert report["size"]["clipq_file_bytes"] == pytest.approx(expected["size"]["clipq_file_bytes"], rel=1e-3)
    assert report["accuracy"]["decoded"] == report["accuracy"]["clipq_net"]
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_second_compress_on_the_same_out_is_refused_while_the_first_runs(tmp_path, mlp):
    first = subprocess.Popen(compress_command(mlp, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: (tmp_path / LOCK_NAME).exists(), 60, "the first run to lock --out")
    first.send_signal(signal.SIGSTOP)  # however fast the machine, the first still runs when the second starts
    try:
        second = subprocess.run(compress_command(mlp, tmp_path), capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"in use by another clipq run (pid {first.pid} on " in second.stderr
    assert first.wait(timeout=300) == 0
    assert (tmp_path / "report.json").exists() and leftovers(tmp_path) == []


HOLD_NEW = ("import pathlib, sys, time\nfrom clipq.util.atomic import atomic_dir\nfrom clipq.util.lock import new_output\n"
            "with new_output(sys.argv[1], 'data'), atomic_dir(sys.argv[1], replace=False) as tmp:\n"
            "    (tmp / 'half').write_text('x')\n    print('held', flush=True)\n    time.sleep(300)\n")


def test_clipq_data_runs_on_one_out_exclude_each_other_and_a_killed_ones_temporary_is_removed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_VARIABLE}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_NEW, str(tmp_path / "data")], stdout=subprocess.PIPE,
                              text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ClipqError, match="in use by another clipq run"), new_output(tmp_path / "data", "data"):
        pass
    holder.kill()
    holder.wait()
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # SIGKILL: its temporary stays, for now
    (tmp_path / ".data.k2x_9abc.tmp").write_text("not clipq's")
    messages = []
    with new_output(tmp_path / "data", "data", messages.append):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.k2x_9abc.tmp"]
    assert "removed the temporary an interrupted run left" in messages[-1]
