"""A user's labelled images, in the forms people keep them, as one list of examples for `clipq data`.

Kinds (chosen by `detect`): numpy `.npy` (images, with `--labels` another `.npy`) or `.npz` (an images and a
labels array), CSV (one row per image: a label column, first or last, then the pixels), IDX (MNIST's format,
gzipped or not, with `--labels` its label file), a folder with one subfolder per class, and a Caffe list file
(`relative/path.jpg LABEL` per line, as `convert_imageset` reads). Images are loaded lazily, one at a time,
so a folder of photos is never all in memory; every error names the file (and line or index) at fault.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
import reprlib
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from clipq.util.errors import ClipqError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
IMAGE_KEYS = ("images", "x", "X", "data", "x_train")
LABEL_KEYS = ("labels", "y", "Y", "label", "targets", "y_train")
KINDS = ("npy", "npz", "csv", "idx", "folder", "list")


@dataclass(frozen=True)
class Example:
    """One labelled image: where it comes from (for messages) and how to load it as (C, H, W) uint8."""

    origin: str
    label: int
    load: Callable[[], np.ndarray]


@dataclass(frozen=True)
class Source:
    """Every example of an input, with the class names (index = label)."""

    kind: str
    examples: list[Example]
    classes: list[str]


def detect(path: Path) -> str:
    """The kind of input at `path`, from what it is and its name."""
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise ClipqError(f"{path}: no such file or directory (the images to import)")
    name = path.name.lower().removesuffix(".gz")
    for suffix, kind in ((".npy", "npy"), (".npz", "npz"), (".csv", "csv"), (".txt", "list"), (".list", "list")):
        if name.endswith(suffix):
            return kind
    if "idx" in name or name.endswith("-ubyte"):
        return "idx"
    raise ClipqError(f"{path}: cannot tell what kind of input this is from its name; give --kind "
                     f"({', '.join(KINDS)})")


def load(path: Path, kind: str | None = None, labels: Path | None = None, label_column: str = "first",
         shape: tuple[int, int, int] | None = None, root: Path | None = None) -> Source:
    """The examples of `path` (see the module docstring for the kinds and their options)."""
    kind = kind or detect(path)
    if kind in ("npy", "idx") and labels is None:
        raise ClipqError(f"{path}: a {kind} file holds only images; give their labels with --labels")
    if kind == "npy":
        return _from_arrays(path, _npy(path), _npy(labels), labels, "npy")
    if kind == "npz":
        return _from_npz(path)
    if kind == "idx":
        return _from_arrays(path, read_idx(path), read_idx(labels), labels, "idx")
    if kind == "csv":
        return _from_csv(path, label_column, shape)
    if kind == "folder":
        return _from_folder(path)
    if kind == "list":
        return _from_list(path, root or path.parent)
    raise ClipqError(f"unknown --kind {kind!r}; expected one of {', '.join(KINDS)}")


def _npy(path: Path) -> np.ndarray:
    size = _regular_file(path, ".npy file")
    try:
        with open(path, "rb") as f:
            _checked_npy_header(f, str(path), size)
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ClipqError(f"{path}: not a readable .npy file ({e})") from None


def _checked_npy_header(f, where: str, size: int) -> None:
    """An .npy header whose array is numbers (no objects, strings or records) and fits the `size` bytes of its
    file: read before the array, so that a header declaring terabytes allocates nothing."""
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY" or magic[6] not in (1, 2, 3):
        raise ClipqError(f"{where}: not an .npy array (magic \\x93NUMPY, version 1-3)")
    width = 2 if magic[6] == 1 else 4
    length = int.from_bytes(f.read(width), "little")
    if length > min(size, MAX_NPY_HEADER):
        raise ClipqError(f"{where}: an .npy header of {length:,} bytes (at most {MAX_NPY_HEADER:,}, and what the file "
                         "holds)")
    f.seek(0)
    try:
        np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0 if magic[6] == 1
                           else np.lib.format.read_array_header_2_0)(f)
    except Exception as e:  # noqa: BLE001 - numpy parses the header with ast: any error of a damaged one
        raise ClipqError(f"{where}: a damaged .npy header ({type(e).__name__})") from None
    if dtype.hasobject or dtype.names is not None or dtype.kind not in "biuf":
        raise ClipqError(f"{where}: holds {dtype} values; images and labels are numbers")
    if math.prod(shape) * dtype.itemsize > size:
        raise ClipqError(f"{where}: its header declares {'x'.join(map(str, shape))} {dtype} values "
                         f"({math.prod(shape) * dtype.itemsize:,} bytes), more than the file holds")


def _from_npz(path: Path) -> Source:
    _regular_file(path, ".npz file")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # numpy would call any other file pickled data
            raise ClipqError(f"{path}: not an .npz archive (a zip of .npy arrays); give --kind for what it is")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ClipqError(f"{path}: not a readable .npz file ({e})") from None
    with archive:
        keys = list(archive.keys())
        image_key = next((k for k in IMAGE_KEYS if k in keys), None)
        label_key = next((k for k in LABEL_KEYS if k in keys), None)
        if image_key is None or label_key is None:
            raise ClipqError(f"{path}: holds arrays {keys}; expected images under one of {list(IMAGE_KEYS)} and "
                             f"labels under one of {list(LABEL_KEYS)}")
        try:
            for key in (image_key, label_key):
                member = archive.zip.getinfo(f"{key}.npy")
                with archive.zip.open(member) as f:
                    _checked_npy_header(f, f"{path}[{key}]", member.file_size)
            images, labels = archive[image_key], archive[label_key]
        except (OSError, ValueError, KeyError) as e:
            raise ClipqError(f"{path}: not a readable .npz file ({e})") from None
    return _from_arrays(path, images, labels, f"{path}[{label_key}]", "npz")


def _from_arrays(path: Path, images: np.ndarray, labels: np.ndarray, labels_from, kind: str) -> Source:
    """Examples of an (N, H, W), (N, C, H, W) or (N, H, W, C) array and N labels."""
    chw = to_chw(images, str(path))
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(chw):
        raise ClipqError(f"{labels_from}: {labels.shape} labels for {len(chw)} images in {path}; expected one "
                         f"label per image")
    ids, classes = label_ids(labels.tolist(), str(labels_from))
    examples = [Example(f"{path}[{i}]", ids[i], lambda i=i: chw[i]) for i in range(len(chw))]
    return Source(kind, examples, classes)


def to_chw(images: np.ndarray, where: str) -> np.ndarray:
    """(N, C, H, W) uint8 from grey (N, H, W) or colour (N, C, H, W) / (N, H, W, C) images; floats in [0, 1]
    are scaled by 255 (a channel axis of size 1 or 3 is looked for after the images' axis, then last)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ClipqError(f"{where}: images of shape {images.shape}; expected (N, H, W) grey or (N, C, H, W) / "
                         f"(N, H, W, C) with 1 or 3 channels")
    if images.dtype.kind in "iu" and images.size and images.min() >= 0 and images.max() <= 1:
        raise ClipqError(f"{where}: every pixel is the integer 0 or 1: binary images? Give them as 0 and 255, or as "
                         "floats 0.0 / 1.0 to have them scaled to 0..255 (stored as 0 and 1 they would be black)")
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind == "f" and images.size and 0 <= images.min() and images.max() <= 1:
        return np.rint(images * 255).astype(np.uint8)
    if images.dtype.kind in "iuf" and (not images.size or (images.min() >= 0 and images.max() <= 255)):
        if images.dtype.kind == "f" and not np.array_equal(images, np.rint(images)):
            raise ClipqError(f"{where}: float pixels that are neither in [0, 1] nor whole numbers 0..255")
        return images.astype(np.uint8)
    raise ClipqError(f"{where}: pixels of type {images.dtype} in {images.min()}..{images.max()}; expected 0..255 "
                     f"(or floats in [0, 1])")


