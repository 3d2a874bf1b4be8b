"""Shared fixtures. Every test runs real Caffe (built by `make install`); nothing is mocked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipq.caffe import build, caffe_io, nets, train
from clipq.data import datasets

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
    root = tmp_path_factory.mktemp("fashion_mnist")
    train = datasets.load_split(datasets.DEBIAN_SOURCE, "train")
    test = datasets.load_split(datasets.DEBIAN_SOURCE, "test")
    for name, split, start, n in (("train", train, 0, 6000), ("val", train, 55000, 1000), ("test", test, 0, 1000),
                                  ("tiny", train, 0, 64)):
        datasets.write_lmdb(datasets.Split(split.images[start:start + n], split.labels[start:start + n]), root / name)
    return {name: root / name for name in ("train", "val", "test", "tiny")}


def random_caffemodel(deploy, path, std: float, seed: int = 0):
    """Save `deploy` with Gaussian random weights and biases to `path`; return the pycaffe net."""
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


MINI_LAYERS = ["conv1", "res2a_branch2a", "res2a_branch2b", "mix/1x1", "mix/3x3", "mix/5x5", "fc"]  # mini's


@pytest.fixture(scope="session")
def mini(tmp_path_factory, fashion_mnist_slices) -> dict[str, Path]:
    """A net unlike the paper's (BatchNorm/Scale, a residual block, a GoogLeNet-style Concat:
    nets.mini_resnet_inception_body) trained 200 iterations on 6000 Fashion-MNIST images (~6 s): its train_val,
    deploy, solver and weights."""
    root = tmp_path_factory.mktemp("mini")
    data = nets.DataSpec(str(fashion_mnist_slices["train"]), str(fashion_mnist_slices["test"]), 64, 100,
                         (16, 1, 28, 28), scale=1 / 256)
    files = {"train_val": root / "train_val.prototxt", "deploy": root / "deploy.prototxt",
             "solver": root / "solver.prototxt"}
    files["train_val"].write_text(str(nets.train_val("mini", nets.mini_resnet_inception_body, data)))
    files["deploy"].write_text(str(nets.deploy("mini", nets.mini_resnet_inception_body, data)))
    solver = SOLVER.replace("random_seed: 3", "random_seed: 1")
    files["solver"].write_text(solver.format(net=files["train_val"], lr=0.02, iters=200, prefix=root / "snap" / "mini"))
    files["weights"] = train.train(files["solver"], progress=False)
    return files


def require_opencv(needed_for: str) -> None:
    """Skip the calling test on a Caffe built without OpenCV (tools/install_caffe.sh's brocolli fallback)."""
    if not build.has_opencv():
        pytest.skip(f"this Caffe is built without OpenCV (build stamp: opencv=0): {needed_for}")


def require_bvlc(needed_for: str) -> None:
    """Skip the calling test on a Caffe that is not BVLC's (tools/install_caffe.sh's brocolli fallback)."""
    stamp = build.read_build_stamp()
    if stamp.get("source_kind") != "bvlc":
        pytest.skip(f"this Caffe is not BVLC Caffe (build stamp: source_kind={stamp.get('source_kind')}): {needed_for}")


@pytest.fixture(scope="session")
def caffe_root() -> Path:
    """The root of the Caffe build pycaffe is imported from."""
    return build.caffe_root()
