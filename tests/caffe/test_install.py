"""The Caffe that `make install` built: pycaffe imports, a net built from a prototxt string trains, Caffe's
tools run from .venv/bin (convert_imageset decodes JPEGs: OpenCV is in)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np

from conftest import require_opencv

VENV_BIN = Path(sys.prefix) / "bin"
COLORS = [(200, 30, 90), (10, 120, 250), (60, 60, 60), (255, 200, 0)]  # RGB, one solid image each
TINY_NET = """
name: "tiny"
layer { name: "x" type: "DummyData" top: "x" top: "y"
        dummy_data_param { shape { dim: 16 dim: 8 } shape { dim: 16 dim: 1 }
                           data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 0.5 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc"
        inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "fc" bottom: "y" top: "loss" }
"""


def test_pycaffe_and_caffe_io_import():
    import caffe
    import caffe.io

    assert hasattr(caffe, "SGDSolver") and hasattr(caffe, "Layer")
    assert caffe.io.datum_to_array(caffe.io.array_to_datum(np.ones((1, 2, 2), np.uint8))).sum() == 4


def test_sgd_solver_steps_a_net_built_from_a_prototxt_string(tmp_path):
    import caffe

    (tmp_path / "net.prototxt").write_text(TINY_NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\nmomentum: 0.9\n'
        f'max_iter: 100\nsnapshot_after_train: false\nsolver_mode: CPU\nrandom_seed: 3\n')
    caffe.set_mode_cpu()
    solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    solver.step(1)
    first_loss = float(solver.net.blobs["loss"].data)
    solver.step(60)
    assert solver.iter == 61
    assert solver.net.params["fc"][0].data.shape == (1, 8)
    assert float(solver.net.blobs["loss"].data) < 0.2 * first_loss



def test_every_caffe_tool_has_a_venv_wrapper(caffe_root):
    tools = sorted(p.name.removesuffix(".bin") for p in (caffe_root / "build" / "tools").glob("*.bin"))
    assert {"caffe", "convert_imageset", "compute_image_mean", "extract_features"} <= set(tools)
    missing = [t for t in tools if not (VENV_BIN / t).is_file()]
    assert not missing, f"no .venv/bin wrapper for {missing}; run `make install`"


def _solid_jpegs(root: Path) -> Path:
    """JPEGs of different sizes, one solid colour each, and Caffe's list file (`name label` lines)."""
    from PIL import Image

    lines = []
    for i, rgb in enumerate(COLORS):
        Image.new("RGB", (40 + 13 * i, 50 - 7 * i), rgb).save(root / f"img{i}.jpg", quality=95)
        lines.append(f"img{i}.jpg {i}")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt"


def _run(*args) -> None:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{args[0]} exited {out.returncode}: {out.stderr[-2000:]}"


def test_convert_imageset_and_compute_image_mean_decode_jpegs(tmp_path):
    from clipq.caffe import caffe_io
    require_opencv("convert_imageset cannot decode JPEGs")
    listing = _solid_jpegs(tmp_path)
    _run(VENV_BIN / "convert_imageset", "--resize_height=32", "--resize_width=32", f"{tmp_path}/", listing,
         tmp_path / "lmdb")
    _run(VENV_BIN / "compute_image_mean", tmp_path / "lmdb", tmp_path / "mean.binaryproto")
    with lmdb.open(str(tmp_path / "lmdb"), readonly=True, lock=False) as env, env.begin() as txn:
        datum = caffe_io.caffe_pb2().Datum.FromString(txn.get(b"00000000_img0.jpg"))
        assert env.stat()["entries"] == len(COLORS)
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 32, 32, 0)
    blob = caffe_io.caffe_pb2().BlobProto.FromString((tmp_path / "mean.binaryproto").read_bytes())
    mean = np.array(blob.data).reshape(blob.num, blob.channels, blob.height, blob.width)  # legacy 4-d fields
    assert mean.shape == (1, 3, 32, 32)
    expected_bgr = np.mean(COLORS, axis=0)[::-1]  # Caffe stores OpenCV's BGR order
    assert np.allclose(mean[0].mean(axis=(1, 2)), expected_bgr, atol=2)


def test_draw_net_wrapper_draws_a_prototxt(repo, tmp_path):
    _run(VENV_BIN / "draw_net.py", repo / "prototxt" / "lenet5" / "deploy.prototxt", tmp_path / "net.png")
    assert (tmp_path / "net.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
