"""`clipq doctor`: the BLAS it reports is the one Caffe calls."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

from clipq import caffe_io, doctor


def test_blas_is_the_library_pycaffe_links_not_numpys():
    out = io.StringIO()
    doctor.report(out)
    blas_line = next(line for line in out.getvalue().splitlines() if line[4:].startswith("BLAS"))
    reported = Path(blas_line.split()[-1])
    extension = Path(caffe_io.caffe().__file__).parent / "_caffe.so"
    linked = subprocess.run(["ldd", str(extension)], capture_output=True, text=True, check=True).stdout
    targets = {Path(line.split("=>")[1].split("(")[0].strip()).resolve()
               for line in linked.splitlines() if "=>" in line}
    assert reported in targets and "numpy" not in str(reported)
