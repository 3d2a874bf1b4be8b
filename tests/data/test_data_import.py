"""`clipq data`: the stratified split, the Datums as Caffe reads them (BGR, raw or encoded), the mean file,
and the refusals (an existing output, ragged images)."""

from __future__ import annotations

import json

import lmdb
import numpy as np
import pytest
from PIL import Image

from clipq.caffe import build, caffe_io
from clipq.data import data_import, image_sources
from clipq.util.errors import ClipqError
from conftest import require_opencv

RNG = np.random.default_rng(1)


def arrays_source(images: np.ndarray, labels: np.ndarray) -> image_sources.Source:
    examples = [image_sources.Example(f"img{i}", int(label), lambda i=i: images[i]) for i, label in enumerate(labels)]
    return image_sources.Source("npz", examples, [str(c) for c in range(labels.max() + 1)])


def read_lmdb(path) -> list[tuple[np.ndarray, int]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = [caffe_io.datum_to_image(raw) for _, raw in txn.cursor()]
    env.close()
    return items


def test_split_is_stratified_disjoint_complete_and_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    splits = data_import.stratified_split(labels, 0.1, 0.2, seed=3)
    assert sorted(sum(splits.values(), [])) == list(range(100))
    assert [sum(labels[i] == 2 for i in splits["val"]), sum(labels[i] == 2 for i in splits["test"])] == [2, 4]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    assert splits == data_import.stratified_split(labels, 0.1, 0.2, seed=3)
    assert splits != data_import.stratified_split(labels, 0.1, 0.2, seed=4)


def test_split_fractions_must_leave_training_images():
    with pytest.raises(ClipqError, match="together below 1"):
        data_import.stratified_split([0, 1], 0.5, 0.5, 0)


def test_a_class_too_small_for_every_split_is_refused_by_name():
    with pytest.raises(ClipqError, match=r"class 'cat' has 2 image\(s\): too few .* \(3 needed\)"):
        data_import.stratified_split([0] * 10 + [1] * 2, 0.1, 0.1, 0, ["dog", "cat"])
    splits = data_import.stratified_split([0] * 10 + [1] * 2, 0.1, 0, 0, ["dog", "cat"])
    assert sum(i >= 10 for i in splits["val"]) == 1  # without a test split, 2 images are enough


def test_colour_images_are_stored_bgr_and_the_mean_is_the_training_images(tmp_path):
    images = RNG.integers(0, 256, (30, 3, 4, 5), dtype=np.uint8)
    labels = np.arange(30) % 3
    info = data_import.import_images(arrays_source(images, labels), tmp_path / "d",
                                     data_import.ImportSettings(val=0.2, test=0.2), progress=False)
    assert {name: s["count"] for name, s in info["splits"].items()} == {"train": 18, "val": 6, "test": 6}
    stored = {name: read_lmdb(tmp_path / "d" / f"{name}_lmdb") for name in ("train", "val", "test")}
    rgb = {image[::-1].tobytes(): label for split in stored.values() for image, label in split}
    assert rgb == {image.tobytes(): label for image, label in zip(images, labels)}  # every image once, BGR
    train = np.stack([image for image, _ in stored["train"]]).astype(np.float64)
    mean = caffe_io.read_mean(tmp_path / "d" / "mean.binaryproto")
    np.testing.assert_allclose(mean, train.mean(axis=0), rtol=1e-6)
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["channel_order"] == "BGR"


def test_resize_and_grey_conversion_give_one_shape(tmp_path):
    images = RNG.integers(0, 256, (6, 3, 10, 8), dtype=np.uint8)
    settings = data_import.ImportSettings(val=0, test=0.5, resize=(4, 6), color="gray")
    data_import.import_images(arrays_source(images, np.arange(6) % 2), tmp_path / "d", settings, progress=False)
    assert {image.shape for image, _ in read_lmdb(tmp_path / "d" / "train_lmdb")} == {(1, 4, 6)}
    assert not (tmp_path / "d" / "val_lmdb").exists()


def test_ragged_images_are_refused_by_name_and_nothing_is_left(tmp_path):
    images = [np.zeros((1, 8, 8), np.uint8)] * 5 + [np.zeros((1, 9, 8), np.uint8)]
    examples = [image_sources.Example(f"photo{i}.png", 0, lambda i=i: images[i]) for i in range(6)]
    with pytest.raises(ClipqError, match=r"photo5.png: image is 1x9x8 .* first image is 1x8x8.*--resize"):
        data_import.import_images(image_sources.Source("folder", examples, ["a"]), tmp_path / "d",
                                  data_import.ImportSettings(val=0, test=0), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_never_overwritten(tmp_path):
    (tmp_path / "d").mkdir()
    images = np.zeros((3, 1, 2, 2), np.uint8)
    with pytest.raises(ClipqError, match="already exists"):
        data_import.import_images(arrays_source(images, np.zeros(3, int)), tmp_path / "d",
                                  data_import.ImportSettings(), progress=False)


def caffe_batch(source, batch: int) -> np.ndarray:
    """One batch of a real Caffe Data layer on `source`."""
    prototxt = source.parent / "data_layer.prototxt"
    prototxt.write_text(f'layer {{ name: "d" type: "Data" top: "data" top: "label" '
                        f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB }} }}')
    cf = caffe_io.caffe()
    net = cf.Net(str(prototxt), cf.TEST)
    return net.forward()["data"].copy()  # a view into the net, which is freed on return


