"""`clipq doctor`: what clipq runs on (Caffe build and source, numpy, protobuf, GPyOpt, BLAS, OpenCV, data, and the
runtimes the exported models run in: onnx, onnxruntime, ncnn, OpenCV's DNN)."""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
from google.protobuf import text_format

import clipq
from clipq.caffe import build, caffe_io, ncnn_export, onnx_export
from clipq.data.datasets import lmdb_count
from clipq.storage.sparse_codec import Layer
from clipq.util import paths
from clipq.util.errors import ClipqError

REQUIRED_MODULES = [  # (import name, distribution name)
    ("numpy", "numpy"), ("google.protobuf", "protobuf"), ("GPyOpt", "GPyOpt"), ("GPy", "GPy"),
    ("numba", "numba"), ("lmdb", "lmdb"), ("tqdm", "tqdm"), ("yaml", "PyYAML"), ("matplotlib", "matplotlib"),
]


@dataclass
class Check:
    name: str
    ok: bool
    version: str
    where: str


def _module_check(module: str, dist: str) -> Check:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # a missing parent package (e.g. `google` for google.protobuf)
        spec = None
    if spec is None:
        return Check(dist, False, "MISSING", "run `make install`")
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    where = spec.origin or (spec.submodule_search_locations or ["?"])[0]
    return Check(dist, True, version, str(Path(where).parent))


def _caffe_checks() -> list[Check]:
    try:
        caffe = caffe_io.caffe()
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return [Check("pycaffe", False, "MISSING", f"import caffe failed: {e}; run `make install`")]
    root = build.caffe_root()
    stamp = build.read_build_stamp(root)
    checks = [
        Check("pycaffe", True, getattr(caffe, "__version__", "?"), str(Path(caffe.__file__).parent)),
        Check("caffe source", bool(stamp), f"{stamp.get('source_kind', 'unknown')} {stamp.get('commit', '')[:7]}",
              stamp.get("source", f"{root} was not built by clipq's tools/install_caffe.sh")),
        Check("caffe build", True, stamp.get("built", "?"), str(root)),
        Check("caffe python layers", "Python" in caffe.layer_type_list(), "WITH_PYTHON_LAYER",
              "ok" if "Python" in caffe.layer_type_list() else "rebuild with WITH_PYTHON_LAYER := 1"),
        _blas_check(),
        _caffe_cli_check(),
        _opencv_check(stamp),
    ]
    if stamp.get("source_kind") == "brocolli":
        checks.append(Check("WARNING", True, "Caffe is brocolli-caffe 9.0.2, NOT pristine BVLC",
                            "install with the BVLC mirror or GitHub reachable to get BVLC 9b89154"))
    return checks


