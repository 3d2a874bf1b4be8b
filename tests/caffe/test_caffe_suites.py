"""BVLC Caffe's own pycaffe unit tests (python/caffe/test of the build `make install` made), as Caffe's
`make pytest` runs them. Caffe's C++ gtest suite is `make test-caffe` (tools/test_caffe.sh): too slow here."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import require_bvlc

PYCAFFE_TESTS = 52  # BVLC 9b89154; test_draw needs pydot + graphviz's `dot`; test_nccl checks nothing without NCCL


def test_bvlc_pycaffe_unittests_all_run_and_pass(caffe_root, tmp_path):
    require_bvlc("this is BVLC 9b89154's suite of 52; brocolli ships an older one of 50, whose test_apply_update "
                 "calls Solver.apply_update, which brocolli's own pycaffe lacks")
    # cwd: test_solver snapshots into the working directory, which must not be the shared build tree.
    env = {**os.environ, "PYTHONPATH": str(caffe_root / "python"), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run([sys.executable, "-m", "unittest", "discover", "-s", caffe_root / "python" / "caffe" / "test"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    tail = "\n".join(text.splitlines()[-40:])
    ran = re.search(r"^Ran (\d+) tests? in", text, re.MULTILINE)
    assert ran and int(ran.group(1)) == PYCAFFE_TESTS, f"expected {PYCAFFE_TESTS} tests:\n{tail}"
    assert out.returncode == 0 and re.search(r"^OK$", text, re.MULTILINE), f"pycaffe unittests failed:\n{tail}"
