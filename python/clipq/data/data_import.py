"""`clipq data`: a user's labelled images (`image_sources`) -> train / val / test Datum LMDBs, the training
images' mean as `mean.binaryproto`, and `dataset.json` (shape, classes, splits) -- what Caffe's
`convert_imageset` + `compute_image_mean` make, from any of the inputs people have, in one step.

The split is stratified and seeded (every class in the same proportions in every split). Colour images are
stored as Caffe stores them: channels in BGR order (OpenCV's), raw or encoded (PNG / JPEG bytes that Caffe's
Data layer decodes, which needs a Caffe built with OpenCV). The output directory is written under a temporary
name and renamed when complete; an existing one is never overwritten.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import lmdb
import numpy as np
from PIL import Image
from tqdm import tqdm

from clipq.caffe import caffe_io
from clipq.data import datasets
from clipq.data.image_sources import MAX_PIXELS, Example, Source
from clipq.util.atomic import atomic_dir
from clipq.util.errors import ClipqError
from clipq.util.json_file import read_object
from clipq.util.lock import new_output

DATASET_FILE = "dataset.json"
MEAN_FILE = "mean.binaryproto"
SPLIT_NAMES = ("train", "val", "test")
ENCODINGS = {"png": "PNG", "jpg": "JPEG"}
COMMIT_EVERY = 1000


@dataclass(frozen=True)
class ImportSettings:
    val: float = 0.1                            # fraction of each class held out for validation
    test: float = 0.2                           # fraction of each class kept for the final test
    seed: int = 0
    resize: tuple[int, int] | None = None       # (height, width)
    color: str = "keep"                         # "keep", "gray" or "color"
    encoded: str | None = None                  # None (raw pixels), "png" or "jpg"


def lmdb_name(split: str) -> str:
    return f"{split}_lmdb"


def check_settings(settings: ImportSettings) -> None:
    if settings.resize is not None and settings.resize[0] * settings.resize[1] > MAX_PIXELS:
        height, width = settings.resize
        raise ClipqError(f"--resize {height} {width}: {height * width:,} pixels, more than the {MAX_PIXELS:,} an image "
                         "may have")


def stratified_split(labels: list[int], val: float, test: float, seed: int,
                     classes: list[str] | None = None) -> dict[str, list[int]]:
    """Indices of train / val / test: per class, shuffled with `seed`, round(n * fraction) to val and test
    (at least one each when the fraction is positive). A class too small to give every split an image is
    refused, naming it (`classes`: the names, index = label), rather than left out of val or test unsaid."""
    if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
        raise ClipqError(f"--val {val:g} and --test {test:g}: each must be in [0, 1) and together below 1")
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    splits: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    needed = 1 + (val > 0) + (test > 0)
    for label in np.unique(labels_array):
        members = rng.permutation(np.flatnonzero(labels_array == label))
        if len(members) < needed:
            name = classes[label] if classes is not None else str(label)
            raise ClipqError(f"class {name!r} has {len(members)} image(s): too few to give training, --val {val:g} "
                             f"and --test {test:g} one each ({needed} needed); add images, drop the class, or give "
                             "--val 0 / --test 0")
        counts = [_share(len(members), fraction) for fraction in (val, test)]
        splits["val"] += members[:counts[0]].tolist()
        splits["test"] += members[counts[0]:counts[0] + counts[1]].tolist()
        splits["train"] += members[counts[0] + counts[1]:].tolist()
    return {name: rng.permutation(np.asarray(idx, dtype=np.int64)).tolist() for name, idx in splits.items()}


def _share(n: int, fraction: float) -> int:
    share = int(round(n * fraction))
    return max(share, 1) if fraction > 0 else share


def prepare(image: np.ndarray, settings: ImportSettings) -> np.ndarray:
    """The (C, H, W) uint8 image as stored (before the BGR swap): resized, made grey or colour."""
    channels = {"keep": image.shape[0], "gray": 1, "color": 3}[settings.color]
    if settings.resize is None and channels == image.shape[0]:
        return image
    pil = _pil(image).convert("L" if channels == 1 else "RGB")
    if settings.resize is not None:
        height, width = settings.resize
        pil = pil.resize((width, height), Image.BILINEAR)
    array = np.asarray(pil)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def to_datum(image: np.ndarray, label: int, encoded: str | None) -> bytes:
    """A Datum as Caffe's convert_imageset writes it: BGR channel order, raw or encoded bytes."""
    if not encoded:
        return caffe_io.image_to_datum(np.ascontiguousarray(image[::-1]), label)
    buffer = io.BytesIO()
    _pil(image).save(buffer, ENCODINGS[encoded], **({"quality": 95} if encoded == "jpg" else {}))
    datum = caffe_io.caffe_pb2().Datum(channels=image.shape[0], height=image.shape[1], width=image.shape[2],
                                       data=buffer.getvalue(), label=label, encoded=True)
    return datum.SerializeToString()


