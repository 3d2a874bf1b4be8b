"""`clipq doctor`: what clipq runs on (Caffe build and source, numpy, protobuf, GPyOpt, BLAS, OpenCV, data)."""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import clipq
from clipq.caffe import build, caffe_io
from clipq.data.datasets import lmdb_count
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
    checks += _data_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'ok ' if c.ok else 'BAD'} {c.name:<{width}}  {c.version:<28} {c.where}", file=out)
    bad = [c.name for c in checks if not c.ok]
    print(f"\n{'problems: ' + ', '.join(bad) if bad else 'all checks passed'}", file=out)
    return not bad