def test_caffe_reads_raw_and_encoded_datums_as_the_same_pixels(tmp_path):
    images = RNG.integers(0, 256, (8, 3, 6, 6), dtype=np.uint8)
    for encoded in (None, "png"):
        if encoded:
            require_opencv("encoded Datums cannot be decoded")
        out = tmp_path / f"d_{encoded}"
        data_import.import_images(arrays_source(images, np.arange(8) % 2), out,
                                  data_import.ImportSettings(val=0, test=0, encoded=encoded), progress=False)
        stored = [image for image, _ in read_lmdb(out / "train_lmdb")] if not encoded else None
        batch = caffe_batch(out / "train_lmdb", 8)
        expected = {image[::-1].tobytes() for image in images}
        assert {np.uint8(b).tobytes() for b in batch} == expected
        if stored is not None:
            assert {s.tobytes() for s in stored} == expected


def test_a_jpeg_folder_through_convert_imageset_and_through_clipq_data_gives_the_same_images(tmp_path):
    """Caffe's route (list file -> convert_imageset -> compute_image_mean) and `clipq data` on the same JPEGs."""
    import subprocess

    from PIL import Image

    require_opencv("no convert_imageset")
    photos = tmp_path / "photos"
    lines = []
    for i in range(12):
        (photos / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
        name = f"class{i % 3}/{i:02d}.jpg"
        Image.fromarray(RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(photos / name, quality=95)
        lines.append(f"{name} {i % 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    subprocess.run([str(build.tool("convert_imageset")), f"{photos}/", str(tmp_path / "list.txt"),
                    str(tmp_path / "caffe_lmdb")], check=True, capture_output=True)
    subprocess.run([str(build.tool("compute_image_mean")), str(tmp_path / "caffe_lmdb"),
                    str(tmp_path / "caffe_mean.binaryproto")], check=True, capture_output=True)
    data_import.import_images(image_sources.load(photos), tmp_path / "ours",
                              data_import.ImportSettings(val=0, test=0), progress=False)
    theirs = {label: [] for label in range(3)}
    for image, label in read_lmdb(tmp_path / "caffe_lmdb"):
        theirs[label].append(image.astype(int))
    ours = read_lmdb(tmp_path / "ours" / "train_lmdb")
    assert sorted(label for _, label in ours) == sorted(int(line.split()[1]) for line in lines)
    for image, label in ours:  # the same decoder (libjpeg) behind OpenCV and Pillow: equal up to rounding
        assert min(np.abs(image.astype(int) - t).max() for t in theirs[label]) <= 2
    np.testing.assert_allclose(caffe_io.read_mean(tmp_path / "ours" / "mean.binaryproto"),
                               caffe_io.read_mean(tmp_path / "caffe_mean.binaryproto"), atol=2)


def test_an_output_inside_the_input_folder_is_refused_before_anything_is_written(tmp_path, capsys):
    from clipq import cli
    for name in ("a", "b"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "photos" / name / "x.png")
    assert cli.main(["data", str(tmp_path / "photos"), "--out", str(tmp_path / "photos" / "lmdb"),
                     "--no-progress"]) != 0
    assert "inside the input folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["a", "b"]