def _pil(image: np.ndarray):
    """A (C, H, W) uint8 image as a Pillow image (grey or RGB)."""
    return Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def write_mean(mean: np.ndarray, path: Path) -> None:
    """`mean.binaryproto` as compute_image_mean writes it: a 1 x C x H x W BlobProto (legacy dims)."""
    blob = caffe_io.caffe_pb2().BlobProto(num=1, channels=mean.shape[0], height=mean.shape[1], width=mean.shape[2])
    blob.data.extend(mean.astype(np.float32).ravel().tolist())
    path.write_bytes(blob.SerializeToString())


def import_images(source: Source, out: Path, settings: ImportSettings, origin: str = "",
                  progress: bool = True) -> dict:
    """Write the LMDBs, the mean and dataset.json of `source` into the new directory `out`; returns the
    dataset.json content."""
    check_settings(settings)
    with new_output(out, "data"):
        return _import_images(source, out, settings, origin, progress)


def _import_images(source: Source, out: Path, settings: ImportSettings, origin: str, progress: bool) -> dict:
    if not source.examples:
        raise ClipqError(f"{origin or source.kind}: no images")
    splits = stratified_split([e.label for e in source.examples], settings.val, settings.test, settings.seed,
                              source.classes)
    first = prepare(_load(source.examples[0]), settings)
    shape = first.shape
    counts, mean = {}, np.zeros(shape, np.float64)
    with atomic_dir(out, replace=False) as tmp, _bar(len(source.examples), progress) as bar:
        for name in SPLIT_NAMES:
            if not splits[name]:
                continue
            images = _checked_images([source.examples[i] for i in splits[name]], settings, shape, bar.update)
            counts[name] = _write_split(images, tmp / lmdb_name(name), settings.encoded,
                                        mean if name == "train" else None)
        if "train" not in counts:
            raise ClipqError(f"{origin}: no training images left after --val {settings.val:g} --test {settings.test:g}")
        write_mean((mean / counts["train"])[::-1], tmp / MEAN_FILE)  # BGR, as the Datums
        description = _description(source, settings, shape, counts, splits, origin)
        (tmp / DATASET_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return description


def _load(example: Example) -> np.ndarray:
    image = example.load()
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3) or min(image.shape) == 0:
        raise ClipqError(f"{example.origin}: image of shape {image.shape} ({image.dtype}); expected 1 or 3 channels")
    return image


def _checked_images(examples: list[Example], settings: ImportSettings, shape: tuple[int, ...],
                    advance: Callable[[int], object]) -> Iterator[tuple[np.ndarray, int]]:
    """(image, label) pairs, each of `shape` (images of other sizes are an error naming the file)."""
    for example in examples:
        image = prepare(_load(example), settings)
        if image.shape != shape:
            hint = "give --resize H W" if image.shape[1:] != shape[1:] else "give --gray or --color"
            raise ClipqError(f"{example.origin}: image is {_fmt(image.shape)} (C x H x W), but the first image is "
                             f"{_fmt(shape)}; all images must have one shape ({hint})")
        advance(1)
        yield image, example.label


def _write_split(images: Iterator[tuple[np.ndarray, int]], path: Path, encoded: str | None,
                 mean_sum: np.ndarray | None) -> int:
    """Write the Datums in the order given (adding each image to `mean_sum`, if given); returns the count."""
    env = lmdb.open(str(path), map_size=1 << 40, subdir=True)
    count = 0
    try:
        txn = env.begin(write=True)
        for image, label in images:
            if mean_sum is not None:
                mean_sum += image
            txn.put(b"%08d" % count, to_datum(image, label, encoded))
            count += 1
            if count % COMMIT_EVERY == 0:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
    finally:
        env.close()
    (path / datasets.DONE_FILE).write_text(json.dumps({"count": count}))
    return count


def _description(source: Source, settings: ImportSettings, shape, counts, splits, origin: str) -> dict:
    labels = np.array([e.label for e in source.examples])
    return {
        "version": 1,
        "source": origin, "kind": source.kind,
        "channels": shape[0], "height": shape[1], "width": shape[2],
        "channel_order": "BGR" if shape[0] == 3 else "gray",
        "encoded": settings.encoded,
        "classes": source.classes,
        "splits": {name: {"lmdb": lmdb_name(name), "count": counts[name],
                          "per_class": np.bincount(labels[splits[name]], minlength=len(source.classes)).tolist()}
                   for name in counts},
        "mean": MEAN_FILE,
        "seed": settings.seed, "val_fraction": settings.val, "test_fraction": settings.test,
        "resize": list(settings.resize) if settings.resize else None,
    }


def _bar(total: int, enabled: bool):
    return tqdm(total=total, unit="img", desc="clipq data", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def _fmt(shape) -> str:
    return "x".join(map(str, shape))


def read_description(directory: Path) -> dict:
    """dataset.json of a `clipq data` directory (the fields clipq reads checked)."""
    path = Path(directory) / DATASET_FILE
    data = read_object(path, {"classes": list}, f"{directory}: no {DATASET_FILE} (not made by `clipq data`)")
    if not data["classes"] or not all(isinstance(c, str) for c in data["classes"]):
        raise ClipqError(f"{path}: field 'classes' must list the class names (strings)")
    return data


