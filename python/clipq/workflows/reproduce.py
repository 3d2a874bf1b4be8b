"""`clipq reproduce NET`: the paper's experiments (section 4) on AlexNet, GoogLeNet and ResNet-50.

With ImageNet LMDBs and the model-zoo weights: `clipq compress` with the net's prototxt/<net>/train_val,
the paper's fine-tuning solver (solvers/<net>_clipq_solver.prototxt), its lambda (Tables 1-3 captions:
40, 5, 10) and 50 evaluations per layer; `--paper-plan` uses the paper's (p, b) instead of searching.
The report has top-1 and top-5 on the validation LMDB, and the paper-style table.

`--smoke`: the same stages end to end on synthetic data, on a CPU, in minutes: random JPEGs of assorted
sizes with random labels, made into tiny LMDBs and a mean file the way Caffe's ImageNet example does it
(convert_imageset --resize 256x256, compute_image_mean; random 3x256x256 arrays on a Caffe without OpenCV),
random (filler) weights standing in for the zoo's, batches of 2,
2 evaluations per layer on a 2-image subset, 2 fine-tuning iterations of the real CLIP-Q net through
`caffe train`, export, encode, decode, evaluation. It checks that everything runs, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from clipq.caffe import build, caffe_io
from clipq.data import datasets
from clipq.search.gp import SearchSettings
from clipq.util.atomic import atomic_write
from clipq.util.errors import ClipqError
from clipq.util.lock import output_directory
from clipq.util.paths import REPO
from clipq.workflows import pipeline

NETS = ("alexnet", "googlenet", "resnet50")
TRAIN_LMDB, VAL_LMDB = "ilsvrc12_train_lmdb", "ilsvrc12_val_lmdb"
MEAN_FILE = "imagenet_mean.binaryproto"  # what Caffe's examples/imagenet/make_imagenet_mean.sh writes
SMOKE = {"images": (8, 4), "side": 256, "batch": 2, "evaluations": 2, "subset": 2, "iterations": 2}


def paper_files(net: str) -> tuple[Path, Path, Path, Path]:
    """(train_val, deploy, paper_params.yaml, solver) of a paper net."""
    if net not in NETS:
        raise ClipqError(f"unknown net '{net}'; the paper's nets are {', '.join(NETS)}")
    directory = REPO / "prototxt" / net
    return (directory / "train_val.prototxt", directory / "deploy.prototxt", directory / "paper_params.yaml",
            REPO / "solvers" / f"{net}_clipq_solver.prototxt")


def paper_lambda(params: Path) -> float:
    return float(yaml.safe_load(params.read_text())["lambda"])


def synthetic_imagenet(out: Path, seed: int = 0) -> Path:
    """Tiny train / val LMDBs with random ImageNet labels: from JPEGs through Caffe's own tools when Caffe has
    OpenCV (`jpeg_imagenet`), else random 3x256x256 arrays."""
    if build.has_opencv():
        return jpeg_imagenet(out, seed)
    rng = np.random.default_rng(seed)
    side = SMOKE["side"]
    for name, count in zip((TRAIN_LMDB, VAL_LMDB), SMOKE["images"]):
        if datasets.lmdb_count(out / name) != count:
            images = rng.integers(0, 256, (count, 3, side, side), dtype=np.uint8)
            datasets.write_lmdb(datasets.Split(images, rng.integers(0, 1000, count)), out / name)
    return out


def jpeg_imagenet(out: Path, seed: int = 0) -> Path:
    """ILSVRC-style LMDBs made as Caffe's examples/imagenet/create_imagenet.sh and make_imagenet_mean.sh make
    them: random JPEGs of assorted sizes and a `path label` list per split -> `convert_imageset
    --resize_height 256 --resize_width 256 --shuffle` -> `compute_image_mean` of the training LMDB."""
    rng = np.random.default_rng(seed)
    side = SMOKE["side"]
    for name, count in zip((TRAIN_LMDB, VAL_LMDB), SMOKE["images"]):
        if (out / name).exists():
            continue
        folder = out / "jpeg" / name
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(count):
            height, width = 200 + 37 * i, 330 - 19 * i
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.JPEG", quality=90)
            lines.append(f"{i:04d}.JPEG {rng.integers(0, 1000)}")
        (folder.parent / f"{name}.txt").write_text("\n".join(lines) + "\n")
        build.run_tool("convert_imageset", "--resize_height", str(side), "--resize_width", str(side), "--shuffle",
                       f"{folder}/", str(folder.parent / f"{name}.txt"), output=out / name)
    if not (out / MEAN_FILE).exists():
        build.run_tool("compute_image_mean", str(out / TRAIN_LMDB), output=out / MEAN_FILE)
    return out


def filler_weights(deploy: Path, path: Path) -> Path:
    """The deploy net's filler-initialised weights: the stand-in for model-zoo weights in smoke runs."""
    if not path.exists():
        cf = caffe_io.caffe()
        cf.set_mode_cpu()
        cf.Net(str(deploy), cf.TEST).save(str(path))
    return path


