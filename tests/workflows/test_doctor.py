"""`clipq doctor`: the BLAS it reports is the one Caffe calls; whether Caffe has OpenCV."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from clipq.caffe import caffe_io
from clipq.workflows import doctor
from conftest import require_opencv


def _doctor_line(name: str) -> str:
    out = io.StringIO()
    doctor.report(out)
    return next(line for line in out.getvalue().splitlines() if line[4:].startswith(name))


def test_blas_is_the_library_pycaffe_links_not_numpys():
    blas_line = _doctor_line("BLAS")
    reported = Path(blas_line.split()[-1])
    extension = Path(caffe_io.caffe().__file__).parent / "_caffe.so"
    linked = subprocess.run(["ldd", str(extension)], capture_output=True, text=True, check=True).stdout
    targets = {Path(line.split("=>")[1].split("(")[0].strip()).resolve()
               for line in linked.splitlines() if "=>" in line}
    assert reported in targets and "numpy" not in str(reported)


def test_opencv_is_in_the_build_and_convert_imageset_is_reachable():
    require_opencv("the doctor reports no (test_a_build_without_opencv_is_reported_as_such)")
    line = _doctor_line("caffe OpenCV")
    tool = Path(sys.prefix) / "bin" / "convert_imageset"
    assert line.startswith("ok ") and line.split()[3] == "yes" and line.endswith(str(tool)), line


def test_a_build_without_opencv_is_reported_as_such():
    check = doctor._opencv_check({"opencv": "0"})
    assert (check.ok, check.version) == (True, "no") and "cannot decode images" in check.where
