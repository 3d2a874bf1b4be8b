"""clipq.data_parallel: `clipq train --mpi 2` (mpirun, mpi4py, pycaffe), every process confined to a network
namespace with loopback only (`unshare -n`), so nothing listens beyond 127.0.0.1."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipq.caffe import caffemodel, data_parallel, train
from conftest import TESTS, random_caffemodel

BATCH = 8  # per rank; the tiny LMDB's 64 images are 4 iterations of 2 ranks x 8
CLIPQ = {"p": 0.3, "bits": 4}


def _loopback_only() -> str | None:
    """Why the tests cannot run in a loopback-only network namespace (None when they can)."""
    if shutil.which("mpirun") is None:
        return "no mpirun (make install: openmpi-bin)"
    try:
        done = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30)
    except FileNotFoundError:
        return "no unshare"
    return None if done.returncode == 0 else f"unshare -n not permitted: {done.stderr.decode().strip()}"


CANNOT_RUN = data_parallel.unsupported() or _loopback_only()
pytestmark = pytest.mark.skipif(CANNOT_RUN is not None, reason=str(CANNOT_RUN))


def loopback(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `cmd` in a new network namespace whose only interface is loopback."""
    script = "ip link set lo up && exec " + shlex.join(cmd)
    return subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, cwd=cwd,
                          timeout=170)


def net(lmdb: Path, batch: int, clipq: bool) -> str:
    """Fashion-MNIST images -> one InnerProduct (CLIP-Q's, or Caffe's) -> softmax loss."""
    ip = '{"num_output": 10, "weight_filler": {"type": "gaussian", "std": 0.01}}'
    if clipq:
        param_str = json.dumps({**CLIPQ, "inner_product_param": json.loads(ip), "name": "fc"})
        fc = (f"type: 'Python' python_param {{ module: 'clipq_layers' layer: 'ClipQInnerProduct' "
              f"param_str: '{param_str}' }}")
    else:
        fc = "type: 'InnerProduct' inner_product_param { num_output: 10 weight_filler { type: 'gaussian' std: 0.01 } }"
    return (f"layer {{ name: 'data' type: 'Data' top: 'data' top: 'label' transform_param {{ scale: 0.00390625 }} "
            f"data_param {{ source: '{lmdb}' batch_size: {batch} backend: LMDB }} }}\n"
            f"layer {{ name: 'fc' bottom: 'data' top: 'fc' {fc} }}\n"
            "layer { name: 'loss' type: 'SoftmaxWithLoss' bottom: 'fc' bottom: 'label' top: 'loss' }\n")


def solver(root: Path, name: str, lmdb: Path, batch: int, clipq: bool, iters: int, snapshot: int = 0) -> Path:
    (root / f"{name}.prototxt").write_text(net(lmdb, batch, clipq))
    (root / name).mkdir()
    path = root / f"{name}_solver.prototxt"
    path.write_text(f'net: "{root / name}.prototxt"\nbase_lr: 0.1\nmomentum: 0.9\nweight_decay: 0.0005\n'
                    f'lr_policy: "fixed"\ndisplay: 1\nmax_iter: {iters}\nsnapshot: {snapshot}\n'
                    f'snapshot_prefix: "{root / name / "snap"}"\nsolver_mode: CPU\nrandom_seed: 1\n')
    return path


@pytest.fixture
def start_weights(tmp_path):
    """A caffemodel of layer "fc" (10 x 784 and 10) with random weights, for every run to start from."""

    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text("input: 'data' input_shape { dim: 1 dim: 1 dim: 28 dim: 28 }\n"
                      "layer { name: 'fc' type: 'InnerProduct' bottom: 'data' top: 'fc' "
                      "inner_product_param { num_output: 10 } }\n")
    random_caffemodel(deploy, tmp_path / "start.caffemodel", std=0.02)
    return tmp_path / "start.caffemodel"


def fc_blobs(path: Path) -> list[np.ndarray]:
    return next(layer.blobs for layer in caffemodel.read(path) if layer.name == "fc")


def clipq_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return loopback([str(Path(sys.executable).parent / "clipq"), "train", "--no-progress", *args], cwd)


def test_two_ranks_keep_identical_weights_and_clipq_quantization(tmp_path, fashion_mnist_slices, start_weights):
    path = solver(tmp_path, "clipq", fashion_mnist_slices["tiny"], BATCH, clipq=True, iters=6)
    program = [sys.executable, str(TESTS / "mpi_rank_weights.py"), str(path), str(start_weights), str(tmp_path),
               str(CLIPQ["p"]), str(CLIPQ["bits"])]
    done = loopback(data_parallel.mpirun_command(2, program), tmp_path)
    assert done.returncode == 0, done.stderr[:3000]
    rank0, rank1 = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    start = fc_blobs(start_weights)[0].reshape(10, 784)
    assert not np.array_equal(rank0["w"], start)  # it trained
    for name in ("w", "b", "wq"):
        assert rank0[name].tobytes() == rank1[name].tobytes(), name
    assert len(np.unique(rank0["wq"])) <= 2 ** CLIPQ["bits"]  # 15 levels and 0


