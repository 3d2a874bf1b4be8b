#!/usr/bin/env python3
"""Search throughput on Ray against the local executor, measured in the same run (the Ray half of
bench/scale.py; the MPI half measures fine-tuning).

Workload: `clipq search` (driver.run) on LeNet-5 with random weights, its error measured on a subset of
Fashion-MNIST training images (Debian's fashion-mnist package), 4 layers x --iterations evaluations each.
Configurations: the local executor with --jobs 1 and 2 (processes, layers round robin) and Ray with 1 and
2 workers (`--ray local`: one Ray on 127.0.0.1, started once, its start-up timed apart; actors are created
per search, as processes are). With 4 layers and <= 2 workers every layer gets batches of 1, so every
configuration does the same evaluations. Each run starts from empty logs; evaluations per second =
evaluations / wall time of driver.run, including process or actor start-up, net loading and the plots.
Every worker gets one BLAS thread (OMP/OPENBLAS_NUM_THREADS=1, what Ray gives its actors anyway), so the
executors differ only in how work reaches the nets.

    .venv/bin/python bench/scale_ray.py [--repeats 3] [--iterations 12] [--subset 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_overhead import machine_line  # noqa: E402

from clipq.caffe import caffe_io
from clipq.caffe.convert import compressible_layers  # noqa: E402
from clipq.data import datasets
from clipq.search import driver, gp, ray_executor

REPO = Path(__file__).resolve().parents[1]
LENET5 = REPO / "prototxt" / "lenet5"
CONFIGS = [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]


def make_model(root: Path, images: int) -> tuple[Path, Path]:
    """LeNet-5's train_val reading `images` Fashion-MNIST training images, and random weights for it."""
    train = datasets.load_split(datasets.DEBIAN_SOURCE, "train")
    lmdb = root / "train_lmdb"
    datasets.write_lmdb(datasets.Split(train.images[:images], train.labels[:images]), lmdb)
    model = root / "train_val.prototxt"
    model.write_text((LENET5 / "train_val.prototxt").read_text()
                     .replace('"cache/data/fashion_mnist/train_lmdb"', f'"{lmdb}"')
                     .replace('"cache/data/fashion_mnist/test_lmdb"', f'"{lmdb}"'))
    weights = root / "random.caffemodel"
    cf = caffe_io.caffe()
    net = cf.Net(str(LENET5 / "deploy.prototxt"), cf.TEST)
    rng = np.random.default_rng(0)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(0, 0.05, blob.data.shape)
    net.save(str(weights))
    return model, weights


def search_seconds(model: Path, weights: Path, out: Path, settings: gp.SearchSettings, executor: str,
                   workers: int) -> float:
    """Wall time of one search from empty logs (Ray: on the Ray this process is connected to)."""
    start = time.perf_counter()
    driver.run(model, weights, out, settings=settings, jobs=workers, progress=False, log=lambda message: None,
               ray=ray_executor.LOCAL if executor == "ray" else None)
    return time.perf_counter() - start


def measure(model: Path, weights: Path, root: Path, settings: gp.SearchSettings,
            repeats: int) -> tuple[dict[tuple[str, int], list[float]], float]:
    """Evaluations per second of every configuration, `repeats` times each (interleaved, so a slow spell of a
    shared machine hits all of them), and the seconds Ray took to start."""
    evaluations = len(compressible_layers(caffe_io.read_net_param(model))) * settings.iterations
    start = time.perf_counter()
    with ray_executor.connected(ray_executor.LOCAL, max(w for _, w in CONFIGS)):
        ray_start = time.perf_counter() - start
        rates: dict[tuple[str, int], list[float]] = {config: [] for config in CONFIGS}
        for repeat in range(repeats):
            for executor, workers in CONFIGS:
                out = root / f"{executor}{workers}_{repeat}"
                rates[executor, workers].append(evaluations / search_seconds(model, weights, out, settings,
                                                                             executor, workers))
    return rates, ray_start


def report(rates: dict[tuple[str, int], list[float]], ray_start: float, settings: gp.SearchSettings) -> str:
    """The table: median and range of evaluations per second, and each median over local --jobs 1's."""
    import ray

    base = statistics.median(rates["local", 1])
    load = f" | load average at the end {os.getloadavg()[0]:.1f}"
    lines = [machine_line() + load, f"# ray {ray.__version__} (`--ray local`, started once in {ray_start:.1f} s); "
             f"LeNet-5, 4 layers x {settings.iterations} evaluations, subset {settings.subset}, "
             f"{len(rates['local', 1])} repetitions",
             f"{'executor':<18}{'evals/s median':>15}{'min .. max':>16}{'vs local 1':>12}"]
    for (executor, workers), values in rates.items():
        name = f"local --jobs {workers}" if executor == "local" else f"ray, {workers} worker{'s' * (workers > 1)}"
        median = statistics.median(values)
        lines.append(f"{name:<18}{median:>15.2f}{min(values):>8.2f} .. {max(values):<6.2f}{median / base:>11.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=12, help="evaluations per layer")
    parser.add_argument("--subset", type=int, default=1000, help="images per evaluation")
    args = parser.parse_args(argv)
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")  # before Caffe loads OpenBLAS, here and in workers
    settings = gp.SearchSettings(iterations=args.iterations, initial=min(4, args.iterations),
                                     subset=args.subset)
    with tempfile.TemporaryDirectory(prefix="clipq-scale-ray-") as tmp:
        model, weights = make_model(Path(tmp), args.subset)
        rates, ray_start = measure(model, weights, Path(tmp), settings, args.repeats)
    print(report(rates, ray_start, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
