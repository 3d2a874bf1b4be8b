"""`clipq doctor`: the BLAS it reports is the one Caffe calls; whether Caffe has OpenCV; the runtimes of the
exported models (onnx, onnxruntime, ncnn, OpenCV) at their pinned versions, each running a 1-layer net."""

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


RUNTIME_DISTS = ("onnx", "onnxruntime", "ncnn", "opencv-python-headless")


def test_each_runtime_is_at_its_pinned_version_and_runs_a_one_layer_net():
    pins = doctor.pinned_versions()
    for dist in RUNTIME_DISTS:
        line = _doctor_line(dist)
        assert line.startswith("ok ") and line.split()[2] == pins[dist], line
        assert "1-layer" in line and ("ran" in line or "checker" in line), line


def test_the_pins_are_read_from_requirements_txt():
    pins = doctor.pinned_versions()
    assert pins["onnxruntime"] == "1.32.0" and pins["opencv-python-headless"] == "4.14.0.94"


def test_a_version_other_than_the_pin_names_the_package_and_the_fix():
    check = doctor._runtime_check("onnx", "onnx", "0.0.1", None, None)
    assert not check.ok and check.name == "onnx" and "pinned 0.0.1" in check.version
    assert "pip install -r requirements.txt" in check.where


def test_a_missing_runtime_names_the_package_and_the_fix():
    check = doctor._runtime_check("no_such_runtime", "no-such-runtime", "1.0", None, None)
    assert (check.ok, check.name, check.version) == (False, "no-such-runtime", "MISSING")
    assert "pip install -r requirements.txt" in check.where


def test_a_runtime_that_cannot_run_the_net_fails_its_line(monkeypatch):
    def broken(model):
        raise RuntimeError("Net::load_model failed")

    monkeypatch.setitem(doctor.RUNS, "ncnn", broken)
    out = io.StringIO()
    assert doctor.report(out) is False
    line = next(line for line in out.getvalue().splitlines() if line[4:].startswith("ncnn"))
    assert line.startswith("BAD") and "ncnn: Net::load_model failed" in line and "requirements.txt" in line
    assert "problems: ncnn" in out.getvalue()


def test_doctor_stays_fast():
    import time

    start = time.perf_counter()
    doctor.report(io.StringIO())
    assert time.perf_counter() - start < 20  # a few seconds here; generous for a loaded machine
