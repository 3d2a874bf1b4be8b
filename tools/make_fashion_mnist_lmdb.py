#!/usr/bin/env python3
"""Convert Fashion-MNIST (Debian package dataset-fashion-mnist) into Caffe Datum LMDBs.

Writes <out>/train_lmdb (the first 55,000 training images), <out>/val_lmdb (the last 5,000, held out
from training for the search and the accuracy budget) and <out>/test_lmdb (the 10,000 test images, for
final numbers only), each atomically and validated; skips a split whose finished LMDB is already there.
Default <out>: ~/.cache/clipq/data/fashion_mnist (CLIPQ_CACHE moves the cache).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipq.data import datasets
from clipq.util import paths
from clipq.util.errors import ClipqError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--source", type=Path, default=datasets.DEBIAN_SOURCE, help="directory of the IDX .gz files")
    parser.add_argument("--out", type=Path, default=paths.data_dir() / "fashion_mnist", help="output directory")
    parser.add_argument("--limit", type=int, help="convert only the first N images of each split (for tests)")
    parser.add_argument("--force", action="store_true", help="rewrite LMDBs that already exist")
    args = parser.parse_args(argv)
    try:
        for name, (_, start, end) in datasets.LMDB_SPLITS.items():
            out = args.out / f"{name}_lmdb"
            if not args.force and args.limit is None and datasets.lmdb_count(out) == end - start:
                print(f"{out}: already made ({end - start} images)")
                continue
            data = datasets.lmdb_split(args.source, name, args.limit)
            datasets.write_lmdb(data, out)
            print(f"{out}: {len(data.labels)} images")
    except ClipqError as e:
        print(f"make_fashion_mnist_lmdb: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