MAX_PIXELS = 1 << 26  # pixels of one image (8192 x 8192), read or resized to
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a larger label is a broken file, not a class
MAX_LINE = 16 << 20   # characters in one line of a CSV or list file (a 3 x 512 x 512 CSV row is ~3 MB)
MAX_FILE = 64 << 30   # bytes of one input file read whole (IDX, .npy)
MAX_NPY_HEADER = 1 << 16
WHOLE_RE = re.compile(r"[ \t]*\+?[0-9]+[ \t]*")


def label_ids(labels: list, where: str) -> tuple[list[int], list[str]]:
    """Integer labels for Caffe (0..K-1) and the class names. Either every label is a whole number >= 0
    (written as one: `3`, not `3.0` in text; classes "0".."max", at most MAX_CLASSES), or every label is a name
    that is not a number (classes numbered in sorted order). Anything else is refused, naming the first label
    that breaks the rule: a `1.5` or `nan` among whole numbers would otherwise renumber every class."""
    if not labels:
        return [], []
    numbers = [_whole(x) for x in labels]
    if all(n is not None for n in numbers):
        first = next((i for i, n in enumerate(numbers) if n < 0 or n >= MAX_CLASSES), None)
        if first is not None:
            raise ClipqError(f"{where}: label {labels[first]!r} (#{first + 1}) is not a class number in "
                             f"0..{MAX_CLASSES - 1}")
        return numbers, [str(i) for i in range(max(numbers) + 1)]
    odd = next((i for i, (x, n) in enumerate(zip(labels, numbers)) if n is None and _number_like(x)), None)
    if odd is not None:
        raise ClipqError(f"{where}: label {labels[odd]!r} (#{odd + 1}) is not a whole number >= 0; labels are "
                         "class numbers 0, 1, 2, ... or class names")
    number = next((i for i, n in enumerate(numbers) if n is not None), None)
    if number is not None:
        raise ClipqError(f"{where}: label {labels[number]!r} (#{number + 1}) is a number, yet other labels are "
                         "names; labels are class numbers 0, 1, 2, ... or class names, not both")
    names = sorted({str(x).strip() for x in labels})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(x).strip()] for x in labels], names


