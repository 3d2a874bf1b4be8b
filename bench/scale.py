#!/usr/bin/env python3
"""Scaling out, measured against the local path in the same run: fine-tuning on MPI ranks, the search on Ray.

Part "train": training iterations per second of `clipq train --mpi N` against `clipq train` (`caffe train`).
Part "search": search evaluations per second on Ray workers against local processes (bench/scale_ray.py,
which documents its workload).

LeNet-5 on the Fashion-MNIST train LMDB (`make data`), SGD from the fillers, no test phase. Each row is one
way of running the same solver, measured `--repeats` times in this run; a row's rate is the steady state
from rank 0's Caffe log (glog time stamps from iteration WARMUP to the last display before max_iter: process
start, net setup and mpirun are left out) and its wall time is the whole command. Rows with N ranks read
N x batch images per iteration; "images/s" compares the work done. BLAS threads: what `clipq train --mpi N`
sets (cores / N per rank, unless OMP_NUM_THREADS or OPENBLAS_NUM_THREADS is set), OpenBLAS's default (all
cores) for caffe train.
The whole run is in a network namespace with loopback only (`unshare -n`) when it may create one.

    .venv/bin/python bench/scale.py [--part all|train|search] [--repeats 3] [--iterations 300]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_overhead import machine_line  # noqa: E402

from clipq.caffe import data_parallel, train

REPO = Path(__file__).resolve().parents[1]
NET = REPO / "prototxt" / "lenet5" / "train_val.prototxt"
WARMUP = 50  # iterations before the timed stretch (and the log's display interval)
INSIDE = "CLIPQ_BENCH_LOOPBACK"  # set once the bench runs in its own network namespace


@dataclass
class Row:
    """One way of training: its label, images per iteration, and how to run a solver that way."""
    label: str
    images: int
    run: Callable[[Path], None]


def caffe_train(solver: Path) -> None:
    train.train(solver, progress=False)


def mpi(ranks: int) -> Callable[[Path], None]:
    def run(solver: Path) -> None:
        data_parallel.launch(ranks, solver, progress=False)
    return run


def rows() -> list[tuple[Row, int]]:
    """(row, batch per process). A Ray row is one more entry here."""
    return [(Row("caffe train, 1 process", 64, caffe_train), 64),
            (Row("--mpi 1", 64, mpi(1)), 64),
            (Row("--mpi 2, batch 64 per rank", 128, mpi(2)), 64),
            (Row("--mpi 2, batch 32 per rank", 64, mpi(2)), 32)]


def write_solver(root: Path, name: str, batch: int, iterations: int) -> Path:
    """LeNet-5's train net with `batch` per process, a fixed-rate SGD solver, no test net, no snapshots."""
    net = root / f"{name}.prototxt"
    net.write_text(NET.read_text().replace("batch_size: 64", f"batch_size: {batch}"))
    solver = root / f"{name}_solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\n'
                      f'display: {WARMUP}\nmax_iter: {iterations}\nsnapshot: 0\n'
                      f'snapshot_prefix: "{root / name / "lenet5"}"\nsolver_mode: CPU\nrandom_seed: 1\n')
    return solver


def steady_rate(log: Path, first: int, last: int) -> float:
    """Iterations per second between the log lines of iterations `first` and `last` (glog's time stamps)."""
    stamps = {}
    for line in log.read_text().splitlines():
        m = re.match(r"I\d{4}(\d{4}) (\d\d:\d\d:\d\d\.\d+) .*\] Iteration (\d+)[ ,]", line)
        if m and int(m.group(3)) in (first, last):
            stamps.setdefault(int(m.group(3)), datetime.strptime(m.group(2), "%H:%M:%S.%f"))
    return (last - first) / (stamps[last] - stamps[first]).total_seconds()


def measure(row: Row, solver: Path, iterations: int) -> tuple[float, float]:
    """(steady iterations per second, wall seconds) of one fresh run of `row`."""
    prefix = Path(train.read_solver(solver).snapshot_prefix)
    shutil.rmtree(prefix.parent, ignore_errors=True)
    prefix.parent.mkdir()
    start = time.perf_counter()
    row.run(solver)
    wall = time.perf_counter() - start
    last = (iterations - 1) // WARMUP * WARMUP  # the last display line: the final one differs between rows
    return steady_rate(Path(f"{prefix}.log"), WARMUP, last), wall


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ({min(values):.1f}..{max(values):.1f})"


def threads_line() -> str:
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return "# threads: " + ", ".join(f"{n}={os.environ.get(n, 'unset')}" for n in names) + \
        f"; --mpi N sets cores // N per rank when unset; cores: {os.cpu_count()}; " \
        "load average at start: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def in_loopback_namespace(argv: list[str]) -> int | None:
    """Rerun this bench in a network namespace with loopback only; None when that is not possible."""
    if os.environ.get(INSIDE) or shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        print("# note: unshare -n not permitted; mpirun may listen on every interface", file=sys.stderr)
        return None
    script = 'ip link set lo up && exec "$0" "$@"'
    return subprocess.call(["unshare", "-n", "sh", "-c", script, sys.executable, __file__, *argv],
                           env=dict(os.environ, **{INSIDE: "1"}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each row (median and range reported)")
    parser.add_argument("--iterations", type=int, default=300, help=f"max_iter of each run (> {2 * WARMUP})")
    parser.add_argument("--part", choices=["all", "train", "search"], default="all",
                        help="train: MPI fine-tuning rows; search: Ray search rows (bench/scale_ray.py)")
    args = parser.parse_args(argv)
    code = in_loopback_namespace(sys.argv[1:] if argv is None else argv)
    if code is not None:
        return code
    os.chdir(REPO)  # the net names its LMDBs relative to the repository
    print(machine_line())
    if args.part in ("all", "train"):
        train_rows(args)
    if args.part in ("all", "search"):
        import scale_ray  # after the training rows: it sets one BLAS thread for this process's workers

        print()
        scale_ray.main(["--repeats", str(args.repeats)])
    return 0


def train_rows(args) -> None:
    """The MPI table: every row --repeats times, interleaved."""
    print(threads_line())
    print(f"# LeNet-5, Fashion-MNIST train_lmdb, {args.iterations} iterations a run, rate over iterations "
          f"{WARMUP}..{(args.iterations - 1) // WARMUP * WARMUP}; median (min..max) of {args.repeats} runs")
    table = rows()
    results: dict[str, list[tuple[float, float]]] = {row.label: [] for row, _ in table}
    with tempfile.TemporaryDirectory() as tmp:
        solvers = [write_solver(Path(tmp), f"row{i}", batch, args.iterations) for i, (_, batch) in enumerate(table)]
        for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every row
            for (row, _), solver in zip(table, solvers):
                results[row.label].append(measure(row, solver, args.iterations))
    base = statistics.median(rate for rate, _ in results[table[0][0].label])
    print(f"{'row':<30}{'images/iter':>12}{'iter/s':>22}{'images/s':>10}{'vs caffe train':>16}{'wall s':>20}")
    for row, _ in table:
        rates = [rate for rate, _ in results[row.label]]
        walls = [wall for _, wall in results[row.label]]
        rate = statistics.median(rates)
        print(f"{row.label:<30}{row.images:>12}{spread(rates):>22}{rate * row.images:>10.0f}"
              f"{rate * row.images / (base * 64):>15.2f}x{spread(walls):>20}")


if __name__ == "__main__":
    raise SystemExit(main())