def train_val_for(train_val: Path, imagenet: Path, out: Path, batch: int | None) -> Path:
    """The net's train_val reading `imagenet`'s LMDBs (and with batch size `batch`, if given), and its mean
    file (imagenet_mean.binaryproto) when there is one."""
    for name in (TRAIN_LMDB, VAL_LMDB):
        if not (imagenet / name).exists():
            raise ClipqError(f"{imagenet}: no {name} (the ImageNet LMDBs made by Caffe's create_imagenet.sh)")
    net = caffe_io.read_net_param(train_val)
    train = caffe_io.caffe_pb2().Phase.Value("TRAIN")
    mean = imagenet / MEAN_FILE
    for layer in net.layer:
        if layer.type == "Data":
            is_train = any(rule.phase == train for rule in layer.include)
            layer.data_param.source = str((imagenet / (TRAIN_LMDB if is_train else VAL_LMDB)).resolve())
            if mean.exists():  # the mean image of these LMDBs replaces the paper's per-channel mean values
                layer.transform_param.ClearField("mean_value")
                layer.transform_param.mean_file = str(mean.resolve())
            if batch:
                layer.data_param.batch_size = batch
    path = out / "train_val.prototxt"
    with atomic_write(path) as f:
        f.write(f"# {train_val.relative_to(REPO)} with the data of {imagenet}\n{net}")
    return path


def solver_for(solver: Path, out: Path, smoke: bool) -> Path:
    """The paper solver on this machine's device; for smoke runs, no periodic testing."""
    param = caffe_io.read_text_proto(solver, "SolverParameter", "solver prototxt")
    pb2 = caffe_io.caffe_pb2()
    gpu = caffe_io.set_mode().startswith("gpu")
    param.solver_mode = pb2.SolverParameter.GPU if gpu else pb2.SolverParameter.CPU
    if smoke:
        param.test_interval, param.test_initialization, param.display = 10 ** 9, False, 1
        del param.test_iter[:]
        param.test_iter.append(1)
    path = out / "solver.prototxt"
    with atomic_write(path) as f:
        f.write(f"# {solver.relative_to(REPO)}{' (smoke run)' if smoke else ''}\n{param}")
    return path


def run(net: str, out: Path, imagenet: Path | None = None, weights: Path | None = None, smoke: bool = False,
        paper_plan: bool = False, jobs: int = 1, progress: bool = True, log=print, metric: str = "error",
        aids: pipeline.Aids = pipeline.Aids(), **budget) -> dict:
    """Reproduce one of the paper's nets (or its smoke run); returns the `clipq compress` report.

    `budget`: the held-out options of `CompressConfig` (val, search_on, max_drop, rounds, se_margin) and
    its Ray executor's (ray, ray_batch).
    The paper searched on a training subset, which stays the default without `val`, and measured the top-1
    error (`metric`)."""
    train_val, deploy, params, solver = paper_files(net)
    out = Path(out)
    with output_directory(out, log):  # held across pipeline.run, which takes it again
        if smoke:
            imagenet = synthetic_imagenet(out / "synthetic_imagenet")
            weights = filler_weights(deploy, out / "filler_weights.caffemodel")
            settings = SearchSettings(lam=paper_lambda(params), iterations=SMOKE["evaluations"],
                                      initial=SMOKE["evaluations"], subset=SMOKE["subset"], metric=metric)
        elif imagenet is None or weights is None:
            raise ClipqError("give --imagenet (the ILSVRC-2012 LMDBs) and --weights (the zoo caffemodel), or --smoke")
        else:
            settings = SearchSettings(lam=paper_lambda(params), metric=metric)
        model = train_val_for(train_val, Path(imagenet), out, SMOKE["batch"] if smoke else None)
        config = pipeline.CompressConfig(model, Path(weights), solver_for(solver, out, smoke), out,
                                         plan=params if paper_plan else None, settings=settings, jobs=jobs,
                                         max_iter=SMOKE["iterations"] if smoke else None, progress=progress,
                                         synthetic=smoke, aids=aids, **budget)
        return pipeline.run(config, log)
