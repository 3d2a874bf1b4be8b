"""Fashion-MNIST (Debian package `dataset-fashion-mnist`, IDX files) -> Caffe `Datum` LMDBs."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np

from clipq.caffe import caffe_io
from clipq.data.image_sources import parse_idx
from clipq.util.atomic import atomic_dir
from clipq.util.errors import ClipqError

DEBIAN_SOURCE = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {  # split -> (image file, label file, expected count)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
# The LMDBs clipq makes: the validation split is the last 5,000 training images, held out from the
# baselines and the fine-tuning; the search and the accuracy budget measure on it, and the 10,000 test
# images are kept for the final numbers.
LMDB_SPLITS = {  # LMDB name -> (IDX split, first image, end)
    "train": ("train", 0, 55000),
    "val": ("train", 55000, 60000),
    "test": ("test", 0, 10000),
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
IMAGE_SIDE, NUM_CLASSES = 28, 10
DONE_FILE = "clipq.json"  # written last: an LMDB without it is incomplete


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (n, H, W) grey or (n, C, H, W) uint8
    labels: np.ndarray  # (n,) integer labels


def _read_gz(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ClipqError(f"{path}: file not found (install the Debian package dataset-fashion-mnist)") from None
    except (OSError, EOFError) as e:
        raise ClipqError(f"{path}: not a readable gzip file ({e}); reinstall dataset-fashion-mnist") from None


def read_idx(path: Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
    """Read an IDX file (big-endian header: magic, counts, dims), checking the header against the payload."""
    raw = _read_gz(path)
    ndim = 1 + len(item_shape)
    header_len = 4 * (1 + ndim)
    if len(raw) < header_len:
        raise ClipqError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    header = np.frombuffer(raw[:header_len], dtype=">i4")
    if header[0] != magic:
        raise ClipqError(f"{path}: IDX magic is {header[0]}, expected {magic}")
    if tuple(header[2:]) != item_shape:
        raise ClipqError(f"{path}: items have shape {tuple(header[2:])}, expected {item_shape}")
    return parse_idx(raw, path)


def load_split(source: Path, split: str, check_count: bool = True) -> Split:
    """Load and validate one split (counts, label range, image size) from the IDX files in `source`."""
    image_file, label_file, expected = SPLITS[split]
    images = read_idx(source / image_file, IMAGE_MAGIC, (IMAGE_SIDE, IMAGE_SIDE))
    labels = read_idx(source / label_file, LABEL_MAGIC, ())
    if len(images) != len(labels):
        raise ClipqError(f"{source / image_file}: {len(images)} images but {len(labels)} labels in {label_file}")
    if check_count and len(images) != expected:
        raise ClipqError(f"{source / image_file}: {len(images)} images, expected {expected} for Fashion-MNIST {split}")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ClipqError(f"{source / label_file}: label {labels.max()} outside 0..{NUM_CLASSES - 1}")
    return Split(images, labels)


def lmdb_split(source: Path, name: str, limit: int | None = None) -> Split:
    """The images of one of the LMDB_SPLITS (the first `limit` of them, if given)."""
    split, start, end = LMDB_SPLITS[name]
    data = load_split(source, split)
    end = end if limit is None else min(end, start + limit)
    return Split(data.images[start:end], data.labels[start:end])


def write_lmdb(split: Split, out: Path, batch: int = 5000) -> None:
    """Write `split` as an LMDB of Caffe Datums (keys %08d, C x H x W uint8), atomically, then verify it."""
    with atomic_dir(out) as tmp:
        env = lmdb.open(str(tmp), map_size=1 << 32, subdir=True)
        for start in range(0, len(split.labels), batch):
            with env.begin(write=True) as txn:
                for i in range(start, min(start + batch, len(split.labels))):
                    datum = caffe_io.image_to_datum(_chw(split.images[i]), int(split.labels[i]))
                    txn.put(b"%08d" % i, datum)
        env.close()
        verify_lmdb(tmp, split)
        shape = list(_chw(split.images[0]).shape) if len(split.labels) else []
        (tmp / DONE_FILE).write_text(json.dumps({"count": int(len(split.labels)), "shape": shape}))


def _chw(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) view of a grey (H, W) or (C, H, W) image."""
    return image[None] if image.ndim == 2 else image


def verify_lmdb(path: Path, split: Split) -> None:
    """Check entry count and that the first and last Datums decode to their source images and labels."""
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=True)
    with env.begin() as txn:
        count = txn.stat()["entries"]
        if count != len(split.labels):
            raise ClipqError(f"{path}: {count} entries written, expected {len(split.labels)}")
        for i in {0, count - 1} if count else ():
            image, label = caffe_io.datum_to_image(txn.get(b"%08d" % i))
            if label != split.labels[i] or not np.array_equal(image, _chw(split.images[i])):
                raise ClipqError(f"{path}: entry {i} does not decode to its source image")
    env.close()


def lmdb_count(path: Path) -> int | None:
    """Number of entries of a finished clipq LMDB, None when it is missing or incomplete."""
    try:
        return int(json.loads((Path(path) / DONE_FILE).read_text())["count"])
    except (OSError, ValueError, KeyError):
        return None
