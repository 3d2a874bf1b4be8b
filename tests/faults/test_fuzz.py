"""A fuzzer over every reader of a user's file (hypothesis): for any bytes, random or a valid file mutated, the
outcome is a clean result or one ClipqError line, within bounded memory and time, and nothing but the input is
left in its directory. The default tier runs a few derandomized examples per reader; the slow tier many random
ones."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipq.caffe import preflight
from clipq.data import data_import, experiment, image_sources
from clipq.plan import load_plan
from clipq.storage import sparse_codec
from clipq.util.errors import ClipqError
from conftest import REPO

PEAK_BYTES = 200 << 20  # far below what any of the inputs (< 3 KB) could make a careless reader take


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _clipq_bytes() -> bytes:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(6, 10)).astype(np.float32)
    codes = (rng.random((6, 10)) < 0.4).astype(np.uint8) * rng.integers(1, 4, (6, 10)).astype(np.uint8)
    codebook = np.array([-0.5, 0.1, 0.7], np.float32)
    values = np.concatenate([[0], codebook])[codes].astype(np.float32)
    return sparse_codec.encode([sparse_codec.Layer("fc", "InnerProduct", [values, rng.normal(size=6).astype(np.float32)],
                                                   codes, codebook, 2, 0.6)])


def _idx_bytes() -> bytes:
    return b"\0\0\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (2, 3, 3)) + bytes(range(18))


# reader name -> (file name, a valid file, the reader: path -> anything)
READERS = {
    "plan": ("plan.yaml", b"version: 1\nlayers:\n  conv1: {p: 0.2, b: 6}\n  ip1: {p: 0.95, b: 3}\n", load_plan),
    "clipq": ("m.clipq", _clipq_bytes(), lambda p: sparse_codec.decode(p.read_bytes(), str(p))),
    "csv": ("d.csv", b"label,p0,p1,p2,p3\n3,0,255,12,7\n1,4,5,6,7\n", lambda p: image_sources.load(p, "csv")),
    "idx": ("images-idx3-ubyte", _idx_bytes(), image_sources.read_idx),
    "list": ("list.txt", b"cats/a.png 0\ndogs/b.jpg 1\n", lambda p: image_sources.load(p, "list")),
    "npy": ("x.npy", _npy_bytes(np.zeros((2, 4, 4), np.uint8)),
            lambda p: image_sources.load(p, "npy", labels=p)),
    "dataset.json": ("dataset.json", json.dumps({"classes": ["a", "b"], "counts": {"train": 2}}).encode(),
                     lambda p: data_import.read_description(p.parent)),
    "experiment.json": ("experiment.json", json.dumps({"train_val": "t", "solver": "s", "clipq_solver": "c",
                                                        "weights": "w", "val_lmdb": None}).encode(),
                        lambda p: experiment.read_experiment(p.parent)),
    "prototxt": ("deploy.prototxt", (REPO / "prototxt/lenet5/deploy.prototxt").read_bytes(),
                 lambda p: preflight.blob_shapes(preflight.net(p), p, read_data=False)),
}


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """`valid` with a few random edits: bytes replaced, ranges deleted or repeated, random bytes inserted."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["replace", "delete", "insert", "repeat"]))
        if edit == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif edit == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif edit == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif edit == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 64))] * draw(st.integers(1, 8))
    return bytes(data)


def inputs(valid: bytes):
    return st.one_of(st.binary(max_size=512), mutated(valid))


def check_reader(name: str, data: bytes, directory: Path) -> None:
    """Read `data` as the reader `name` would: a result or a ClipqError line, bounded memory, nothing written."""
    file_name, _, reader = READERS[name]
    for old in directory.iterdir():
        old.unlink()
    path = directory / file_name
    path.write_bytes(data)
    tracemalloc.start()
    try:
        reader(path)
    except ClipqError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"{name}: {peak:,} bytes at peak for {len(data)} bytes of input"
    assert [p.name for p in directory.iterdir()] == [file_name]


def fuzz(name: str, examples: int, derandomize: bool, directory: Path) -> None:
    _, valid, _ = READERS[name]

    @settings(max_examples=examples, derandomize=derandomize, database=None, deadline=5000,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(inputs(valid))
    def run(data: bytes) -> None:
        check_reader(name, data, directory)

    run()


@pytest.mark.parametrize("name", READERS)
def test_every_reader_gives_a_result_or_one_error_line(name, tmp_path):
    check_reader(name, READERS[name][1], tmp_path)  # the valid file itself reads
    fuzz(name, 30, True, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", READERS)
def test_every_reader_under_many_random_inputs(name, tmp_path):
    fuzz(name, 5000, False, tmp_path)