def _whole(x) -> int | None:
    """x as a class number if it is written as a whole number (an integer; a float equal to one; digits)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return int(x) if math.isfinite(x) and float(x).is_integer() else None
    return int(x) if isinstance(x, str) and WHOLE_RE.fullmatch(x) else None


def _number_like(x) -> bool:
    try:
        float(x)
        return True
    except (TypeError, ValueError):
        return False


def _regular_file(path: Path, what: str) -> int:
    """The size of `path`, which must be a regular file of at most MAX_FILE bytes (not /dev/zero, a pipe...)."""
    try:
        info = path.stat()
    except OSError as e:
        raise ClipqError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ClipqError(f"{path}: not a regular file (the {what})")
    if info.st_size > MAX_FILE:
        raise ClipqError(f"{path}: {info.st_size:,} bytes, more than the {MAX_FILE >> 30} GB an input file may have")
    return info.st_size


def _lines(f, path: Path):
    """The lines of a text file, each at most MAX_LINE characters (a binary file has no newlines to stop at)."""
    number = 0
    while True:
        try:
            line = f.readline(MAX_LINE + 1)
        except UnicodeDecodeError:
            raise ClipqError(f"{path}:{number + 1}: not UTF-8 text (a binary file?)") from None
        except (OSError, EOFError) as e:  # a damaged .gz
            raise ClipqError(f"{path}: cannot read ({e})") from None
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE:
            raise ClipqError(f"{path}:{number}: a line of more than {MAX_LINE:,} characters; not a text file of "
                             "images")
        yield line


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format), gzipped or not; header checked against the payload, and no
    more read than the header promises."""
    _regular_file(path, "IDX file")
    try:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path) if compressed else open(path, "rb")) as f:
            head = f.read(4)
            dims = f.read(4 * head[3]) if len(head) == 4 and head[:3] == b"\0\0\x08" else b""
            expected = len(head) + len(dims) + math.prod(int.from_bytes(dims[i:i + 4], "big")
                                                         for i in range(0, len(dims) - 3, 4))
            if expected > MAX_FILE:
                raise ClipqError(f"{path}: its IDX header promises {expected:,} bytes, more than the "
                                 f"{MAX_FILE >> 30} GB an input may have")
            raw = head + dims + _read_at_most(f, expected - len(head) - len(dims) + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ClipqError(f"{path}: cannot read ({e})") from None
    return parse_idx(raw, path)


def _read_at_most(f, limit: int, chunk: int = 1 << 20) -> bytes:
    """Up to `limit` bytes of `f`, in chunks: memory follows what the file holds, not what its header claims."""
    parts, total = [], 0
    while total < limit and (part := f.read(min(chunk, limit - total))):
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def parse_idx(raw: bytes, path) -> np.ndarray:
    """The array of an IDX file's bytes (unsigned bytes; big-endian header: magic 0x0008 + ndim, the dims),
    the header checked against the payload; errors name `path`."""
    if len(raw) < 4 or raw[:3] != b"\0\0\x08":
        raise ClipqError(f"{path}: not an IDX file of unsigned bytes (magic 0x0008..)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ClipqError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int.from_bytes(raw[i:i + 4], "big") for i in range(4, header, 4))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ClipqError(f"{path}: {len(raw)} bytes, header promises {expected} (corrupt or truncated)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _from_csv(path: Path, label_column: str, shape: tuple[int, int, int] | None) -> Source:
    """Rows of `label, pixel...` (label_column "first") or `pixel..., label` ("last"); a header row (names, or
    the column numbers 0, 1, 2, ... or 1, 2, 3, ...) is skipped. Pixels written as whole numbers are integers,
    others floats (so that 0/1 integers are not taken for floats in [0, 1])."""
    labels, rows, floats = [], [], False
    with _open_text(path) as f:
        for line, row in _csv_rows(_lines(f, path), path):
            if not row:
                continue
            label, pixels = (row[0], row[1:]) if label_column == "first" else (row[-1], row[:-1])
            if line == 1 and (not _numeric(row[-1 if label_column == "first" else 0]) or _column_numbers(pixels)):
                continue  # the header
            try:
                rows.append(np.array(pixels, dtype=np.float64))
            except ValueError:
                raise ClipqError(f"{path}:{line}: a pixel is not a number (label column: {label_column})") from None
            if not floats:
                written = "".join(pixels)
                floats = any(mark in written for mark in ".eEnN")
            if len(rows[-1]) != len(rows[0]):
                raise ClipqError(f"{path}:{line}: {len(rows[-1])} pixels, but the first row has {len(rows[0])}")
            if label.strip() == "":
                raise ClipqError(f"{path}:{line}: missing label ({label_column} column)")
            labels.append(label.strip())
    if not rows:
        raise ClipqError(f"{path}: no data rows")
    shape = shape or _square_shape(len(rows[0]), path)
    if int(np.prod(shape)) != len(rows[0]):
        raise ClipqError(f"{path}: {len(rows[0])} pixels per row do not make --shape {'x'.join(map(str, shape))}")
    images = np.stack(rows).reshape((len(rows),) + tuple(shape))
    if not floats:
        images = images.astype(np.int64)
    return _from_arrays(path, images, np.array(labels), f"{path} ({label_column} column)", "csv")


def _csv_rows(lines, path: Path):
    """(line number, row) of CSV lines; a line CSV cannot parse (a NUL, a field too long) is an error naming it."""
    reader = csv.reader(lines)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise ClipqError(f"{path}:{reader.line_num}: not CSV ({e})") from None
        yield reader.line_num, row


def _column_numbers(cells: list[str]) -> bool:
    """Cells that number the columns (0, 1, 2, ... or 1, 2, 3, ..., at least a 4x4 image's): a header, not an
    image."""
    if len(cells) < 16 or not all(WHOLE_RE.fullmatch(c) for c in cells):
        return False
    first = int(cells[0])
    return first in (0, 1) and all(int(c) == first + i for i, c in enumerate(cells))


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _square_shape(pixels: int, path: Path) -> tuple[int, int, int]:
    for channels in (1, 3):
        side = int(round((pixels / channels) ** 0.5))
        if side * side * channels == pixels:
            return channels, side, side
    raise ClipqError(f"{path}: {pixels} pixels per row are not a square grey or colour image; give --shape C,H,W")


def _open_text(path: Path):
    _regular_file(path, "text file of images")
    try:
        return io.TextIOWrapper(gzip.open(path), newline="") if path.suffix == ".gz" else open(path, newline="")
    except OSError as e:
        raise ClipqError(f"{path}: cannot read ({e.strerror or e})") from None


def _from_folder(path: Path) -> Source:
    """ROOT/<class>/<image>: classes are the subfolders in sorted order."""
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ClipqError(f"{path}: no subfolders; expected one folder of images per class")
    examples = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (path / name).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not files:
            raise ClipqError(f"{path / name}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this class folder")
        examples += [Example(str(f), label, lambda f=f: read_image(f)) for f in files]
    return Source("folder", examples, classes)


def _from_list(path: Path, root: Path) -> Source:
    """Caffe's list file: `relative/path LABEL` per line, paths relative to `root`."""
    entries = []
    with _open_text(path) as f:
        for line, text in enumerate(_lines(f, path), 1):
            if not text.strip():
                continue
            name, _, label = text.strip().rpartition(" ")
            if not name or not WHOLE_RE.fullmatch(label) or int(label) >= MAX_CLASSES:
                raise ClipqError(f"{path}:{line}: expected 'relative/path LABEL' with LABEL a class number in "
                                 f"0..{MAX_CLASSES - 1}, got {reprlib.repr(text.strip())}")
            entries.append((root / name.strip(), int(label)))
    if not entries:
        raise ClipqError(f"{path}: no entries")
    classes = [str(i) for i in range(max(label for _, label in entries) + 1)]
    examples = [Example(str(f), label, lambda f=f: read_image(f)) for f, label in entries]
    return Source("list", examples, classes)


def read_image(path: Path) -> np.ndarray:
    """An image file as (C, H, W) uint8: grey images (and grey with alpha) 1 channel, everything else RGB.
    An image of more than MAX_PIXELS pixels is refused from its header, before it is decoded."""
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ClipqError(f"{path}: {image.width} x {image.height} pixels, more than the "
                                 f"{MAX_PIXELS:,} an image may have")
            grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
            image = image.convert("L" if grey else "RGB")
            array = np.asarray(image)
    except FileNotFoundError:
        raise ClipqError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ClipqError(f"{path}: not a readable image ({e})") from None
    return array[None] if grey else array.transpose(2, 0, 1)
