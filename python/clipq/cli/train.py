"""`clipq train`: `caffe train`, resumably."""

from __future__ import annotations

import argparse
from pathlib import Path

from clipq.caffe import data_parallel, preflight, train
from clipq.cli.arguments import distinct_output, output_file, positive_int


def add_train(sub) -> None:
    """`clipq train`: real `caffe train`, resumable"""
    p = sub.add_parser("train", help="run `caffe train` resumably, with a progress bar",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train with the real `caffe train --solver SOLVER`. Resumes from the newest\n"
                                   "<snapshot_prefix>_iter_N.solverstate; Ctrl-C makes Caffe snapshot first.\n"
                                   "Paths inside the solver are relative to the current directory.",
                       epilog="--mpi N: data-parallel training in N pycaffe processes on this machine (mpirun, "
                              "Open MPI): each\nrank reads every N-th image of the LMDB with the solver's batch "
                              "size (N x batch images per\niteration) and the gradients are averaged over the "
                              "ranks every iteration. Snapshots, the log and\nthe result are written by rank 0; "
                              "it resumes like the default path; Ctrl-C makes rank 0 snapshot,\nthen every rank stops "
                              "(under your own mpirun: kill -USR1 <mpirun's pid>).\n"
                              "Several machines: start the ranks with your own mpirun, the paths the same on "
                              "every machine\n(a shared file system):\n"
                              "  mpirun -np 8 --hostfile HOSTS .venv/bin/python -m clipq.data_parallel "
                              "--solver S [--weights W] [--output O]\n"
                              "GPUs (BVLC's NCCL route, one process per GPU): Caffe's python/train.py; untested "
                              "here (no GPU).")
    p.add_argument("--solver", type=Path, required=True, help="solver prototxt")
    p.add_argument("--weights", type=Path, help="caffemodel to start from (ignored when resuming)")
    p.add_argument("--output", type=output_file,
                   help="copy the final caffemodel here (atomically; replaced if it exists)")
    p.add_argument("--log", type=Path, help="Caffe's log (default: <snapshot_prefix>.log)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--mpi", type=positive_int, metavar="N",
                   help="train in N MPI processes on this machine, gradients averaged (see below)")
    p.set_defaults(func=_train)


def _train(args) -> int:
    if args.output is not None:
        distinct_output(args.output, solver=args.solver, weights=args.weights)
    solver = train.read_solver(args.solver)
    net = train.solver_net(args.solver, solver)
    if net is not None:  # weights may cover part of the net: fine-tuning learns the rest
        checked = preflight.check_net(net, args.weights, "TRAIN", require_all=False, what=f"net of {args.solver}")
        if len(solver.test_iter):
            preflight.blob_shapes(checked.param, net, "TEST")
    if args.mpi:
        result = data_parallel.launch(args.mpi, args.solver, output=args.output, weights=args.weights,
                                      log=args.log, progress=not args.no_progress)
    else:
        result = train.train(args.solver, output=args.output, weights=args.weights, log=args.log,
                             progress=not args.no_progress)
    print(result)
    return 0