def test_two_ranks_of_batch_b_equal_one_process_of_batch_2b(tmp_path, fashion_mnist_slices, start_weights):
    lmdb, iters = fashion_mnist_slices["tiny"], 6  # 6 x 16 images: past the end of the 64, where both wrap
    two = solver(tmp_path, "two", lmdb, BATCH, clipq=False, iters=iters)
    one = solver(tmp_path, "one", lmdb, 2 * BATCH, clipq=False, iters=iters)
    done = clipq_train(["--mpi", "2", "--solver", str(two), "--weights", str(start_weights),
                        "--output", str(tmp_path / "two.caffemodel")], tmp_path)
    assert done.returncode == 0, done.stderr[:3000]
    done = clipq_train(["--solver", str(one), "--weights", str(start_weights),
                        "--output", str(tmp_path / "one.caffemodel")], tmp_path)  # the `caffe train` CLI
    assert done.returncode == 0, done.stderr[:3000]
    start, parallel, single = (fc_blobs(tmp_path / f"{n}.caffemodel") for n in ("start", "two", "one"))
    assert np.abs(single[0] - start[0]).max() > 1e-3  # it trained
    for p, s in zip(parallel, single):
        np.testing.assert_allclose(p, s, rtol=1e-4, atol=1e-6)
    assert "Iteration 5" in (tmp_path / "two" / "snap.log").read_text()  # rank 0's Caffe log


def test_a_rerun_resumes_from_rank_0s_snapshot(tmp_path, fashion_mnist_slices, start_weights):
    path = solver(tmp_path, "clipq", fashion_mnist_slices["tiny"], BATCH, clipq=True, iters=6, snapshot=3)
    args = ["--mpi", "2", "--solver", str(path), "--weights", str(start_weights)]
    done = clipq_train(args, tmp_path)
    assert done.returncode == 0, done.stderr[:3000]
    snaps = tmp_path / "clipq"
    assert sorted(p.name for p in snaps.glob("snap_iter_*")) == [
        "snap_iter_3.caffemodel", "snap_iter_3.solverstate", "snap_iter_6.caffemodel", "snap_iter_6.solverstate"]
    for f in snaps.glob("snap_iter_6.*"):
        f.unlink()  # as if the run had been killed after the iteration-3 snapshot
    done = clipq_train(args, tmp_path)
    assert done.returncode == 0, done.stderr[:3000]
    assert "resuming from" in done.stderr and "snap_iter_3.solverstate" in done.stderr
    assert (snaps / "snap_iter_6.caffemodel").exists()
    assert done.stdout.strip() == str(snaps / "snap_iter_6.caffemodel")


def test_an_interrupt_makes_rank_0_snapshot_and_every_rank_stop(tmp_path, fashion_mnist_slices):
    path = solver(tmp_path, "long", fashion_mnist_slices["tiny"], BATCH, clipq=True, iters=1_000_000)
    clipq = str(Path(sys.executable).parent / "clipq")
    script = "ip link set lo up && exec " + shlex.join([clipq, "train", "--mpi", "2", "--no-progress",
                                                        "--solver", str(path)])
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", script], stderr=subprocess.PIPE, text=True)
    log = tmp_path / "long" / "snap.log"
    deadline = time.monotonic() + 120
    while "Iteration 20," not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what Ctrl-C does (clipq treats SIGTERM as an interrupt)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; rank 0 snapshotted" in stderr, stderr[:3000]
    (iteration, _), = train.snapshots(str(tmp_path / "long" / "snap"))
    assert 20 <= iteration < 1_000_000


def test_an_error_on_a_rank_stops_every_rank_with_one_line(tmp_path, fashion_mnist_slices):
    from clipq.util.lock import locked

    path = solver(tmp_path, "plain", fashion_mnist_slices["tiny"], BATCH, clipq=False, iters=2)
    with locked(tmp_path / "plain" / "snap.lock"):  # another run holds the snapshots: rank 0 refuses
        done = clipq_train(["--mpi", "2", "--solver", str(path)], tmp_path)
    assert done.returncode != 0
    assert done.stderr.count("clipq train (rank 0 of 2): ") == 1 and "Traceback" not in done.stderr
    assert "in use by another clipq run" in done.stderr and "MPI_ABORT" not in done.stderr
    assert "training with 2 MPI ranks failed" in done.stderr


def test_compress_fine_tunes_in_two_ranks(tmp_path, trained_mlp):
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nlayers:\n  ip1: {p: 0.9, b: 3}\n  ip2: {p: 0.8, b: 4}\n  ip3: {p: 0.5, b: 5}\n")
    out = tmp_path / "out"
    done = loopback([str(Path(sys.executable).parent / "clipq"), "compress", "--mpi", "2", "--no-progress",
                     "--model", str(trained_mlp["model"]), "--weights", str(trained_mlp["weights"]),
                     "--solver", str(trained_mlp["solver"]), "--out", str(out), "--plan", str(plan)], tmp_path)
    assert done.returncode == 0, done.stderr[:3000]
    log = (out / "finetune.log").read_text()  # rank 0's: pycaffe's glog, not the `caffe train` CLI's
    assert "Logging before InitGoogleLogging" in log and "clipq_iter_40.solverstate" in log
    assert (out / "finetuned.caffemodel").exists()
    assert "| **Overall** |" in (out / "report.md").read_text()
