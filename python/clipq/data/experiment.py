"""`clipq init`: a deploy prototxt + a directory of LMDBs -> a runnable experiment, with no hand edits.

The data directory is one `clipq data` made (dataset.json), or one holding Caffe's own train_lmdb /
val_lmdb / test_lmdb (e.g. from `convert_imageset`), with mean.binaryproto if `compute_image_mean` made one.
Written into the experiment directory, with absolute paths so that it runs from anywhere:

- train_val.prototxt: the deploy's layers (names kept, so its caffemodel loads) behind TRAIN / TEST Data
  layers with the transform the deploy's input needs (crop to its size, scale or mean), then
  SoftmaxWithLoss and TEST Accuracy top-1 (and top-5); TEST reads the test LMDB;
- solver.prototxt: the baseline's training (Caffe's LeNet schedule: SGD, "inv" policy), tested once at the end;
- clipq_solver.prototxt: the fine-tuning `clipq compress` runs (the paper's style: base_lr 0.001, x0.1 steps);
- experiment.json: what `clipq compress --experiment` / `clipq zoo --experiment` read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from clipq.caffe import caffe_io, preflight
from clipq.data import data_import
from clipq.util.atomic import atomic_dir
from clipq.util.errors import ClipqError
from clipq.util.json_file import read_object
from clipq.util.lock import new_output

EXPERIMENT_FILE = "experiment.json"
BASELINE = "baseline.caffemodel"
LENET_SCALE = 0.00390625  # 1/256, Caffe's MNIST examples
MAX_TEST_BATCH = 100


@dataclass(frozen=True)
class DataDir:
    """What an experiment needs to know of its data directory."""

    path: Path
    shape: tuple[int, int, int]      # (C, H, W) of the stored images
    counts: dict[str, int]           # split -> images ("train", "val", "test")
    classes: int                     # the classes of dataset.json, else the largest label + 1
    mean: Path | None

    def lmdb(self, split: str) -> Path | None:
        return (self.path / data_import.lmdb_name(split)).resolve() if split in self.counts else None


@dataclass(frozen=True)
class InitSettings:
    batch: int = 64
    epochs: float = 20.0              # baseline training
    min_iter: int = 1000              # at least this many iterations, baseline and fine-tuning
    finetune_epochs: float = 5.0
    scale: float | None = None        # None: 1/256 for grey images, none for colour
    mean: str = "auto"                # "auto" (colour: the mean file), "file", "none"
    mirror: bool = False


def read_data_dir(path: Path) -> DataDir:
    """The splits, image shape, classes and mean of a data directory (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise ClipqError(f"{path}: no such directory (--data: the output of `clipq data`, or a directory with "
                         f"train_lmdb, val_lmdb, test_lmdb)")
    counts = {split: caffe_io.lmdb_entries(path / data_import.lmdb_name(split), f"{split} LMDB")
              for split in data_import.SPLIT_NAMES if (path / data_import.lmdb_name(split)).is_dir()}
    for split in ("train", "test"):
        if split not in counts:
            raise ClipqError(f"{path}: no {data_import.lmdb_name(split)} (needed: train_lmdb and test_lmdb; "
                             f"val_lmdb for the accuracy budget)")
    shape = preflight.first_datum(path / "train_lmdb", "--data")
    if shape is None:
        raise ClipqError(f"{path / 'train_lmdb'}: cannot read the image size of its first Datum")
    classes = label_classes(path, counts)
    mean = path / data_import.MEAN_FILE
    return DataDir(path.resolve(), shape, counts, classes, mean.resolve() if mean.exists() else None)


def label_classes(path: Path, counts: dict[str, int]) -> int:
    """How many classes the net must output: the labels of every split are read once (Caffe's losses index
    their scores with them, unchecked on the CPU), and a dataset.json that lists fewer classes is refused."""
    description = path / data_import.DATASET_FILE
    listed = len(data_import.read_description(path)["classes"]) if description.exists() else None
    high = None
    for split in counts:
        lmdb_path = path / data_import.lmdb_name(split)
        found = caffe_io.labels(lmdb_path, f"{split} LMDB")
        if found is None:
            continue  # too large to read here: dataset.json says
        if min(found) < 0:
            raise ClipqError(f"{lmdb_path}: label {min(found)}; labels must be 0, 1, 2, ...")
        high = max(found) if high is None else max(high, max(found))
    if listed is not None and high is not None and listed <= high:
        raise ClipqError(f"{description}: lists {listed} classes, but the LMDBs have labels up to {high}; fix its "
                         "'classes' (or re-import with `clipq data`)")
    if listed is None and high is None:
        raise ClipqError(f"{path}: LMDBs larger than {caffe_io.LABEL_SCAN_BYTES >> 30} GB and no "
                         f"{data_import.DATASET_FILE}; write one listing the classes (see docs/own_data.md)")
    return listed if listed is not None else high + 1


def test_batch(count: int) -> int:
    """The largest batch <= 100 that divides `count`, so that test_iter x batch covers the set exactly once."""
    return max(b for b in range(1, min(count, MAX_TEST_BATCH) + 1) if count % b == 0)


def train_val(deploy: Path, data: DataDir, settings: InitSettings) -> tuple[object, list[str]]:
    """The train_val NetParameter for `deploy` on `data`, and notes on what was decided."""
    net = preflight.net(deploy, "--deploy")
    if len(net.layers):
        raise ClipqError(f"{deploy}: old V1 format (`layers {{`); upgrade it first with "
                         f".venv/bin/upgrade_net_proto_text {deploy} NEW.prototxt")
    notes: list[str] = []
    input_name, input_shape = _single_input(net, deploy)
    _drop_inputs(net)
    _check_names(net, deploy)
    logits = _drop_output_softmax(net)
    _check_logits(net, logits, deploy)
    _set_classes(net, logits, data.classes, deploy, notes)
    for layer in net.layer:
        if layer.type == "BatchNorm":
            layer.batch_norm_param.ClearField("use_global_stats")  # deploy's True would freeze the statistics
    transform = _transform(input_shape, data, settings, notes)
    layers = list(net.layer)
    del net.layer[:]
    for phase, split, batch in (("TRAIN", "train", settings.batch), ("TEST", "test", test_batch(data.counts["test"]))):
        _data_layer(net.layer.add(), phase, input_name, data.lmdb(split), batch, transform, settings.mirror)
    net.layer.extend(layers)
    _heads(net, logits, data.classes)
    return net, notes


def _single_input(net, deploy: Path) -> tuple[str, tuple[int, ...]]:
    inputs = preflight.input_shapes(net)
    if len(inputs) != 1:
        raise ClipqError(f"{deploy}: expected one input blob (an Input layer or `input:`), found "
                         f"{len(inputs)}: {', '.join(inputs) or 'none'}")
    name, shape = next(iter(inputs.items()))
    if len(shape) != 4:
        raise ClipqError(f"{deploy}: input '{name}' has shape {shape}; expected N x C x H x W")
    return name, shape


def _drop_inputs(net) -> None:
    for field in ("input", "input_shape", "input_dim"):
        net.ClearField(field)
    kept = [layer for layer in net.layer if layer.type != "Input"]
    del net.layer[:]
    net.layer.extend(kept)


ADDED_LAYERS = ("data", "data_test", "accuracy", "accuracy_top5", "loss")  # the names init gives its layers
ADDED_BLOBS = ("label", "accuracy", "accuracy_top5", "loss")


def _check_names(net, deploy: Path) -> None:
    """The deploy's layers and blobs must not take the names init adds (Caffe aborts on a duplicate)."""
    if not net.layer:
        raise ClipqError(f"{deploy}: no layers besides its input: nothing to train")
    for layer in net.layer:
        if layer.name in ADDED_LAYERS:
            raise ClipqError(f"{deploy}: layer '{layer.name}' has a name clipq init gives its own layers "
                             f"({', '.join(ADDED_LAYERS)}); rename it")
        clash = next((top for top in layer.top if top in ADDED_BLOBS), None)
        if clash is not None:
            raise ClipqError(f"{deploy}: layer '{layer.name}' makes a blob named '{clash}', a name clipq init gives "
                             f"its own blobs ({', '.join(ADDED_BLOBS)}); rename it")


def _check_logits(net, logits: str, deploy: Path) -> None:
    """The net must end in class scores that a loss can train (not in an input, class indices or nothing)."""
    producer = next((layer for layer in reversed(net.layer) if logits in layer.top), None)
    if producer is None:
        raise ClipqError(f"{deploy}: no layer between the input and the output Softmax: nothing to train")
    if producer.type in ("ArgMax", "Accuracy", "Silence") or producer.type.endswith("Loss"):
        raise ClipqError(f"{deploy}: the net ends in layer '{producer.name}' ({producer.type}); clipq init needs it to "
                         "end in the class scores (remove that layer)")


def _drop_output_softmax(net) -> str:
    """Remove a final Softmax (the deploy's probabilities); returns the logits blob the losses read."""
    last = net.layer[-1]
    consumed = {b for layer in net.layer for b in layer.bottom}
    if last.type == "Softmax" and last.top[0] not in consumed:
        del net.layer[-1]
        return last.bottom[0]
    return last.top[0]


def _check_scores(net, shapes: dict, classes: int, deploy: Path) -> None:
    """The loss's scores have a channel per class (labels past them: Caffe's CPU loss reads and writes out of
    bounds, and crashes or reports nonsense)."""
    loss = next(layer for layer in net.layer if layer.type == "SoftmaxWithLoss")
    shape = shapes.get(loss.bottom[0])
    if shape is not None and (len(shape) < 2 or shape[1] < classes):
        raise ClipqError(f"{deploy}: its output '{loss.bottom[0]}' has {shape[1] if len(shape) > 1 else 1} value(s) "
                         f"per image, but the data has {classes} classes; end the net in a layer with {classes} "
                         "outputs (an InnerProduct is resized by itself)")


def _set_classes(net, logits: str, classes: int, deploy: Path, notes: list[str]) -> None:
    """A last InnerProduct with another number of outputs than the data has classes gets a new name (so that
    Caffe does not copy the deploy's weights into it) and the data's number of outputs."""
    producer = next((layer for layer in reversed(net.layer) if logits in layer.top), None)
    if producer is None or producer.type != "InnerProduct":
        return
    if producer.inner_product_param.num_output != classes:
        old, producer.name = producer.name, f"{producer.name}_{classes}cls"
        notes.append(f"layer '{old}' has {producer.inner_product_param.num_output} outputs, the data {classes} "
                     f"classes: it becomes '{producer.name}' with {classes} outputs (learned from scratch)")
        producer.inner_product_param.num_output = classes


def _transform(input_shape, data: DataDir, settings: InitSettings, notes: list[str]) -> dict:
    channels, height, width = data.shape
    want_c, want_h, want_w = input_shape[1:]
    if channels != want_c:
        kind = "--color" if want_c == 3 else "--gray"
        raise ClipqError(f"{data.path}: images have {channels} channel(s), the deploy's input {want_c}; "
                         f"make the data again with `clipq data ... {kind}`")
    transform: dict = {}
    if (height, width) != (want_h, want_w):
        if height >= want_h and width >= want_w and want_h == want_w:
            transform["crop_size"] = want_h
            notes.append(f"images {height}x{width} are cropped to the deploy's {want_h}x{want_w} "
                         f"(random crops in TRAIN, the centre in TEST)")
        else:
            notes.append(f"images are {height}x{width}, the deploy's input {want_h}x{want_w}: the net is built "
                         f"for the images' size (or make the data with `clipq data ... --resize {want_h} {want_w}`)")
    scale = settings.scale if settings.scale is not None else (LENET_SCALE if channels == 1 else None)
    if scale is not None:
        transform["scale"] = scale
    use_mean = settings.mean == "file" or (settings.mean == "auto" and channels == 3)
    if use_mean:
        if data.mean is None:
            raise ClipqError(f"{data.path}: no {data_import.MEAN_FILE} (make one with compute_image_mean), "
                             f"or give --mean none")
        mean = caffe_io.read_mean(data.mean)  # Caffe aborts on a damaged one, or one of another size
        if mean.shape != tuple(data.shape):
            raise ClipqError(f"{data.mean}: a mean of {'x'.join(map(str, mean.shape))}, but the images are "
                             f"{'x'.join(map(str, data.shape))}; remake it with compute_image_mean")
        transform["mean_file"] = str(data.mean)
    notes.append("input transform: " + (", ".join(f"{k} {v}" for k, v in transform.items()) or "none"))
    return transform


def _data_layer(layer, phase: str, top: str, source: Path, batch: int, transform: dict, mirror: bool) -> None:
    pb2 = caffe_io.caffe_pb2()
    layer.name, layer.type = ("data" if phase == "TRAIN" else "data_test"), "Data"
    layer.top.extend([top, "label"])
    layer.include.add().phase = pb2.Phase.Value(phase)
    for key, value in transform.items():
        setattr(layer.transform_param, key, value)
    if mirror and phase == "TRAIN":
        layer.transform_param.mirror = True
    layer.data_param.source, layer.data_param.batch_size = str(source), batch
    layer.data_param.backend = pb2.DataParameter.LMDB


def _heads(net, logits: str, classes: int) -> None:
    test = caffe_io.caffe_pb2().Phase.Value("TEST")
    heads = [("accuracy", 1)] + ([("accuracy_top5", 5)] if classes > 5 else [])
    for name, k in heads:
        layer = net.layer.add(name=name, type="Accuracy", bottom=[logits, "label"], top=[name])
        layer.include.add().phase = test
        if k != 1:
            layer.accuracy_param.top_k = k
    net.layer.add(name="loss", type="SoftmaxWithLoss", bottom=[logits, "label"], top=["loss"])


def iterations(epochs: float, count: int, batch: int, floor: int) -> int:
    """Iterations for `epochs` passes over `count` images, at least `floor`."""
    return max(floor, math.ceil(epochs * count / batch))


def baseline_solver(net: Path, data: DataDir, settings: InitSettings, out: Path) -> str:
    """Caffe's LeNet schedule (SGD, "inv" policy), tested once, at the end."""
    max_iter = iterations(settings.epochs, data.counts["train"], settings.batch, settings.min_iter)
    return _solver_text(f"# The baseline: Caffe's LeNet schedule, {max_iter} iterations of batch {settings.batch} "
                        f"(~{max_iter * settings.batch / data.counts['train']:.0f} epochs), tested on the test "
                        f"set once, at the end (written by `clipq init`)", _common(net, data, max_iter, out, "baseline")
                        | {"test_interval": max_iter, "test_initialization": False, "base_lr": 0.01,
                           "lr_policy": "inv", "gamma": 0.0001, "power": 0.75, "display": max(1, max_iter // 20),
                           "snapshot": max(1, max_iter // 4)})


def clipq_solver(net: Path, data: DataDir, settings: InitSettings, out: Path) -> str:
    """The paper's fine-tuning style: base_lr 0.001, x0.1 after two thirds."""
    max_iter = iterations(settings.finetune_epochs, data.counts["train"], settings.batch, settings.min_iter)
    return _solver_text(f"# CLIP-Q fine-tuning for `clipq compress` (which replaces net and snapshot_prefix and "
                        f"tests on the validation LMDB): base_lr 0.001, x0.1 after 2/3, {max_iter} iterations "
                        f"(written by `clipq init`)", _common(net, data, max_iter, out, "clipq")
                        | {"test_interval": max(1, max_iter // 3), "base_lr": 0.001, "lr_policy": "step",
                           "gamma": 0.1, "stepsize": max(1, 2 * max_iter // 3), "display": max(1, max_iter // 10),
                           "snapshot": max(1, max_iter // 3)})


def _common(net: Path, data: DataDir, max_iter: int, out: Path, prefix: str) -> dict:
    """Solver fields both solvers share."""
    return {"net": str(net), "test_iter": data.counts["test"] // test_batch(data.counts["test"]),
            "momentum": 0.9, "weight_decay": 0.0005, "max_iter": max_iter,
            "snapshot_prefix": str(out / "snapshots" / prefix), "solver_mode": "CPU", "random_seed": 1}


def _solver_text(header: str, fields: dict) -> str:
    pb2 = caffe_io.caffe_pb2()
    param = pb2.SolverParameter()
    for key, value in fields.items():
        if key == "test_iter":
            param.test_iter.append(value)
        elif key == "solver_mode":
            param.solver_mode = pb2.SolverParameter.SolverMode.Value(value)
        else:
            setattr(param, key, value)
    return f"{header}\n{param}"


def init(deploy: Path, data_path: Path, out: Path, settings: InitSettings = InitSettings()) -> tuple[dict, list[str]]:
    """Write the experiment (see the module docstring) into the new directory `out`; returns experiment.json's
    content and the notes on what was decided."""
    with new_output(out, "init"):
        return _init(Path(deploy), Path(data_path), Path(out), settings)


def _init(deploy: Path, data_path: Path, out: Path, settings: InitSettings) -> tuple[dict, list[str]]:
    data = read_data_dir(data_path)
    net, notes = train_val(Path(deploy), data, settings)
    out = out.resolve()
    experiment = {"version": 1, "deploy": str(Path(deploy).resolve()), "data": str(data.path),
                  "train_val": str(out / "train_val.prototxt"), "solver": str(out / "solver.prototxt"),
                  "clipq_solver": str(out / "clipq_solver.prototxt"), "weights": str(out / BASELINE),
                  "val_lmdb": str(data.lmdb("val")) if data.lmdb("val") else None,
                  "test_lmdb": str(data.lmdb("test")), "counts": data.counts}
    try:  # e.g. 8x8 images into LeNet-5: one clear error now, not a Caffe abort later
        shapes = preflight.blob_shapes(net, deploy, "TRAIN", labels=False)  # _check_scores says it for init
    except ClipqError as e:
        raise ClipqError(f"{e}; with the images of {data.path} ({'x'.join(map(str, data.shape))}): make them "
                         f"larger with `clipq data ... --resize H W`") from None
    _check_scores(net, shapes, data.classes, deploy)
    with atomic_dir(out, replace=False) as tmp:
        (tmp / "train_val.prototxt").write_text(f"# {deploy} on the LMDBs of {data.path} (written by `clipq init`)\n"
                                                f"{net}")
        (tmp / "solver.prototxt").write_text(baseline_solver(out / "train_val.prototxt", data, settings, out))
        (tmp / "clipq_solver.prototxt").write_text(clipq_solver(out / "train_val.prototxt", data, settings, out))
        (tmp / EXPERIMENT_FILE).write_text(json.dumps(experiment, indent=2) + "\n")
    return experiment, notes


def read_experiment(directory: Path) -> dict:
    """experiment.json of a `clipq init` directory (the fields clipq reads checked)."""
    path = Path(directory) / EXPERIMENT_FILE
    return read_object(path, {"train_val": str, "solver": str, "clipq_solver": str, "weights": str,
                              "val_lmdb": (str, type(None))},
                       f"{directory}: no {EXPERIMENT_FILE} (--experiment: a directory made by `clipq init`)")
