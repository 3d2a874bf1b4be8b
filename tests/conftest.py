"""Shared fixtures. Every test runs real Caffe (built by `make install`); nothing is mocked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def toy_layers_on_path(monkeypatch):
    """Let `caffe train` (a subprocess) import tests/toy_layers.py."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))


@pytest.fixture(scope="session")
def fashion_mnist_slices(tmp_path_factory):
    """Small real Fashion-MNIST LMDBs: 'train' (first 6000), 'val' (1000 of the held-out last 5000 training
    images), 'test' (first 1000), 'tiny' (first 64)."""
    from clipq import datasets

    root = tmp_path_factory.mktemp("fashion_mnist")
    train = datasets.load_split(datasets.DEBIAN_SOURCE, "train")
    test = datasets.load_split(datasets.DEBIAN_SOURCE, "test")
    for name, split, start, n in (("train", train, 0, 6000), ("val", train, 55000, 1000), ("test", test, 0, 1000),
                                  ("tiny", train, 0, 64)):
        datasets.write_lmdb(datasets.Split(split.images[start:start + n], split.labels[start:start + n]), root / name)
    return {name: root / name for name in ("train", "val", "test", "tiny")}


def random_caffemodel(deploy, path, std: float, seed: int = 0):
    """Save `deploy` with Gaussian random weights and biases to `path`; return the pycaffe net."""
    from clipq import caffe_io

    cf = caffe_io.caffe()
    net = cf.Net(str(deploy), cf.TEST)
    rng = np.random.default_rng(seed)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.normal(0, std, blob.data.shape)
    net.save(str(path))
    return net


SOLVER = ('net: "{net}"\nbase_lr: {lr}\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\n'
          'max_iter: {iters}\nsnapshot: 0\nsnapshot_prefix: "{prefix}"\nsolver_mode: CPU\nrandom_seed: 3\n')


@pytest.fixture(scope="session")
def trained_mlp(tmp_path_factory, fashion_mnist_slices) -> dict:
    """A LeNet-300-100 trained 300 iterations on the Fashion-MNIST train slice: its train_val, weights, and a
    fine-tuning solver (40 iterations, whose net and snapshot_prefix `clipq compress` replaces)."""
    from clipq import nets, train

    root = tmp_path_factory.mktemp("mlp")
    data = nets.DataSpec(str(fashion_mnist_slices["train"]), str(fashion_mnist_slices["test"]), 64, 100,
                         (100, 1, 28, 28), scale=1 / 256)
    model = root / "train_val.prototxt"
    model.write_text(str(nets.train_val("mlp", nets.lenet300_100_body, data)))
    (root / "base_solver.prototxt").write_text(
        SOLVER.format(net=model, lr=0.01, iters=300, prefix=root / "base" / "mlp"))
    weights = train.train(root / "base_solver.prototxt", progress=False)
    solver = root / "finetune.prototxt"
    solver.write_text(SOLVER.format(net="replaced", lr=0.001, iters=40, prefix="replaced"))
    return {"model": model, "weights": weights, "solver": solver, "root": root, "val": fashion_mnist_slices["val"]}


def require_opencv(needed_for: str) -> None:
    """Skip the calling test on a Caffe built without OpenCV (tools/install_caffe.sh's brocolli fallback)."""
    from clipq import caffe_io

    if not caffe_io.has_opencv():
        pytest.skip(f"this Caffe is built without OpenCV (build stamp: opencv=0): {needed_for}")


def require_bvlc(needed_for: str) -> None:
    """Skip the calling test on a Caffe that is not BVLC's (tools/install_caffe.sh's brocolli fallback)."""
    from clipq import caffe_io, doctor

    stamp = doctor.read_build_stamp(caffe_io.caffe_root())
    if stamp.get("source_kind") != "bvlc":
        pytest.skip(f"this Caffe is not BVLC Caffe (build stamp: source_kind={stamp.get('source_kind')}): {needed_for}")


@pytest.fixture(scope="session")
def caffe_root() -> Path:
    """The root of the Caffe build pycaffe is imported from."""
    from clipq import caffe_io

    return caffe_io.caffe_root()