def _blas_check() -> Check:
    """The BLAS library pycaffe's `_caffe.so` links (through libcaffe), as the dynamic loader resolves it.

    Not this process's memory map: numpy brings its own OpenBLAS, which Caffe never calls."""
    extension = Path(caffe_io.caffe().__file__).parent / "_caffe.so"
    try:
        linked = subprocess.run(["ldd", str(extension)], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return Check("BLAS", False, "unknown", f"ldd {extension} failed: {e}")
    # ldd lines: "libopenblas.so.0 => /lib/x86_64-linux-gnu/libopenblas.so.0 (0x...)"
    libs = [line.split("=>")[1].split("(")[0].strip() for line in linked.splitlines()
            if "=>" in line and "blas" in line.split("=>")[0]]
    if not libs:
        return Check("BLAS", False, "not found", f"{extension} links no BLAS library")
    lib = str(Path(libs[0]).resolve())  # through Debian's alternatives symlinks to the real file
    return Check("BLAS", True, _openblas_version(lib), lib)


def _openblas_version(lib: str) -> str:
    try:
        config = ctypes.CDLL(lib).openblas_get_config
        config.restype = ctypes.c_char_p
        return config().decode().split(" DYNAMIC")[0]
    except (OSError, AttributeError):
        return Path(lib).name


def _caffe_cli_check() -> Check:
    try:
        binary = build.caffe_binary()
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (ClipqError, OSError, subprocess.SubprocessError) as e:
        return Check("caffe CLI", False, "MISSING", str(e))
    version = (out.stdout + out.stderr).strip().splitlines()
    return Check("caffe CLI", out.returncode == 0, version[-1] if version else "?", str(binary))


def _opencv_check(stamp: dict[str, str]) -> Check:
    """Whether Caffe decodes images (convert_imageset, ImageData layers): its build stamp says if it was built
    with OpenCV (the brocolli fallback is not); `make install` puts convert_imageset next to this Python."""
    built_with = {"1": "yes", "0": "no"}.get(stamp.get("opencv", ""), "unknown")
    tool = Path(sys.prefix) / "bin" / "convert_imageset"
    if not tool.exists():
        return Check("caffe OpenCV", False, built_with, f"{tool} missing; run `make install`")
    if built_with != "yes":
        return Check("caffe OpenCV", True, built_with, f"{tool} (cannot decode images without OpenCV)")
    return Check("caffe OpenCV", True, built_with, str(tool))


# --- the runtimes of `clipq export-onnx` / `export-ncnn`: pinned version, and a 1-layer net each runs --------------

RUNTIMES = [("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("ncnn", "ncnn"), ("cv2", "opencv-python-headless")]
TINY_NET = """name: "tiny" layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }"""
FIX = "run `pip install -r requirements.txt`"


def pinned_versions(requirements: Path = paths.REPO / "requirements.txt") -> dict[str, str]:
    """distribution name (lower case) -> the version requirements.txt pins with `==`."""
    pins = {}
    for line in requirements.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.strip().lower()] = version.strip()
    return pins


@dataclass
class TinyModel:
    """A 1-layer InnerProduct (6 -> 3) whose weights are stored as CLIP-Q codes + codebook, its input and
    the output Caffe would give; the files the runtimes read are written into `folder`."""

    folder: Path
    x: np.ndarray
    want: np.ndarray
    compressed: bytes  # ONNX with uint8 codes -> Cast -> Gather
    dense: bytes       # ONNX with float32 weights (what OpenCV 4 reads)
    ncnn: object       # ncnn_export.NcnnExported: 256-entry table + indices

    @classmethod
    def make(cls, folder: Path) -> TinyModel:
        net = text_format.Parse(TINY_NET, caffe_io.caffe_pb2().NetParameter())
        codes = np.arange(18, dtype=np.uint8).reshape(3, 6) % 4  # code 0 is a pruned weight
        codebook = np.array([-0.5, 0.25, 1.0], np.float32)
        bias = np.array([0.1, -0.2, 0.3], np.float32)
        weights = np.concatenate([[0], codebook]).astype(np.float32)[codes]
        layer = Layer("ip", "InnerProduct", [weights, bias], codes, codebook, 2)
        x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)
        dense = {"ip": Layer("ip", "InnerProduct", [weights, bias])}
        return cls(folder, x, x @ weights.T + bias,
                   onnx_export.convert(net, {"ip": layer}, "tiny", "tiny").model.SerializeToString(),
                   onnx_export.convert(net, dense, "tiny", "tiny").model.SerializeToString(),
                   ncnn_export.convert(net, {"ip": layer}, "tiny", "tiny"))

    def error(self, got) -> float:
        return float(np.abs(np.asarray(got, np.float32).reshape(self.want.shape) - self.want).max())


def _run_onnx(m: TinyModel) -> str:
    import onnx  # lazy: only this check and export-onnx need it (a second to import)

    onnx_export.check(onnx.load_from_string(m.compressed))
    return "checker full check of a 1-layer codes + codebook model"


def _run_onnxruntime(m: TinyModel) -> str:
    import onnxruntime  # lazy: only this check and the exported models' runs need it

    session = onnxruntime.InferenceSession(m.compressed, providers=["CPUExecutionProvider"])
    return _agrees(m, session.run(None, {"data": m.x})[0], "codes + codebook")


def _run_ncnn(m: TinyModel) -> str:
    import ncnn  # lazy: only this check and the exported models' runs need it

    param, binary = m.folder / "tiny.param", m.folder / "tiny.bin"
    param.write_text(m.ncnn.param)
    binary.write_bytes(m.ncnn.bin)
    net = ncnn.Net()
    if net.load_param(str(param)) or net.load_model(str(binary)):
        raise RuntimeError("ncnn cannot load the 1-layer model")
    got = []
    for sample in m.x:  # ncnn runs one sample at a time
        extractor = net.create_extractor()
        extractor.input("data", ncnn.Mat(np.ascontiguousarray(sample)).clone())
        status, out = extractor.extract("ip")
        if status:
            raise RuntimeError(f"extract returned {status}")
        got.append(np.array(out).reshape(-1))
    return _agrees(m, got, "256-entry table")


def _run_cv2(m: TinyModel) -> str:
    import cv2  # lazy: only this check and the exported models' runs need OpenCV's DNN module

    path = m.folder / "dense.onnx"
    path.write_bytes(m.dense)
    net = cv2.dnn.readNetFromONNX(str(path))
    net.setInput(m.x)
    return _agrees(m, net.forward(), "dense ONNX")


def _agrees(m: TinyModel, got, what: str) -> str:
    error = m.error(got)
    if error > 1e-5:
        raise RuntimeError(f"the 1-layer net ({what}) is off by {error:.2g}")
    return f"ran a 1-layer net ({what}), error {error:.1g}"


RUNS: dict[str, Callable[[TinyModel], str]] = {"onnx": _run_onnx, "onnxruntime": _run_onnxruntime,
                                               "ncnn": _run_ncnn, "cv2": _run_cv2}


def _runtime_checks() -> list[Check]:
    """onnx, onnxruntime, ncnn and OpenCV: installed at requirements.txt's versions and each runs (or, for
    onnx, fully checks) a 1-layer net exported by clipq's own converters."""
    pins = pinned_versions()
    checks = []
    with tempfile.TemporaryDirectory(prefix="clipq_doctor_") as tmp:
        try:
            model = TinyModel.make(Path(tmp))
        except Exception as e:  # noqa: BLE001 - the exporters or onnx broken: every runtime check says so
            model, reason = None, f"cannot export the 1-layer net: {e}"
        for module, dist in RUNTIMES:
            checks.append(_runtime_check(module, dist, pins.get(dist, "?"), model,
                                         None if model else reason))
    return checks


def _runtime_check(module: str, dist: str, pin: str, model: TinyModel | None, failed: str | None) -> Check:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return Check(dist, False, "MISSING", f"requirements.txt pins {pin}; {FIX}")
    if version != pin:
        return Check(dist, False, f"{version} (pinned {pin})", FIX)
    if failed:
        return Check(dist, False, version, f"{failed}; {FIX}")
    try:
        return Check(dist, True, version, RUNS[module](model))
    except Exception as e:  # noqa: BLE001 - any failure to import or run is the finding
        return Check(dist, False, version, f"{module}: {str(e).strip().splitlines()[0][:120]}; {FIX}")


def _data_checks() -> list[Check]:
    checks = []
    for split in ("train", "val", "test"):
        path = paths.data_dir() / "fashion_mnist" / f"{split}_lmdb"
        count = lmdb_count(path)
        # Data is made by `make data`; its absence is information, not a broken install.
        checks.append(Check(f"fashion-mnist {split}", True, f"{count} images" if count else "not made yet",
                            str(path) if count else "run `make data`"))
    return checks


def report(out: TextIO = sys.stdout) -> bool:
    """Print every check as a table; return False when something required is missing or broken."""
    checks = [Check("clipq", True, clipq.__version__, str(Path(clipq.__file__).parent)),
              Check("python", True, sys.version.split()[0], sys.executable)]
    checks += [_module_check(module, dist) for module, dist in REQUIRED_MODULES]
    checks += _caffe_checks()
    checks += _runtime_checks()
    checks += _data_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'ok ' if c.ok else 'BAD'} {c.name:<{width}}  {c.version:<28} {c.where}", file=out)
    bad = [c.name for c in checks if not c.ok]
    print(f"\n{'problems: ' + ', '.join(bad) if bad else 'all checks passed'}", file=out)
    return not bad
