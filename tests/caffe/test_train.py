"""clipq.caffe.train: the real `caffe train` CLI (through .venv/bin/caffe), Python layers, resuming."""

from __future__ import annotations

import re

import numpy as np
import pytest

from clipq.caffe import caffemodel, train
from clipq.util.errors import ClipqError

PY_LAYER_NET = """
name: "pylayer"
layer { name: "x" type: "DummyData" top: "x" top: "y"
        dummy_data_param { shape { dim: 32 dim: 4 } shape { dim: 32 dim: 2 }
                           data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 0.3 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "Python" bottom: "fc" bottom: "y" top: "loss" loss_weight: 1
        python_param { module: "toy_layers" layer: "EuclideanLoss" } }
"""


def write_solver(tmp_path, max_iter=40, snapshot=20):
    (tmp_path / "net.prototxt").write_text(PY_LAYER_NET)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.05\nlr_policy: "fixed"\nmomentum: 0.9\n'
                      f"display: 1\nmax_iter: {max_iter}\nsnapshot: {snapshot}\n"
                      f'snapshot_prefix: "{tmp_path / "snap" / "toy"}"\nsolver_mode: CPU\nrandom_seed: 5\n')
    return solver


def logged_losses(log):
    return [float(v) for v in re.findall(r"Iteration \d+\b.*?, loss = ([0-9.e+-]+)", log.read_text())]


def test_caffe_cli_trains_a_net_with_a_python_layer(tmp_path, toy_layers_on_path):
    solver = write_solver(tmp_path)
    out = train.train(solver, output=tmp_path / "final.caffemodel", progress=False)
    losses = logged_losses(tmp_path / "snap" / "toy.log")
    assert out.stat().st_size > 0
    assert len(losses) == 41  # display: 1: iterations 0..39, then the final loss at 40
    assert losses[-1] < 0.1 * losses[0]  # the gradient of the Python loss layer reached the weights


def test_rerun_resumes_from_the_newest_snapshot(tmp_path, toy_layers_on_path):
    solver = write_solver(tmp_path)
    train.train(solver, progress=False)
    for f in (tmp_path / "snap").glob("toy_iter_40.*"):
        f.unlink()  # as if the run had been killed after the iteration-20 snapshot
    assert train.snapshots(str(tmp_path / "snap" / "toy"))[0][0] == 20
    train.train(solver, progress=False)
    log = (tmp_path / "snap" / "toy.log").read_text()
    assert re.search(r"Resuming from \S*toy_iter_20\.solverstate", log)
    assert (tmp_path / "snap" / "toy_iter_40.caffemodel").exists()


def test_training_starts_from_the_weights_given(tmp_path, toy_layers_on_path):
    # brocolli-caffe's `caffe train` parsed --weights but never loaded it (tools/patches/brocolli/04)
    solver = write_solver(tmp_path, max_iter=1)
    solver.write_text(solver.read_text().replace("base_lr: 0.05", "base_lr: 0"))
    start = [np.arange(8, dtype=np.float32).reshape(2, 4), np.full(2, 0.5, np.float32)]
    caffemodel.write([caffemodel.LayerWeights("fc", "InnerProduct", start)], tmp_path / "start.caffemodel")
    out = train.train(solver, weights=tmp_path / "start.caffemodel", progress=False)
    fc = next(w for w in caffemodel.read(out) if w.name == "fc")
    assert all(np.array_equal(a, b) for a, b in zip(fc.blobs, start, strict=True))


def test_a_failing_caffe_run_reports_the_log(tmp_path):
    solver = write_solver(tmp_path)
    (tmp_path / "net.prototxt").write_text(PY_LAYER_NET.replace("toy_layers", "no_such_module"))
    with pytest.raises(ClipqError, match="failed"):
        train.train(solver, progress=False)


def test_a_snapshot_caffe_cannot_write_is_one_line_with_its_check_and_the_full_disk(tmp_path, toy_layers_on_path,
                                                                                    monkeypatch):
    solver = write_solver(tmp_path, max_iter=4, snapshot=2)
    # weights larger than the stream's buffer: Caffe's write fails in its CHECK (a small one fails unchecked
    # when the stream closes, leaving a truncated snapshot that resuming skips)
    (tmp_path / "net.prototxt").write_text(PY_LAYER_NET.replace("dim: 32 dim: 4 }", "dim: 32 dim: 8192 }"))
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "toy_iter_2.caffemodel").symlink_to("/dev/full")  # every write: no space left
    monkeypatch.setattr(train, "LOW_DISK", 1 << 62)  # and the disk counted as full
    with pytest.raises(ClipqError) as refused:
        train.train(solver, progress=False)
    assert "\n" not in str(refused.value)
    assert re.search(r"failed: Check failed: .*\(io\.cpp:\d+\); log: .* MB free: a snapshot could not be written",
                     str(refused.value))


def test_solver_without_snapshot_prefix_is_rejected(tmp_path):
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "x.prototxt"\nmax_iter: 10\n')
    with pytest.raises(ClipqError, match="snapshot_prefix"):
        train.read_solver(solver)


def test_a_snapshot_past_a_lowered_max_iter_is_not_resumed_from(tmp_path, toy_layers_on_path, capsys):
    train.train(write_solver(tmp_path, max_iter=40, snapshot=20), progress=False)
    for f in (tmp_path / "snap").glob("toy_iter_*.caffemodel"):
        f.unlink()
    solver = write_solver(tmp_path, max_iter=30, snapshot=10)  # the user lowered max_iter below a snapshot
    train.train(solver, progress=False)
    assert (tmp_path / "snap" / "toy_iter_30.caffemodel").exists()
    assert "toy_iter_40.solverstate: its iteration 40 is past the solver's max_iter 30" in capsys.readouterr().err


def test_another_nets_snapshot_is_named_as_such(tmp_path):
    caffemodel.write([caffemodel.LayerWeights("conv9", "Convolution", [np.zeros((1, 1, 1, 1), np.float32)])],
                     tmp_path / "other.caffemodel")
    assert "holds none of this net's layers" in train.caffemodel_problem(tmp_path / "other.caffemodel", {"fc"})
