"""Data-parallel training on MPI: N pycaffe solvers, one per rank, whose gradients are averaged every iteration.

Every rank builds the same solver with Caffe's `solver_count = N`, `solver_rank = r`, so BVLC's DataLayer
(`DataLayer::Skip`) gives rank r the LMDB entries r, r+N, r+2N, ...: N ranks with batch B see, per iteration,
the N*B images a single process with batch N*B would. In the solver's `on_gradients_ready` callback
(after forward/backward, before the update) every learnable blob's diff is summed over the ranks with
mpi4py and divided by N, so every rank applies the same update and the weights stay identical (the CLIP-Q
layers then quantize identical full-precision weights to identical weights).

Rank 0 decides as `clipq train` does (train.py): the lock on `<snapshot_prefix>.lock`, a finished run, the
newest usable snapshot to resume from; the others follow its choice. BVLC snapshots on rank 0 only (the
root solver), tests only there, and writes Caffe's log there (`<snapshot_prefix>.log`); rank 0 shows the
progress bar and copies the final caffemodel to --output. STOP_SIGNAL (Ctrl-C of `clipq train --mpi`)
makes every rank stop after the same iteration, rank 0 snapshotting first. An error on any rank stops every
rank (MPI Abort) with one line. In a cluster, the snapshot directory, the solver's files and its LMDBs
must be at the same paths on every machine (a shared file system): every rank restores the snapshot itself.

One machine:  clipq train --mpi N --solver S ...   (runs `mpirun -np N ... python -m clipq.data_parallel`)
A cluster:    mpirun -np N --hostfile H .venv/bin/python -m clipq.data_parallel --solver S ...
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np

from clipq.caffe import caffe_io, train
from clipq.util.errors import ClipqError, Interrupted
from clipq.util.lock import locked
from clipq.util.processes import end_with_parent

STOP_SIGNAL = signal.SIGUSR1  # snapshot and stop: a signal mpirun forwards to every rank

# One machine: the ranks talk through shared memory (vader), not TCP. No Open MPI stack dump of a rank that
# a failed Caffe CHECK aborts (opal_signal): glog's message says what failed.
MCA = ("--mca", "pml", "ob1", "--mca", "btl", "self,vader", "--mca", "opal_signal", "")


# pycaffe's side of BVLC's multi-process training: with these, rank r's DataLayer reads LMDB entries r, r+N, ...
RANK_FUNCTIONS = ("set_solver_count", "set_solver_rank", "set_multiprocess")


def unsupported() -> str | None:
    """Why this Caffe cannot train data-parallel (None when it can)."""
    missing = [name for name in RANK_FUNCTIONS if not hasattr(caffe_io.caffe(), name)]
    if not missing:
        return None
    return (f"this Caffe predates BVLC's multi-process training: its pycaffe has no {', '.join(missing)} and "
            "its DataLayer cannot give each rank its own share of the LMDB (brocolli-caffe, the install's last "
            "resort, is such a Caffe); build BVLC Caffe (tools/install_caffe.sh with the mirror or GitHub)")


def require_support() -> None:
    """ClipqError if this Caffe cannot train data-parallel (before mpirun starts N ranks that would all fail)."""
    why = unsupported()
    if why is not None:
        raise ClipqError(f"--mpi: {why}")


def mpirun_command(ranks: int, program: list[str]) -> list[str]:
    """`mpirun` running `program` in `ranks` processes on this machine."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise ClipqError("--mpi: no mpirun on PATH; run `make install` (Debian's openmpi-bin)")
    # --oversubscribe: the user chose N, even above the cores; -q: the ranks' one-line errors, no MPI banners
    cmd = [mpirun, "-q", "-np", str(ranks), "--oversubscribe", *MCA]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd + program


def launch(ranks: int, solver: Path, output: Path | None = None, weights: Path | None = None,
           log: Path | None = None, progress: bool = True) -> Path:
    """`clipq train --mpi N`: train with `ranks` MPI processes on this machine; return the final caffemodel
    (`output` when given). Each rank gets an equal share of the cores for its BLAS threads."""
    require_support()
    param = train.read_solver(solver)
    args = ["--solver", str(solver)] + _options(weights=weights, output=output, log=log)
    if not progress:
        args.append("--no-progress")
    threads = str(max(1, (os.cpu_count() or 1) // ranks))
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, threads)
    # Its own session: Ctrl-C reaches clipq only, which asks the ranks to snapshot and stop (SIGUSR1, which
    # mpirun forwards); mpirun gets SIGTERM (it ends the ranks) if clipq dies.
    proc = subprocess.Popen(mpirun_command(ranks, [sys.executable, "-m", "clipq.data_parallel", *args]), env=env,
                            start_new_session=True, preexec_fn=partial(end_with_parent, signal.SIGTERM, os.getpid()))
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(STOP_SIGNAL)
        proc.wait()
        raise Interrupted(f"interrupted; rank 0 snapshotted under {param.snapshot_prefix}; "
                         "rerun the same command to resume") from None
    if code != 0:
        log = log or Path(f"{param.snapshot_prefix}.log")
        raise ClipqError(f"training with {ranks} MPI ranks failed (mpirun exit {code}); rank 0's Caffe log: {log}")
    return Path(output) if output is not None else train.final_weights(param)


def _options(**paths: Path | None) -> list[str]:
    return [arg for name, path in paths.items() if path is not None for arg in (f"--{name}", str(path))]


def run(solver: Path, output: Path | None = None, weights: Path | None = None, log: Path | None = None,
        progress: bool = True, comm=None) -> Path:
    """One rank's part of a data-parallel `clipq train` (every rank of `comm` calls this); returns the final
    caffemodel (`output` when given)."""
    comm = comm or _mpi().COMM_WORLD
    param = train.read_solver(solver)
    final = train.final_weights(param)
    if comm.rank != 0:
        plan = comm.bcast(None)
        if plan is not None:
            fine_tune(solver, comm, *plan)
        comm.barrier()  # rank 0 has written `output`
        return Path(output) if output is not None else final
    Path(param.snapshot_prefix).parent.mkdir(parents=True, exist_ok=True)
    with locked(f"{param.snapshot_prefix}.lock"):
        layers = train.train_layers(param)
        plan = None if train.finished(final, layers) else _plan(param, layers, weights)
        comm.bcast(plan)
        if plan is not None:
            with _caffe_log_to(log or Path(f"{param.snapshot_prefix}.log")):
                fine_tune(solver, comm, *plan, progress=progress)
            problem = train.final_problem(param, layers)
            if problem:
                raise ClipqError(f"training stopped before max_iter={param.max_iter} ({problem})")
        if output is not None:
            train.copy_result(final, output)
    comm.barrier()
    return Path(output) if output is not None else final


def _plan(param, layers: set[str], weights: Path | None) -> tuple[Path | None, Path | None]:
    """(snapshot to restore, weights to load): rank 0's choice, as `clipq train` makes it."""
    resume = train.resume_point(param, layers)
    if resume:
        print(f"clipq train: resuming from {resume[1]}", file=sys.stderr)
        return resume[1], None
    if weights is not None:
        train.require_weights(weights)
    return None, weights


def fine_tune(solver_path: Path, comm, snapshot: Path | None = None, weights: Path | None = None,
              progress: bool = False):
    """Build this rank's solver, start it from `snapshot` or `weights` (or the fillers of rank 0), and step to
    max_iter with gradients averaged over `comm`; rank 0 snapshots as `caffe train` does. Returns the solver."""
    caffe = caffe_io.caffe()  # loaded by the rank, after main() set glog's environment
    caffe.set_mode_cpu()
    caffe.set_solver_count(comm.size)  # before the nets exist: their DataLayers read a shard by these
    caffe.set_solver_rank(comm.rank)
    caffe.set_multiprocess(True)  # else a Python layer refuses to run on a rank other than 0
    solver = caffe.get_solver(str(solver_path))
    if snapshot is not None:
        solver.restore(str(snapshot))
    elif weights is not None:
        solver.net.copy_from(str(weights))
    blobs = _unique_blobs(solver.net)
    for blob in blobs:  # Caffe seeds each rank's fillers with random_seed + rank: start from rank 0's
        comm.Bcast(blob.data, root=0)

    def average_gradients() -> None:
        for blob in blobs:
            diff = blob.diff
            comm.Allreduce(_mpi().IN_PLACE, diff)
            diff /= np.float32(comm.size)

    solver.add_callback(lambda: None, average_gradients)
    param = train.read_solver(solver_path)  # all fields (pycaffe's solver.param has a few)
    bar = train.progress_bar(param.max_iter, solver.iter, str(solver_path), progress and comm.rank == 0)
    requests, stopped = _StopRequests(), False
    while solver.iter < param.max_iter and not stopped:
        solver.step(1)  # one at a time, for the bar: Step's snapshots and display follow the global iteration
        if bar is not None:
            bar.update(1)
        stopped = comm.allreduce(requests.received, op=_mpi().LOR)  # all stop after the same iteration
    if bar is not None:
        bar.close()
    stopped = stopped and solver.iter < param.max_iter
    if comm.rank == 0 and (stopped or _snapshot_after_train(param, solver.iter)):
        solver.snapshot()
    if stopped:
        raise StopRequested(solver.iter)
    return solver


class StopRequested(Exception):
    """A stop request (STOP_SIGNAL) ended training early, after rank 0's snapshot at `iteration`."""

    def __init__(self, iteration: int):
        super().__init__(f"stopped at iteration {iteration} (snapshotted)")
        self.iteration = iteration


class _StopRequests:
    """`received` turns True when this rank gets STOP_SIGNAL (from `clipq train --mpi` on Ctrl-C, via mpirun)."""

    def __init__(self):
        self.received = False
        signal.signal(STOP_SIGNAL, self._receive)

    def _receive(self, signum, frame) -> None:
        self.received = True


def _snapshot_after_train(param, iteration: int) -> bool:
    """Whether `caffe train` (Solver::Solve) writes a last snapshot at `iteration` (Step has not)."""
    return param.snapshot_after_train and (not param.snapshot or iteration % param.snapshot != 0)


def _unique_blobs(net) -> list:
    """Each parameter blob of `net` once (a blob shared between layers appears under each of them)."""
    seen, unique = set(), []
    for layer_blobs in net.params.values():
        for blob in layer_blobs:
            address = blob.data.__array_interface__["data"][0]
            if address not in seen:
                seen.add(address)
                unique.append(blob)
    return unique


class _caffe_log_to:
    """Caffe's log (glog writes to file descriptor 2) appended to `path`, while Python's sys.stderr (the
    progress bar, clipq's messages) stays on the terminal."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        sys.stderr.flush()
        self.terminal = os.dup(2)
        self.saved = sys.stderr
        sys.stderr = os.fdopen(os.dup(self.terminal), "w", buffering=1)
        with open(self.path, "a") as log:
            os.dup2(log.fileno(), 2)

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.terminal, 2)
        os.close(self.terminal)
        sys.stderr.close()
        sys.stderr = self.saved


def _mpi():
    """mpi4py's MPI module, imported when a rank needs it."""
    from mpi4py import MPI  # lazy: importing it initialises MPI, which only a rank may do

    return MPI


def _abort(comm, message: str) -> None:
    """Print `message` once and end every rank (mpirun then exits non-zero)."""
    print(f"clipq train (rank {comm.rank} of {comm.size}): {message}", file=sys.stderr, flush=True)
    comm.Abort(2)


def main(argv: list[str] | None = None) -> int:
    """Entry point of each rank: `python -m clipq.data_parallel --solver S [--weights W] [--output O] ...`."""
    p = argparse.ArgumentParser(prog="python -m clipq.data_parallel",
                                description="One MPI rank of data-parallel `clipq train` (start it with mpirun).")
    p.add_argument("--solver", type=Path, required=True)
    p.add_argument("--weights", type=Path)
    p.add_argument("--output", type=Path)
    p.add_argument("--log", type=Path)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    comm = _mpi().COMM_WORLD
    # Caffe's log (read by glog when pycaffe loads): every line on rank 0 (to its log file), warnings and
    # errors only on the others.
    os.environ.update(GLOG_logtostderr="1", GLOG_minloglevel="0" if comm.rank == 0 else "1")
    try:
        run(args.solver, args.output, args.weights, args.log, not args.no_progress, comm)
    except StopRequested as e:
        if comm.rank == 0:
            print(f"clipq train: {e}", file=sys.stderr)
        return 130
    except ClipqError as e:
        _abort(comm, str(e))
    except OSError as e:
        _abort(comm, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except Exception as e:  # a Python layer's error, a bad net, ...: the reason, not N tracebacks
        _abort(comm, f"{type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
