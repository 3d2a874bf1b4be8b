"""The Caffe build clipq runs on: where it is, what tools/install_caffe.sh recorded about it (the build stamp),
and its programs (`caffe`, convert_imageset, the upgrade tools, ...), run so that they never leave a
half-written output."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from clipq.caffe import caffe_io
from clipq.util.atomic import atomic_output
from clipq.util.errors import ClipqError

STAMP = ".clipq-built"  # written by tools/install_caffe.sh into the build's root


def caffe_root() -> Path:
    """The root of the Caffe build pycaffe is imported from (<root>/python/caffe/__init__.py)."""
    return Path(caffe_io.caffe().__file__).resolve().parents[2]


def read_build_stamp(root: Path | None = None) -> dict[str, str]:
    """The key=value facts tools/install_caffe.sh wrote about a Caffe build (default: pycaffe's); {} if none."""
    stamp = (root or caffe_root()) / STAMP
    if not stamp.exists():
        return {}
    return dict(line.split("=", 1) for line in stamp.read_text().splitlines() if "=" in line)


def has_opencv() -> bool:
    """Whether the Caffe pycaffe comes from was built with OpenCV (encoded Datums, convert_imageset)."""
    return read_build_stamp().get("opencv") == "1"


def tool(name: str) -> Path:
    """One of Caffe's build/tools/ programs (convert_imageset, upgrade_net_proto_text, ...) of the build
    pycaffe comes from; an error if that build lacks it."""
    path = caffe_root() / "build" / "tools" / name
    if not path.exists():
        raise ClipqError(f"{path}: Caffe's {name} is not built (`make install` builds Caffe with its tools)")
    return path


def caffe_binary() -> Path:
    """The `caffe` wrapper installed next to this Python (`.venv/bin/caffe`, made by `make install`)."""
    path = Path(sys.prefix) / "bin" / "caffe"
    if not path.exists():
        found = shutil.which("caffe")
        if not found:
            raise ClipqError(f"{path}: no caffe wrapper; run `make install`")
        path = Path(found)
    return path


def run_tool(name: str, *args: str | Path, output: Path) -> None:
    """Run Caffe's tool `name` with `args` and then `output` as its last argument; it writes a temporary that
    replaces `output` only if the tool succeeds. A failure is an error naming the tool's input (its first
    argument that is not an option) and quoting the tool's last lines."""
    exe = tool(name)
    if any(Path(arg).resolve() == Path(output).resolve() for arg in args):
        raise ClipqError(f"{output}: refusing to overwrite an input of Caffe's {name}; write elsewhere")
    with atomic_output(output) as partial:
        proc = subprocess.run([str(exe), *map(str, args), str(partial)], capture_output=True, text=True)
        if proc.returncode != 0 or not partial.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            source = next((arg for arg in args if not str(arg).startswith("-")), name)
            raise ClipqError(f"{source}: Caffe's {name} failed (exit {proc.returncode}) making {output}:\n{tail}")
