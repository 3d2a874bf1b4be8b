"""bench/layer_overhead.py's measuring logic (not its numbers): interleaving and the reported ratio."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def layer_overhead():
    path = Path(__file__).resolve().parents[1] / "bench" / "layer_overhead.py"
    spec = importlib.util.spec_from_file_location("layer_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaving_alternates_which_side_runs_first(layer_overhead):
    order = []
    layer_overhead.interleaved(lambda: order.append("ref"), lambda: order.append("cand"), repeats=4, calls=1)
    assert order == ["ref", "cand", "cand", "ref", "ref", "cand", "cand", "ref"]


def test_the_ratio_is_the_median_of_per_repetition_ratios_with_its_spread(layer_overhead):
    line = layer_overhead.row("net", [1.0, 2.0, 1.0, 1.0, 1.0], [1.2, 2.2, 1.4, 1.1, 3.0], goal=1.25)
    assert "1.20x" in line and "1.10 .. 3.00" in line and line.endswith("met") and "NOT" not in line
    assert "NOT met" in layer_overhead.row("net", [1.0] * 5, [1.3] * 5, goal=1.25)


def test_fewer_than_five_repetitions_are_refused(layer_overhead, capsys):
    with pytest.raises(SystemExit):
        layer_overhead.main(["--repeats", "3"])
    assert "at least 5" in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "bench").glob("*.py")))
def test_every_benchmark_starts(script):
    """Each bench script imports what it needs (e.g. helpers shared with layer_overhead.py) and has --help."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench"
    done = subprocess.run([sys.executable, str(bench / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout


def test_deploy_quick_runs_every_runtime_and_agrees_with_pycaffe():
    """bench/deploy.py --quick: LeNet-5's files, the onnxruntime folding check, and every runtime in its own
    process; each one's batch-1 output matches pycaffe's, and pycaffe (the reference) is 1.00x."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "deploy.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.splitlines()
    assert out[0].startswith("# machine: ") and "onnxruntime 1.32.0" in out[0] and "ncnn" in out[0]
    assert any("the cap keeps every compressed layer's Cast + Gather" in line for line in out)
    assert any(line.startswith(".clipq") for line in out)
    runtimes = out[next(i for i, line in enumerate(out) if line.startswith("runtime")) + 1:]
    assert len(runtimes) == 9 and runtimes[0].count("1.00x [1.00..1.00]") == 2
    assert all(float(line.split()[-1]) < 1e-4 for line in runtimes), runtimes
