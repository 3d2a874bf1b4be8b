"""Fashion-MNIST IDX -> Datum LMDB: the converter script on a slice, and validation of bad sources."""

from __future__ import annotations

import gzip
import subprocess
import sys

import lmdb
import numpy as np
import pytest

from clipq.caffe import caffe_io
from clipq.data import datasets
from clipq.util.errors import ClipqError


def write_idx(path, magic, array, declared_count=None):
    header = np.array([magic, declared_count if declared_count is not None else len(array), *array.shape[1:]], ">i4")
    with gzip.open(path, "wb") as f:
        f.write(header.tobytes() + array.astype(np.uint8).tobytes())


def fake_source(tmp_path, n=12, labels=None, image_magic=2051):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28))
    labels = rng.integers(0, 10, n) if labels is None else np.asarray(labels)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", image_magic, images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, labels)
    return images, labels


def test_converter_slice_has_the_count_and_datums_equal_the_source_images(tmp_path, repo):
    out = tmp_path / "fm"
    subprocess.run([sys.executable, str(repo / "tools" / "make_fashion_mnist_lmdb.py"), "--limit", "100",
                    "--out", str(out)], check=True, capture_output=True)
    source = datasets.load_split(datasets.DEBIAN_SOURCE, "test")
    env = lmdb.open(str(out / "test_lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.stat()["entries"] == 100
        image, label = caffe_io.datum_to_image(txn.get(b"%08d" % 37))
    assert image.shape == (1, 28, 28)
    assert np.array_equal(image[0], source.images[37]) and label == source.labels[37]
    assert datasets.lmdb_count(out / "train_lmdb") == 100


def test_debian_package_has_the_full_splits():
    assert len(datasets.load_split(datasets.DEBIAN_SOURCE, "train").labels) == 60000


def test_missing_source_file_is_named(tmp_path):
    with pytest.raises(ClipqError, match="train-images-idx3-ubyte.gz: file not found"):
        datasets.load_split(tmp_path, "train")


def test_truncated_payload_is_rejected(tmp_path):
    fake_source(tmp_path)
    images = np.zeros((12, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, images, declared_count=13)
    with pytest.raises(ClipqError, match="corrupt or truncated"):
        datasets.load_split(tmp_path, "train", check_count=False)


def test_wrong_magic_is_rejected(tmp_path):
    fake_source(tmp_path, image_magic=2049)
    with pytest.raises(ClipqError, match="magic is 2049, expected 2051"):
        datasets.load_split(tmp_path, "train", check_count=False)


def test_label_out_of_range_is_rejected(tmp_path):
    fake_source(tmp_path, n=3, labels=[1, 10, 2])
    with pytest.raises(ClipqError, match="label 10 outside 0..9"):
        datasets.load_split(tmp_path, "train", check_count=False)


def test_wrong_count_is_rejected(tmp_path):
    fake_source(tmp_path, n=12)
    with pytest.raises(ClipqError, match="12 images, expected 60000"):
        datasets.load_split(tmp_path, "train")


def test_not_gzip_is_rejected(tmp_path):
    fake_source(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(ClipqError, match="not a readable gzip file"):
        datasets.load_split(tmp_path, "train", check_count=False)
