#!/usr/bin/env python3
"""Write the first N Fashion-MNIST training images as a CSV (Kaggle's digit-recognizer layout: a header,
then `label,pixel0,...,pixel783` per image): the stand-in for a user's own CSV in docs/own_data.md's example.

usage: tools/fashion_mnist_csv.py OUT.csv [--count 5000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipq.data import datasets
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="CSV file to write (replaced if it exists)")
    parser.add_argument("--count", type=int, default=5000, help="images (default 5000)")
    args = parser.parse_args(argv)
    try:
        split = datasets.lmdb_split(datasets.DEBIAN_SOURCE, "train", limit=args.count)
    except ClipqError as e:
        print(f"fashion_mnist_csv: {e}", file=sys.stderr)
        return 2
    with atomic_write(args.out) as f:
        f.write("label," + ",".join(f"pixel{i}" for i in range(split.images[0].size)) + "\n")
        for image, label in zip(split.images, split.labels):
            f.write(f"{label}," + ",".join(map(str, image.ravel())) + "\n")
    print(f"{args.out}: {len(split.labels):,} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
