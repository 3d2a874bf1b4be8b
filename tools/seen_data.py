#!/usr/bin/env python3
"""A baseline that has seen the user's images, compressed on those images, judged on images it never saw.

`make seen-data` runs this case of docs/pipeline.md: the first 5,000 Fashion-MNIST training images are "your
data"; a LeNet-5 trained on all of them (`baseline`: the stand-in for a zoo model trained elsewhere on the same
images) scores ~100% on any split of them, so the validation split the budget measures on shows next to no
damage. `clipq compress --experiment` then compresses it on a `clipq data` split of those images, and `report`
scores the baseline and every run's decoded model on Fashion-MNIST's 10,000 real test images.

usage:
  tools/seen_data.py baseline --data DIR --test LMDB --out DIR [--iterations 4000]
      DIR: a `clipq data --val 0 --test 0` directory; writes OUT/train_val.prototxt (TRAIN: every image; TEST:
      the real test LMDB), OUT/solver.prototxt (Caffe's LeNet schedule) and OUT/zoo.caffemodel (resumable)
  tools/seen_data.py report --net OUT/train_val.prototxt --weights OUT/zoo.caffemodel RUN...
      RUN: `clipq compress` output directories; prints a markdown table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from clipq.caffe import caffe_io, nets, train
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError

SOLVER = """# LeNet-5 on every image of {data} (written by tools/seen_data.py): Caffe's LeNet schedule
net: "{net}"
test_iter: 100
test_interval: {iterations}
test_initialization: false
base_lr: 0.01
momentum: 0.9
weight_decay: 0.0005
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 500
max_iter: {iterations}
snapshot: {iterations}
snapshot_prefix: "{out}/snapshots/zoo"
solver_mode: CPU
random_seed: 1
"""


def baseline(args) -> None:
    """Train LeNet-5 on every image of --data, tested on --test."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = nets.DataSpec(str((args.data / "train_lmdb").resolve()), str(args.test.resolve()), 64, 100,
                         (1, 1, 28, 28), scale=1 / 256)
    with atomic_write(out / "train_val.prototxt") as f:
        f.write(str(nets.train_val("LeNet5", nets.lenet5_body, spec)))
    with atomic_write(out / "solver.prototxt") as f:
        f.write(SOLVER.format(data=args.data, net=out / "train_val.prototxt", iterations=args.iterations, out=out))
    print(train.train(out / "solver.prototxt", output=out / "zoo.caffemodel"))


def report(args) -> None:
    """Baseline and decoded top-1 on the unseen test set, per run and mean (min .. max)."""
    base = 100 * caffe_io.evaluate(args.net, args.weights)["accuracy"]
    rows, drops, rates = [], [], []
    for run in args.runs:
        facts = json.loads((run / "report.json").read_text())
        unseen = 100 * caffe_io.evaluate(args.net, run / "final_decoded.caffemodel")["accuracy"]
        seen = 100 * (facts["accuracy"]["baseline"] - facts["accuracy"]["decoded"])
        drops.append(base - unseen)
        rates.append(facts["size"]["rate"])
        rows.append(f"| {run} | {facts['settings']['seed']} | {facts['size']['clipq_file_bytes']:,} | {rates[-1]:.1f}x "
                    f"| {seen:+.2f} | {unseen:.2f} | {drops[-1]:+.2f} | {'yes' if (facts.get('budget') or {}).get('met') else 'no'} |")
    print(f"Baseline top-1 on the {caffe_io.lmdb_entries(caffe_io.test_data_layer(caffe_io.read_net_param(args.net), str(args.net)).data_param.source):,} "
          f"unseen test images: {base:.2f}%\n")
    print("| run | seed | `.clipq` bytes | rate | drop on its own test split (seen) | unseen top-1 % | unseen drop | budget met |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if len(rows) > 1:
        r, d = np.array(rates), np.array(drops)
        print(f"| mean (min .. max) | | | {r.mean():.1f}x ({r.min():.1f}x .. {r.max():.1f}x) | | "
              f"| {d.mean():+.2f} ({d.min():+.2f} .. {d.max():+.2f}) | |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("baseline", help="train the baseline on every image")
    b.add_argument("--data", type=Path, required=True, help="`clipq data --val 0 --test 0` directory")
    b.add_argument("--test", type=Path, required=True, help="the unseen test LMDB (batch 100)")
    b.add_argument("--out", type=Path, required=True, help="directory to write")
    b.add_argument("--iterations", type=int, default=4000, help="training iterations of batch 64 (default 4000)")
    b.set_defaults(func=baseline)
    r = sub.add_parser("report", help="score compressed runs on the unseen test set")
    r.add_argument("--net", type=Path, required=True, help="the baseline's train_val (TEST: the unseen images)")
    r.add_argument("--weights", type=Path, required=True, help="the baseline caffemodel")
    r.add_argument("runs", type=Path, nargs="+", help="`clipq compress` output directories")
    r.set_defaults(func=report)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ClipqError, OSError) as e:
        print(f"seen_data: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
