"""Every input kind of `clipq data` read into the same examples, and each malformed input refused by name."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from clipq.data import image_sources
from clipq.util.errors import ClipqError

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (12, 6, 6), dtype=np.uint8)
LABELS = np.arange(12) % 3


def loaded(source) -> tuple[np.ndarray, list[int]]:
    return np.stack([e.load() for e in source.examples]), [e.label for e in source.examples]


def assert_same(source, images=IMAGES[:, None], labels=LABELS):
    got, got_labels = loaded(source)
    np.testing.assert_array_equal(got, images)
    assert got_labels == list(labels)


def test_npz_and_npy_pair_give_the_images_and_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x=IMAGES, y=LABELS)
    assert_same(image_sources.load(tmp_path / "d.npz"))
    np.save(tmp_path / "x.npy", IMAGES)
    np.save(tmp_path / "y.npy", LABELS)
    assert_same(image_sources.load(tmp_path / "x.npy", labels=tmp_path / "y.npy"))


def test_channels_last_colour_arrays_become_chw(tmp_path):
    hwc = RNG.integers(0, 256, (4, 5, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "c.npz", images=hwc, labels=np.zeros(4, int))
    got, _ = loaded(image_sources.load(tmp_path / "c.npz"))
    np.testing.assert_array_equal(got, hwc.transpose(0, 3, 1, 2))


def test_float_images_in_unit_range_are_scaled_to_bytes():
    got = image_sources.to_chw(np.array([[[0.0, 1.0], [0.5, 0.25]]]), "x")
    np.testing.assert_array_equal(got[0, 0], [[0, 255], [128, 64]])


def test_csv_with_header_label_first_or_last(tmp_path):
    rows = [[int(label)] + image.ravel().tolist() for image, label in zip(IMAGES, LABELS)]
    first = tmp_path / "first.csv"
    first.write_text("label," + ",".join(f"p{i}" for i in range(36)) + "\n"
                     + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    assert_same(image_sources.load(first))
    last = tmp_path / "last.csv.gz"
    with gzip.open(last, "wt") as f:
        f.write("\n".join(",".join(map(str, r[1:] + r[:1])) for r in rows))
    assert_same(image_sources.load(last, label_column="last"))


def test_a_csv_header_of_column_numbers_is_skipped_not_imported(tmp_path):
    rows = [[int(label)] + image.ravel().tolist() for image, label in zip(IMAGES, LABELS)]
    path = tmp_path / "numbered.csv"
    path.write_text(",".join(map(str, range(37))) + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    assert_same(image_sources.load(path))


def test_integer_pixels_of_only_0_and_1_are_refused_not_scaled(tmp_path):
    path = tmp_path / "binary.csv"
    path.write_text("1,0,1,1,0\n0,1,0,0,1\n")
    with pytest.raises(ClipqError, match=r"binary.csv.*every pixel is the integer 0 or 1"):
        image_sources.load(path)
    (tmp_path / "unit.csv").write_text("1,0.0,1.0,1.0,0.0\n0,1.0,0.0,0.0,1.0\n")
    _, images = zip(*[(e.label, e.load()) for e in image_sources.load(tmp_path / "unit.csv").examples])
    assert images[0].ravel().tolist() == [0, 255, 255, 0]


def test_csv_names_as_labels_are_numbered_in_sorted_order(tmp_path):
    path = tmp_path / "names.csv"
    path.write_text("dog,1,2,3,4\ncat,5,6,7,8\ndog,0,0,0,0\n")
    source = image_sources.load(path)
    assert source.classes == ["cat", "dog"]
    assert [e.label for e in source.examples] == [1, 0, 1]


@pytest.mark.parametrize("text, message", [
    ("1,2,3,4,5\n2,3,4\n", "first row has 4"),
    ("1,2,x,4,5\n", "not a number"),
    (",2,3,4,5\n", "missing label"),
    ("1,2,3\n", "not a square"),
])
def test_csv_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ClipqError, match=message):
        image_sources.load(path)


def test_idx_files_gzipped_or_not(tmp_path):
    header = b"\0\0\x08\x03" + np.array([12, 6, 6], ">u4").tobytes()
    (tmp_path / "images-idx3-ubyte").write_bytes(header + IMAGES.tobytes())
    with gzip.open(tmp_path / "labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\0\0\x08\x01" + np.array([12], ">u4").tobytes() + LABELS.astype(np.uint8).tobytes())
    assert_same(image_sources.load(tmp_path / "images-idx3-ubyte", labels=tmp_path / "labels-idx1-ubyte.gz"))
    (tmp_path / "short-idx3-ubyte").write_bytes(header + IMAGES.tobytes()[:-1])
    with pytest.raises(ClipqError, match="truncated"):
        image_sources.read_idx(tmp_path / "short-idx3-ubyte")


def write_folder(root, size=(6, 6)):
    for i, (image, label) in enumerate(zip(IMAGES, LABELS)):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize(size).save(root / f"class{label}" / f"{i:02d}.png")


def test_folder_classes_are_sorted_subfolders(tmp_path):
    write_folder(tmp_path / "photos")
    source = image_sources.load(tmp_path / "photos")
    assert source.classes == ["class0", "class1", "class2"]
    images, labels = loaded(source)
    order = sorted(range(12), key=lambda i: (LABELS[i], i))
    np.testing.assert_array_equal(images, IMAGES[order][:, None])
    assert labels == sorted(LABELS.tolist())


def test_list_file_paths_relative_to_root(tmp_path):
    write_folder(tmp_path / "photos")
    lines = [f"class{label}/{i:02d}.png {label}" for i, label in enumerate(LABELS)]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    assert_same(image_sources.load(tmp_path / "list.txt", root=tmp_path / "photos"))


def test_unreadable_image_and_bad_list_line_are_named(tmp_path):
    write_folder(tmp_path / "photos")
    (tmp_path / "photos" / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
    source = image_sources.load(tmp_path / "photos")
    broken = next(e for e in source.examples if e.origin.endswith("broken.jpg"))
    with pytest.raises(ClipqError, match="broken.jpg: not a readable image"):
        broken.load()
    (tmp_path / "list.txt").write_text("a.png 1\nb.png\n")
    with pytest.raises(ClipqError, match=r"list.txt:2: expected 'relative/path LABEL'"):
        image_sources.load(tmp_path / "list.txt")


def test_labels_must_match_the_images(tmp_path):
    np.savez(tmp_path / "d.npz", images=IMAGES, labels=LABELS[:-1])
    with pytest.raises(ClipqError, match="11,.*labels for 12 images"):
        image_sources.load(tmp_path / "d.npz")
    with pytest.raises(ClipqError, match="give their labels with --labels"):
        image_sources.load(tmp_path / "d.npz", kind="npy")


@pytest.mark.parametrize("labels, message", [
    (["0", "1", "1.5"], r"label '1.5' \(#3\) is not a whole number >= 0;"),
    (["0", "nan", "2"], r"label 'nan' \(#2\) is not a whole number"),
    (["cat", "3", "dog"], r"label '3' \(#2\) is a number, yet other labels are names"),
    (["0", "1000000000000000000"], r"label '1000000000000000000' \(#2\) is not a class number in 0..99999"),
    (["-1", "0"], r"label '-1' \(#1\) is not a whole number"),
], ids=["1.5", "nan", "mixed", "1e18", "negative"])
def test_labels_are_class_numbers_or_names_never_a_mixture(labels, message):
    with pytest.raises(ClipqError, match=message):
        image_sources.label_ids(labels, "data.csv")


def test_whole_number_labels_in_any_numeric_form_are_kept():
    assert image_sources.label_ids([2, 0, 1], "a") == ([2, 0, 1], ["0", "1", "2"])
    assert image_sources.label_ids([2.0, 0.0], "a") == ([2, 0], ["0", "1", "2"])
    assert image_sources.label_ids(["b", "a"], "a") == ([1, 0], ["a", "b"])


@pytest.mark.parametrize("kind", ["csv", "idx", "list", "npy"])
def test_a_device_is_not_read_as_input(kind, tmp_path):
    with pytest.raises(ClipqError, match="/dev/zero: not a regular file"):
        image_sources.load(image_sources.Path("/dev/zero"), kind, labels=image_sources.Path("/dev/zero"))


def test_a_binary_file_as_csv_stops_at_the_line_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(image_sources, "MAX_LINE", 1000)
    (tmp_path / "x.csv").write_bytes(bytes(5000))
    with pytest.raises(ClipqError, match=r"x.csv:1: a line of more than 1,000 characters"):
        image_sources.load(tmp_path / "x.csv")


def test_a_list_file_label_written_as_a_float_is_refused(tmp_path):
    (tmp_path / "list.txt").write_text("a.png 1e3\n")
    with pytest.raises(ClipqError, match=r"list.txt:1: expected 'relative/path LABEL' with LABEL a class number"):
        image_sources.load(tmp_path / "list.txt")


def test_npy_headers_are_checked_before_the_array_is_read(tmp_path):
    np.save(tmp_path / "obj.npy", np.array(["a", "b"]))
    np.save(tmp_path / "labels.npy", np.arange(2))
    with pytest.raises(ClipqError, match=r"obj.npy: holds <U1 values; images and labels are numbers"):
        image_sources.load(tmp_path / "obj.npy", labels=tmp_path / "labels.npy")
    header = np.lib.format.header_data_from_array_1_0(np.zeros((2, 2), np.uint8))
    header["shape"] = (1 << 20, 1 << 20, 700)  # 730 GiB declared in a tiny file
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(bytes(4))
    with pytest.raises(ClipqError, match=r"huge.npy: its header declares 1048576x1048576x700 uint8 values"):
        image_sources.load(tmp_path / "huge.npy", labels=tmp_path / "labels.npy")


def test_an_idx_header_promising_more_than_an_input_may_have_is_refused(tmp_path):
    (tmp_path / "images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + (0xFFFFFFFF).to_bytes(4, "big") * 3)
    with pytest.raises(ClipqError, match="its IDX header promises .* bytes, more than the 64 GB"):
        image_sources.read_idx(tmp_path / "images-idx3-ubyte")


def test_an_image_too_large_is_refused_from_its_header(tmp_path, monkeypatch):
    monkeypatch.setattr(image_sources, "MAX_PIXELS", 100)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ClipqError, match=r"big.png: 20 x 20 pixels, more than the 100 an image may have"):
        image_sources.read_image(tmp_path / "big.png")


def test_a_csv_given_as_npz_is_not_called_pickled_data(tmp_path):
    (tmp_path / "d.csv").write_text("label,p0\n1,2\n")
    with pytest.raises(ClipqError, match=r"d.csv: not an .npz archive .*give --kind"):
        image_sources.load(tmp_path / "d.csv", "npz")
